"""switchformer: Switch Transformers (sparse mixture-of-experts) in PyTorch.

The layer and its losses load with the package; everything else on first use, so that
``import switchformer`` stays light (no transformers, no tokenizers, no server)."""

from switchformer.moe.layer import MoEAux, SwitchMoE, switch_layers
from switchformer.moe.routing import expert_capacity, load_balancing_loss, router_z_loss

__version__ = "0.1.0"

_LAZY = {
    # models
    "SwitchT5": "switchformer.models",
    "SwitchT5Config": "switchformer.models",
    "SwitchLM": "switchformer.models",
    "SwitchLMConfig": "switchformer.models",
    "dense_twin_config": "switchformer.models",
    # Hugging Face checkpoints
    "from_hf": "switchformer.interop.hf",
    "to_hf": "switchformer.interop.hf",
    # objectives
    "span_corruption": "switchformer.data.objectives",
    "span_corruption_lengths": "switchformer.data.objectives",
    # inference on a run
    "load_run": "switchformer.train.run",
    "translate": "switchformer.inference.translation",
    "generate_text": "switchformer.inference.text",
    # training and the life cycle
    "TrainConfig": "switchformer.train.config",
    "Trainer": "switchformer.train.trainer",
    "upcycle": "switchformer.lifecycle.upcycle",
    "distill": "switchformer.lifecycle.distill",
}


def __getattr__(name: str):
    # Models and interop load on first use, so `import switchformer` stays light.
    if name in _LAZY:
        import importlib  # on first use of a lazy name

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'switchformer' has no attribute {name!r}")


__all__ = [
    "SwitchMoE", "MoEAux", "switch_layers", "expert_capacity", "load_balancing_loss", "router_z_loss", "__version__",
    *_LAZY,
]  # fmt: skip
