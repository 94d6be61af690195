"""``train --init-from SOURCE``: start a new run from pretrained weights.

SOURCE is a Hugging Face T5/SwitchTransformers directory, a switchformer run (its latest
checkpoint, or the weights of a converted run) or one checkpoint folder. The new run takes
SOURCE's architecture (its model config, exactly) and its tokenizer; the optimizer and the
learning-rate schedule start fresh at step 0. Size settings given on the command line or in a
config file that contradict SOURCE are refused by name. Training-time settings the user did not
give take the paper's fine-tuning values (:data:`FINE_TUNING_DEFAULTS`).

The tokenizer: SOURCE's ``tokenizer.json``, or, for a Hugging Face directory that has only T5's
SentencePiece ``spiece.model``, that model converted by ``transformers`` (its T5 tokenizer, built
on ``tokenizers``): the same pieces and ids as T5's own tokenizer (``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2, ``<extra_id_*>`` at the top). switchformer appends ``</s>`` itself wherever a text
ends (training rows, ``translate``, ``generate``), so a tokenizer whose post-processor appends it
too (every T5 ``tokenizer.json`` of the hub does) is used without that post-processor; nothing
else changes. A converted or rewritten tokenizer is kept in a cache folder (not in SOURCE:
commands that read a source never write into it) and copied into the new run like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from switchformer.data.files import read_json
from switchformer.data.tokenizer import load_tokenizer, special_ids
from switchformer.interop.hf import from_hf
from switchformer.interop.hf_config import HF_MODEL_TYPES
from switchformer.interop.tokenizers import source_tokenizer
from switchformer.runs.directory import is_hugging_face_source, run_dir_of
from switchformer.train.model_settings import MODEL_SETTINGS, train_values
from switchformer.train.run import load_run, read_run_config


# The settings a pretrained model decides (given ones must agree) and those applied to it, from the one
# settings map (vocab_size too: the tokenizer must fit the embedding)
def architecture_fields(family: str) -> dict[str, str]:
    """Settings that describe a pretrained ``family`` model -> the model-config field each must match."""
    fields = {s.train: s.fields(family)[0] for s in MODEL_SETTINGS if s.architecture and s.fields(family)}
    return {**fields, "vocab_size": "vocab_size"}


def training_fields(family: str) -> dict[str, tuple[str, ...]]:
    """Training-time settings (a user's, or the fine-tuning defaults) -> the model-config fields they set."""
    return {s.train: s.fields(family) for s in MODEL_SETTINGS if not s.architecture and s.fields(family)}


# Fine-tuning defaults: what a new run started from pretrained weights gets for each of these
# fields unless the user set it (with --set, a config file or a flag; a preset's value does not
# count). Sources:
# - dropout, expert_dropout: Fedus, Zoph, Shazeer, "Switch Transformers" (JMLR 2022), section 4.1
#   "Fine-Tuning": "a dropout rate of 0.1 for all layers except the Switch layers, which use a
#   dropout rate of 0.4 (see Table 4)" (Table 4, section 2.4: "expert dropout", the larger rate
#   applied only inside the experts' feed-forward computation).
# - optimizer, lr, schedule: the Switch paper fine-tunes with T5's protocol; T5 (Raffel et al.,
#   JMLR 2020, section 3.1.4 "Fine-tuning") fine-tunes with Adafactor at a constant learning rate
#   of 0.001. Our "constant" schedule keeps the run's linear warmup (``warmup_steps``) first.
#   torch.optim.Adafactor takes ``lr`` as its step size, scaled by each tensor's RMS (as mesh
#   TensorFlow's Adafactor with multiply_by_parameter_scale, T5's setting), capped at 1/sqrt(step),
#   which a constant 1e-3 stays under for the first million steps: no relative-step schedule.
# The capacity factors, router jitter and router loss coefficients are not here: they stay the
# source model's (its config), unless the user sets them.
FINE_TUNING_DEFAULTS = {
    "dropout": 0.1,
    "expert_dropout": 0.4,
    "optimizer": "adafactor",
    "lr": 1e-3,
    "schedule": "constant",
}

@dataclass
class Pretrained:
    family: str  # "t5" or "lm"
    model_config: dict  # the model section the new run is built from
    state: dict[str, torch.Tensor]  # the weights
    tokenizer_file: Path
    tokenizer_note: str = ""  # how the tokenizer was obtained, when not used as it is


def load_pretrained(source: str | Path, tokenizer: str | Path | None = None) -> Pretrained:
    """Architecture, weights and tokenizer of ``source`` (``tokenizer``: the user's own file instead
    of the source's). Errors are one line naming the file."""
    source = Path(source)
    if is_hugging_face_source(source):
        model, family = from_hf(source), "t5"
        folder = source
    else:
        model, _, train = load_run(source, need_tokenizer=False)
        family, folder = train.model, run_dir_of(source)
    config = model.config.to_dict()
    if tokenizer is not None:
        tokenizer_file, note = Path(tokenizer), f"{tokenizer} (given)"
    else:
        tokenizer_file, note = source_tokenizer(folder)
    check_special_ids(tokenizer_file, config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Pretrained(family, config, state, tokenizer_file, note)


def source_family(source: str | Path) -> str:
    """``"t5"`` or ``"lm"``: the model family ``source`` holds, read from its ``config.json`` alone
    (before anything loads), so that a new run never needs to be told it. A Hugging Face directory
    holds a T5-family model (the only ones switchformer imports; any other ``model_type`` is named)."""
    if is_hugging_face_source(source):
        file = run_dir_of(source) / "config.json"
        model_type = read_json(file).get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"{file}: model_type {model_type!r}; --init-from takes T5 and SwitchTransformers "
                             "checkpoints (or a switchformer run)")  # fmt: skip
        return "t5"
    return read_run_config(source).train.model


def is_sparse(model_config: dict) -> bool:
    """Whether a model config (either family) has Switch layers."""
    steps = [model_config.get(k) for k in ("sparse_step", "encoder_sparse_step", "decoder_sparse_step")]
    return model_config.get("num_experts", 0) > 0 and any(step for step in steps)


def check_special_ids(tokenizer_file: Path, model_config: dict) -> None:
    """The tokenizer's ``<pad>`` and ``</s>`` must be the ids the model was trained with, and its
    tokens must fit the model's vocabulary (checked here, naming the file the user gave, before
    anything is copied into the new run)."""
    tokenizer = load_tokenizer(tokenizer_file)
    vocab = model_config.get("vocab_size")
    if vocab is not None and tokenizer.get_vocab_size() > vocab:
        raise ValueError(
            f"{tokenizer_file}: {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size {vocab} "
            "(a tokenizer of another model?)"
        )
    ids = special_ids(tokenizer)
    for name, field in (("pad", "pad_token_id"), ("eos", "eos_token_id")):
        want = model_config.get(field)
        if want is not None and ids[name] is not None and ids[name] != want:
            token = {"pad": "<pad>", "eos": "</s>"}[name]
            raise ValueError(
                f"{tokenizer_file}: {token} has id {ids[name]}, the model's {field} is {want} "
                "(a tokenizer of another model?)"
            )


def check_settings_fit(pretrained: Pretrained, given: dict, sources: dict[str, str]) -> None:
    """Refuse architecture settings the user gave (``given``: field -> value, from flags, ``--set``
    or a config file) that contradict the pretrained model."""
    if "model" in given and given["model"] != pretrained.family:
        raise ValueError(
            f"model: --init-from gives a {pretrained.family} model, {sources.get('model', 'settings')} asks for "
            f"{given['model']!r}"
        )
    for field, model_field in architecture_fields(pretrained.family).items():
        if field in given and model_field in pretrained.model_config:
            have = pretrained.model_config[model_field]
            if given[field] != have:
                raise ValueError(
                    f"{field}: the --init-from model has {have!r}, {sources.get(field, 'settings')} gives "
                    f"{given[field]!r}; leave it out (the architecture comes from the pretrained model)"
                )


def fine_tuning_config(pretrained: Pretrained, config, given: dict, sources: dict | None = None):
    """(train config, model config, fine-tuning defaults applied) of the new run: the architecture
    and tokenizer from the pretrained model; the training-time settings the user gave (``given``)
    applied to it, :data:`FINE_TUNING_DEFAULTS` for those of them the user did not give, the source
    model's own values for the rest (capacity factors, router jitter and loss coefficients). The
    train config states the values the model trains with. A decoder-only source's ``max_seq_len``
    bounds ``seq_len``: a preset's longer length becomes the source's, a user's is refused by name
    (``sources``: where each given setting came from)."""
    sources = sources or {}
    model_config = dict(pretrained.model_config)
    applied = {field: value for field, value in FINE_TUNING_DEFAULTS.items() if field not in given}
    if not is_sparse(model_config):  # a dense T5: no expert to drop out in
        applied.pop("expert_dropout", None)
    training = training_fields(pretrained.family)
    settings = {**applied, **{field: given[field] for field in training if field in given}}
    for field, model_fields in training.items():
        for model_field in model_fields:
            if field in settings and model_field in model_config:
                model_config[model_field] = settings[field]
    if model_config.get("expert_capacity") is not None and given.keys() & {"capacity_factor", "eval_capacity_factor"}:
        model_config["expert_capacity"] = None  # an absolute capacity would override the factors given
    described = train_values(model_config, pretrained.family)  # the run's settings say what it trains
    described["vocab_size"] = model_config.get("vocab_size", config.vocab_size)
    context = model_config.get("max_seq_len")  # a decoder-only model's positions bound its sequences
    if context is not None and config.seq_len > context:
        if "seq_len" in given:
            raise ValueError(f"seq_len: the --init-from model has {context} positions (max_seq_len), "
                             f"{sources.get('seq_len', 'settings')} gives {given['seq_len']}")  # fmt: skip
        applied["seq_len"] = context  # a preset's length beyond the source's: the source's, said so
    others = {field: value for field, value in applied.items() if field not in training}
    train = replace(
        config, model=pretrained.family, tokenizer=str(pretrained.tokenizer_file.resolve()), **described, **others
    )
    return train, model_config, applied


def describe_fine_tuning(applied: dict, model_config: dict, pretrained: Pretrained) -> list[str]:
    """Lines that tell the user what the new run took from where (printed by ``train``)."""
    lines = []
    applied = dict(applied)
    if "seq_len" in applied:
        lines.append(f"seq_len: {applied.pop('seq_len')}, the source's max_seq_len (the preset's was longer)")
    if applied:
        values = ", ".join(f"{k}={v}" for k, v in applied.items())
        lines.append(
            f"fine-tuning defaults (Switch Transformers, section 4.1; T5, section 3.1.4): {values} "
            "(--set any of them to change it)"
        )
    capacity = model_config.get("expert_capacity")
    if not is_sparse(model_config):
        lines.append("dense model: no Switch layer, so no capacity or expert settings")
    elif capacity is not None:
        lines.append(f"capacity: the source's, {capacity} tokens per expert and sequence")
    elif "capacity_factor" in model_config:
        lines.append(
            f"capacity factors: {model_config['capacity_factor']} (training), "
            f"{model_config['eval_capacity_factor']} (evaluation)"
        )
    if pretrained.tokenizer_note:
        lines.append(f"tokenizer: {pretrained.tokenizer_note}")
    return lines
