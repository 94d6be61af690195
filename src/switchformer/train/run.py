"""Reading a run directory: its ``config.json`` (the one source of truth for the model's
architecture and the training settings), its model and tokenizer. Nothing here writes.

A run directory holds ``config.json`` with two sections: ``train`` (a :class:`TrainConfig`) and
``model`` (the model's own config: ``SwitchLMConfig`` or ``SwitchT5Config``). The model is always
rebuilt from ``model``; ``train``'s size fields describe how a fresh run was asked for, and a
converted checkpoint's architecture (``d_kv``, decoder depth, untied embeddings, absolute
``expert_capacity``) may hold more than they can say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switchformer.train.config import TrainConfig, config_from_sources


@dataclass
class RunConfig:
    run_dir: Path
    file: Path  # the config.json it was read from
    train_values: dict  # as saved (validated by `train`)
    model_values: dict  # the architecture, as saved

    @property
    def train(self) -> TrainConfig:
        return config_from_sources(self.train_values, dict.fromkeys(self.train_values, str(self.file)))

    def build_model(self):
        """The model this run describes, freshly initialised (weights are loaded separately)."""
        return build_model_from_dict(self.train_values.get("model", "lm"), self.model_values, self.file)


def run_dir_of(source: str | Path) -> Path:
    """The run directory of ``source``: itself, or the run holding the checkpoint ``source``."""
    path = Path(source)
    return path.parent.parent if (path / "state.json").exists() else path


def is_hugging_face_source(source: str | Path) -> bool:
    """True for a Hugging Face model directory (its ``config.json`` has ``model_type``), False for
    a switchformer run or checkpoint. Raises a one-line error naming a missing or invalid
    ``config.json``."""
    file = run_dir_of(source) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face directory or a switchformer run)")
    from switchformer.data.files import read_json

    data = read_json(file)
    return isinstance(data, dict) and "model_type" in data


def read_run_config(source: str | Path) -> RunConfig:
    """``config.json`` of the run at (or holding) ``source``, checked: every error is one line that
    names the file and what is wrong."""
    run_dir = run_dir_of(source)
    file = run_dir / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (expected a switchformer run directory)")
    from switchformer.data.files import read_json

    saved = read_json(file)
    if not isinstance(saved, dict):
        raise ValueError(f"{file}: expected an object with 'train' and 'model' sections")
    if "model_type" in saved:  # a Hugging Face model directory, given where a run is needed
        raise ValueError(
            f"{run_dir}: a Hugging Face model directory, not a switchformer run; make a run of it with "
            f"`switchformer convert {run_dir} RUN` (or fine-tune it with `train --init-from {run_dir}`)"
        )
    for section in ("train", "model"):
        if not isinstance(saved.get(section), dict):
            raise ValueError(f"{file}: the '{section}' section is missing or not an object")
    run = RunConfig(run_dir, file, saved["train"], saved["model"])
    run.train  # validated now: a bad field is named with the file  # noqa: B018
    return run


def build_model_from_dict(family: str, values: dict, file: Path | str):
    """SwitchLM or SwitchT5 from a saved model config; errors name ``file``."""
    from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config

    try:
        if family == "lm":
            return SwitchLM(SwitchLMConfig.from_dict(values))
        return SwitchT5(SwitchT5Config.from_dict(values))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: model: {err}") from None


def load_run(source: str | Path, need_tokenizer: bool = True):
    """(model, tokenizer, train config) from a run directory (its latest checkpoint, else the
    ``model.safetensors`` of a converted run) or from one checkpoint directory. Reads only.
    Without ``need_tokenizer`` a run without ``tokenizer.json`` gives ``None`` for it (``info``,
    ``convert``: a converted checkpoint may come without one)."""
    from switchformer.data.tokenizer import load_tokenizer
    from switchformer.train.checkpoint import latest_checkpoint, load_model_weights

    path = Path(source)
    run = read_run_config(path)
    model = run.build_model()
    weights = path if (path / "state.json").exists() else latest_checkpoint(run.run_dir)
    if weights is None:
        weights = run.run_dir / "model.safetensors"  # a converted or consolidated run
    load_model_weights(model, weights)
    tokenizer = None
    if need_tokenizer or (run.run_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(run.run_dir)
        check_tokenizer_fits(tokenizer, model, run.run_dir / "tokenizer.json")
    return model.eval(), tokenizer, run.train


def check_tokenizer_fits(tokenizer, model, file) -> None:
    """A tokenizer whose ids reach past the model's embedding is another model's: refused, naming it."""
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"{file}: {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size "
            f"{model.config.vocab_size} (the tokenizer of another run?)"
        )
