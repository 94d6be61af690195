"""Switch Transformer models: the T5-style encoder-decoder and a decoder-only language model."""

from switchformer.models.lm import SwitchLM, SwitchLMConfig
from switchformer.models.outputs import ModelOutput, RouterStats
from switchformer.models.t5 import SwitchT5, SwitchT5Config, dense_twin_config

__all__ = [
    "ModelOutput",
    "RouterStats",
    "SwitchLM",
    "SwitchLMConfig",
    "SwitchT5",
    "SwitchT5Config",
    "dense_twin_config",
]
