"""Checkpoint folders of a run: their names, and whether each is complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

from switchformer.runs.files import CHECKPOINT_PREFIX, RunFileError

_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"\d+")


def is_checkpoint_folder(path: Path) -> bool:
    """A final-named checkpoint folder (``step_0000012``, complete or not; never a ``.step_*``
    temporary): only a complete save is renamed to such a name, so an incomplete one is damage
    (a file deleted or lost), never what a killed save left, and it is never removed."""
    return _CHECKPOINT_NAME.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()


def state_value(checkpoint: Path, key: str):
    """``key`` of checkpoint ``checkpoint``'s ``state.json``, or None when the file, its JSON or
    the key is missing: for hints read beside the checked load (``read_state``), never instead."""
    try:
        state = json.loads((Path(checkpoint) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get(key) if isinstance(state, dict) else None


def _dcp_format(path: Path) -> bool:
    """Whether checkpoint ``path`` was written with DCP (its ``dcp/`` folder, or its ``state.json``
    says so: the folder may be what is missing)."""
    return (path / "dcp").is_dir() or state_value(path, "checkpoint_format") == "dcp"


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint folder incomplete (None: its files are in place)."""
    missing = [name for name in ("model.safetensors", "state.json") if not (path / name).is_file()]
    if _dcp_format(path) and not (path / "dcp" / ".metadata").is_file():  # DCP writes it last
        missing.append("dcp/.metadata")
    return f"incomplete checkpoint: {' and '.join(missing)} missing" if missing else None


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder counts once its last file (``state.json``) is in place."""
    return path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and checkpoint_problem(path) is None


def checkpoint_folders(run_dir) -> list[Path]:
    """Every final-named checkpoint folder of a run, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_checkpoint_folder(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def damaged_latest_checkpoint(run_dir) -> tuple[Path, str, Path | None] | None:
    """``(folder, problem, earlier)`` when the newest final-named checkpoint folder is incomplete
    (``earlier``: the newest complete one before it, or None); None when it is complete or there
    is none."""
    folders = checkpoint_folders(run_dir)
    if not folders:
        return None
    problem = checkpoint_problem(folders[-1])
    if problem is None:
        return None
    earlier = [p for p in folders[:-1] if is_complete_checkpoint(p)]
    return folders[-1], problem, earlier[-1] if earlier else None


def damaged_checkpoint_error(run_dir) -> RunFileError | None:
    """The one-line error of ``--resume`` (and of a fresh ``train``) over a run whose latest
    checkpoint is incomplete: it names the folder and how to go on without it (None: not damaged)."""
    found = damaged_latest_checkpoint(run_dir)
    if found is None:
        return None
    folder, problem, earlier = found
    if earlier is not None:
        hint = f"to resume from {earlier.name} instead, move {folder.name} out of {folder.parent}"
    else:
        hint = (
            f"there is no earlier checkpoint: move {folder.name} out of {folder.parent} and start the run over "
            "with the `switchformer train` command that began it"
        )
    return RunFileError(folder, f"{problem}; {hint}")


def has_complete_checkpoint(run_dir) -> bool:
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(is_complete_checkpoint(p) for p in root.iterdir())
