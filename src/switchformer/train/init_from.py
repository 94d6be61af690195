"""``train --init-from SOURCE``: start a new run from pretrained weights (issue 15, item 1).

SOURCE is a Hugging Face T5/SwitchTransformers directory, a switchformer run (its latest
checkpoint, or the weights of a converted run) or one checkpoint folder. The new run takes
SOURCE's architecture (its model config, exactly) and its tokenizer (``tokenizer.json``); the
optimizer and the learning-rate schedule start fresh at step 0. Size settings given on the command
line or in a config file that contradict SOURCE are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# training settings that describe the architecture -> the model config field each must match
ARCHITECTURE_FIELDS = {
    "d_model": "d_model",
    "num_layers": "num_layers",
    "num_heads": "num_heads",
    "d_ff": "d_ff",
    "num_experts": "num_experts",
    "top_k": "top_k",
    "activation": "activation",
    "vocab_size": "vocab_size",
}


@dataclass
class Pretrained:
    family: str  # "t5" or "lm"
    model_config: dict  # the model section the new run is built from
    state: dict[str, torch.Tensor]  # the weights
    tokenizer_file: Path


def load_pretrained(source: str | Path) -> Pretrained:
    """Architecture, weights and tokenizer of ``source``. Errors are one line naming the file."""
    from switchformer.interop.hf import from_hf
    from switchformer.train.run import is_hugging_face_source, load_run, run_dir_of

    source = Path(source)
    if is_hugging_face_source(source):
        model, family, tokenizer_file = from_hf(source), "t5", source / "tokenizer.json"
        if not tokenizer_file.exists():
            hint = " (it has T5's spiece.model: convert it to tokenizer.json with transformers first)"
            raise FileNotFoundError(
                f"{tokenizer_file}: not found; --init-from needs the checkpoint's tokenizer.json"
                + (hint if (source / "spiece.model").exists() else "")
            )
    else:
        model, _, train = load_run(source)
        family, tokenizer_file = train.model, run_dir_of(source) / "tokenizer.json"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Pretrained(family, model.config.to_dict(), state, tokenizer_file)


def check_settings_fit(pretrained: Pretrained, given: dict, sources: dict[str, str]) -> None:
    """Refuse architecture settings the user gave (``given``: field -> value, from flags, ``--set``
    or a config file) that contradict the pretrained model."""
    if "model" in given and given["model"] != pretrained.family:
        raise ValueError(
            f"model: --init-from gives a {pretrained.family} model, {sources.get('model', 'settings')} asks for "
            f"{given['model']!r}"
        )
    for field, model_field in ARCHITECTURE_FIELDS.items():
        if field in given and model_field in pretrained.model_config:
            have = pretrained.model_config[model_field]
            if given[field] != have:
                raise ValueError(
                    f"{field}: the --init-from model has {have!r}, {sources.get(field, 'settings')} gives "
                    f"{given[field]!r}; leave it out (the architecture comes from the pretrained model)"
                )


# training-time settings a user may give for fine-tuning -> the model config field they set
TRAINING_FIELDS = {
    "capacity_factor": "capacity_factor",
    "eval_capacity_factor": "eval_capacity_factor",
    "router_jitter_noise": "router_jitter_noise",
    "dropout": "dropout_rate",
    "expert_dropout": "expert_dropout",
    "aux_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef",
}


def fine_tuning_config(pretrained: Pretrained, config, given: dict):
    """(train config, model config) of the new run: the architecture and tokenizer from the
    pretrained model; the training-time settings the user gave (``given``) applied to it."""
    from dataclasses import replace

    model_config = dict(pretrained.model_config)
    for field, model_field in TRAINING_FIELDS.items():
        if field in given and model_field in model_config:
            model_config[model_field] = given[field]
    describe = {field: model_config[m] for field, m in ARCHITECTURE_FIELDS.items() if m in model_config}
    step = model_config.get("sparse_step", model_config.get("encoder_sparse_step"))
    if step is not None:
        describe["sparse_step"] = step if describe.get("num_experts", 0) > 0 else 0
    train = replace(config, model=pretrained.family, tokenizer=str(pretrained.tokenizer_file.resolve()), **describe)
    return train, model_config
