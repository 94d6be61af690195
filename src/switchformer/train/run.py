"""A run as its commands use it: the train section as a :class:`TrainConfig`, the model rebuilt from
the model section with the latest weights, the tokenizer. Built on the run format's one reader
(:mod:`switchformer.runs.directory`); nothing here writes.

The model is always rebuilt from ``model``; ``train``'s size fields describe how a fresh run was
asked for, and a converted checkpoint's architecture (``d_kv``, decoder depth, untied embeddings,
absolute ``expert_capacity``) may hold more than they can say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from switchformer.data.tokenizer import load_tokenizer
from switchformer.models import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config
from switchformer.runs.directory import read_sections
from switchformer.train.checkpoint import latest_checkpoint, load_model_weights
from switchformer.train.config import TrainConfig, with_model_settings
from switchformer.train.inference_weights import holds_int8_experts, load_placed_weights
from switchformer.train.sources import config_from_sources


@dataclass
class RunConfig:
    run_dir: Path
    file: Path  # the config.json it was read from
    saved_train: dict  # the train section as saved (without the settings the model section holds)
    model_values: dict  # the architecture, as saved

    @property
    def train_values(self) -> dict:
        """Every training setting of the run: the train section with the model section's settings."""
        return with_model_settings(self.saved_train, self.model_values)

    @property
    def train(self) -> TrainConfig:
        where = str(self.file)
        config_from_sources(self.saved_train, dict.fromkeys(self.saved_train, where))  # what is stored, checked
        values = self.train_values
        return config_from_sources(values, dict.fromkeys(values, where))

    def build_model(self):
        """The model this run describes, freshly initialised (weights are loaded separately)."""
        return build_model_from_dict(self.saved_train.get("model", "lm"), self.model_values, self.file)


def read_run_config(source: str | Path) -> RunConfig:
    """``config.json`` of the run at (or holding) ``source``, checked: every error is one line that
    names the file and what is wrong (its train section validated as a :class:`TrainConfig`)."""
    sections = read_sections(source)
    run = RunConfig(sections.run_dir, sections.file, sections.train_values, sections.model_values)
    run.train  # validated now: a bad field is named with the file  # noqa: B018
    return run


def build_model_from_dict(family: str, values: dict, file: Path | str):
    """SwitchLM or SwitchT5 from a saved model config; errors name ``file``."""
    try:
        if family == "lm":
            return SwitchLM(SwitchLMConfig.from_dict(values))
        return SwitchT5(SwitchT5Config.from_dict(values))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: model: {err}") from None


def load_run(
    source: str | Path, need_tokenizer: bool = True, *, dtype: str | None = None, max_memory: int | None = None,
    device=None,
):  # fmt: skip
    """(model, tokenizer, train config) from a run directory (its latest checkpoint, else the
    ``model.safetensors`` of a converted run) or from one checkpoint directory. Reads only.
    Without ``need_tokenizer`` a run without ``tokenizer.json`` gives ``None`` for it (``info``,
    ``convert``: a converted checkpoint may come without one). ``dtype`` (float32, bfloat16, int8)
    and ``max_memory`` (bytes) load for inference as :mod:`switchformer.models.placement` plans,
    memory-mapped, on ``device``; without them the model is float32 on the CPU, as trained."""
    path = Path(source)
    run = read_run_config(path)
    weights = path if (path / "state.json").exists() else latest_checkpoint(run.run_dir)
    if weights is None:
        weights = run.run_dir / "model.safetensors"  # a converted or consolidated run
    if dtype is None and holds_int8_experts(weights):  # stored int8 (convert --dtype int8): kept so
        dtype = "int8"
    if dtype is None and max_memory is None and device is None:
        model = run.build_model()
        load_model_weights(model, weights)
    else:
        with torch.device("meta"):
            model = run.build_model()
        model = load_placed_weights(model, weights, dtype or "float32", max_memory, device)
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


def build_model(config: TrainConfig, vocab_size: int, model_config: dict | None = None) -> torch.nn.Module:
    """The model a fresh run asks for (``config``'s sizes), or, given ``model_config`` (a run's saved
    ``model`` section: the one truth for a run's architecture), exactly that model."""
    if model_config is not None:
        return build_model_from_dict(config.model, model_config, "config.json")
    built = config.model_config(vocab_size)
    return SwitchLM(built) if config.model == "lm" else SwitchT5(built)
