"""A run directory's own files: ``config.json`` (the one source of truth for the model's architecture
and the training settings), the weights and the tokenizer. One reader of their raw form
(:func:`read_sections`) and one writer (:func:`write_run`); what the sections mean (a ``TrainConfig``,
a model) is read a floor up, in :mod:`switchformer.train.run`.

A run directory holds ``config.json`` with two sections, ``train`` (the training settings) and
``model`` (the model's own config: ``SwitchLMConfig`` or ``SwitchT5Config``), beside checkpoints
(``checkpoints/step_*``), or a ``model.safetensors`` of its own (a converted, upcycled or consolidated
run), and ``tokenizer.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switchformer.runs.files import read_json, write_file_atomic, write_json_atomic


@dataclass
class Sections:
    """The raw sections of a run's ``config.json``."""
    run_dir: Path
    file: Path  # the config.json they were read from
    train_values: dict
    model_values: dict
    extra: dict  # any other top-level entries (what made a distilled or upcycled run)


def run_dir_of(source: str | Path) -> Path:
    """The run directory of ``source``: itself, or the run holding the checkpoint ``source``.
    ``FileNotFoundError`` when ``source`` does not exist, ``NotADirectoryError`` when it is a file
    (each naming ``source``, not a file inside it)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected a run directory, a checkpoint or a model folder)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: a file, not a run directory (give the folder a run was trained into)")
    return path.parent.parent if (path / "state.json").exists() else path


def is_hugging_face_source(source: str | Path) -> bool:
    """True for a Hugging Face model directory (its ``config.json`` has ``model_type``), False for
    a switchformer run or checkpoint. Raises a one-line error naming a missing or invalid
    ``config.json``."""
    file = run_dir_of(source) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face directory or a switchformer run)")
    data = read_json(file)
    return isinstance(data, dict) and "model_type" in data


def read_sections(source: str | Path) -> Sections:
    """``config.json`` of the run at (or holding) ``source``, checked for its shape: every error is
    one line that names the file and what is wrong."""
    run_dir = run_dir_of(source)
    file = run_dir / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: not found (expected a switchformer run directory)")
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
    extra = {k: v for k, v in saved.items() if k not in ("train", "model")}
    return Sections(run_dir, file, saved["train"], saved["model"], extra)


def write_run(run_dir: str | Path, train: dict, model: dict, *, weights=None,
              tokenizer: Path | None = None, extra: dict | None = None) -> None:  # fmt: skip
    """The one writer of a run's own files, each atomically: ``config.json`` (``train`` and ``model``
    sections, then ``extra`` entries), ``model.safetensors`` when ``weights`` (its serialised bytes,
    or a function writing them to a file descriptor: :func:`~switchformer.runs.safetensors_stream.
    streamed_safetensors`) are given, and a copy of ``tokenizer``. ``run_dir`` is created if needed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        write_file_atomic(run_dir / "model.safetensors", weights)
    if tokenizer is not None:
        write_file_atomic(run_dir / "tokenizer.json", Path(tokenizer).read_bytes())
    write_json_atomic(run_dir / "config.json", {"train": train, "model": model, **(extra or {})})
