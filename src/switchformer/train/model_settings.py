"""The one map of training settings to model-config fields, read by everything that turns one into
the other: :meth:`TrainConfig.model_config` (a fresh run's model), ``train --init-from`` (which
settings must match a pretrained model and which it applies to it), ``convert`` and ``upcycle``
(the settings that describe a model config) and a run's reader (the train section's architecture,
which config.json stores once, in the model section).

Adding a setting: a field of :class:`~switchformer.train.config.TrainConfig` with its bound
(``TRAIN_BOUNDS``), and a line here naming the model-config field it sets in each family (``None``
where the family has none); docs/architecture.md says the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSetting:
    """``train``: the TrainConfig field; ``lm``/``t5``: the SwitchLMConfig/SwitchT5Config field it
    sets (a tuple: several; None: the family has none); ``architecture``: what a model *is* (a
    pretrained model's value must not be contradicted) rather than how it trains."""

    train: str
    lm: str | tuple[str, ...] | None
    t5: str | tuple[str, ...] | None
    architecture: bool

    def fields(self, family: str) -> tuple[str, ...]:
        names = self.lm if family == "lm" else self.t5
        return () if names is None else (names,) if isinstance(names, str) else names


MODEL_SETTINGS = (
    ModelSetting("d_model", "d_model", "d_model", True),
    ModelSetting("num_layers", "num_layers", ("num_layers", "num_decoder_layers"), True),
    ModelSetting("num_heads", "num_heads", "num_heads", True),
    ModelSetting("d_ff", "d_ff", "d_ff", True),
    ModelSetting("num_experts", "num_experts", "num_experts", True),
    ModelSetting("sparse_step", "sparse_step", ("encoder_sparse_step", "decoder_sparse_step"), True),
    ModelSetting("top_k", "top_k", "top_k", True),
    ModelSetting("normalize_gates", "normalize_gates", "normalize_gates", True),
    ModelSetting("activation", "activation", "activation", True),
    ModelSetting("routing", "routing", None, True),
    ModelSetting("tie_embeddings", "tie_word_embeddings", "tie_word_embeddings", True),
    ModelSetting("capacity_factor", "capacity_factor", "capacity_factor", False),
    ModelSetting("eval_capacity_factor", "eval_capacity_factor", "eval_capacity_factor", False),
    ModelSetting("group_size", "group_size", None, False),
    ModelSetting("router_jitter_noise", "router_jitter_noise", "router_jitter_noise", False),
    ModelSetting("dropout", "dropout_rate", "dropout_rate", False),
    ModelSetting("expert_dropout", "expert_dropout", "expert_dropout", False),
    ModelSetting("aux_loss_coef", "router_aux_loss_coef", "router_aux_loss_coef", False),
    ModelSetting("z_loss_coef", "router_z_loss_coef", "router_z_loss_coef", False),
    ModelSetting("init_scale", "init_scale", "init_scale", False),
)
DEFAULT_ACTIVATION = {"lm": "swiglu", "t5": "relu"}  # TrainConfig's activation None means the family's


def model_values(config, family: str) -> dict:
    """The model-config fields ``config`` (a TrainConfig) sets for ``family``, by the map."""
    values = {}
    for setting in MODEL_SETTINGS:
        value = getattr(config, setting.train)
        if setting.train == "activation" and value is None:
            value = DEFAULT_ACTIVATION[family]
        for name in setting.fields(family):
            values[name] = value
    return values


def train_values(model_config: dict, family: str) -> dict:
    """The TrainConfig fields that describe ``model_config`` (a saved model section), by the map: the
    first model field of each setting; a model without experts (a dense T5 import) says
    ``sparse_step`` 0, as a dense run's settings do."""
    values = {}
    for setting in MODEL_SETTINGS:
        names = [name for name in setting.fields(family) if name in model_config]
        if names:
            values[setting.train] = model_config[names[0]]
    if values.get("num_experts") == 0:
        values["sparse_step"] = 0
    if values.get("expert_dropout", 0) is None:  # T5 configs: None means the dropout rate
        values["expert_dropout"] = model_config.get("dropout_rate", 0.0)
    return values


ARCHITECTURE = tuple(s.train for s in MODEL_SETTINGS if s.architecture)
TRAINING = tuple(s.train for s in MODEL_SETTINGS if not s.architecture)
