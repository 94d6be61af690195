"""What state a run directory is in, and claiming it for a writer: leftovers of killed writers
removed, a run that never completed a checkpoint started over, ``--resume`` checked."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from switchformer.runs.checkpoints import checkpoint_folders, damaged_checkpoint_error, has_complete_checkpoint
from switchformer.runs.files import CHECKPOINT_PREFIX, LOCK_NAME, TEMP_FILE, RunInUseError
from switchformer.runs.lock import RunLock, describe_holder, lock_holder

log = logging.getLogger("switchformer")


def remove_leftovers(run_dir) -> list[str]:
    """Remove what killed writers left: temporary checkpoint folders (``checkpoints/.step_*``, of
    saves, replacements and prunings cut short) and temporary files of atomic writes. A final-named
    checkpoint folder is never removed, complete or not (see :func:`is_checkpoint_folder`). Only
    the holder of the run's lock may call this."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith("." + CHECKPOINT_PREFIX):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(f"checkpoints/{p.name}")
    if run_dir.is_dir():
        for p in sorted(run_dir.iterdir()):
            if TEMP_FILE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    if removed:
        log.info("%s: removed what an interrupted writer left: %s", run_dir, ", ".join(removed))
    return removed


def looks_like_a_run(run_dir) -> bool:
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints", LOCK_NAME))


def not_a_run_because(run_dir) -> str | None:
    """Why the folder's run-named files are not a switchformer run's (None: they are): a
    ``config.json`` without the ``train`` and ``model`` sections, or a ``checkpoints/`` holding
    anything but checkpoint folders."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return "config.json is not JSON"
        if not (isinstance(data, dict) and isinstance(data.get("train"), dict) and isinstance(data.get("model"), dict)):
            return "config.json is not a switchformer run's config"
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        other = [p.name for p in checkpoints.iterdir() if not p.name.lstrip(".").startswith("step_")]
        if other:
            return f"checkpoints/ holds {other[0]}"
    return None


def start_over(run_dir, writer_died: bool = False) -> list[str]:
    """A fresh ``train`` over a run that stopped before completing a checkpoint (killed, out of
    disk, failed): nothing in it can be resumed, so what it wrote is removed and the run starts
    over. Other files in the folder are left alone. Only the holder of the lock may call this."""
    run_dir = Path(run_dir)
    if has_complete_checkpoint(run_dir) or checkpoint_folders(run_dir) or (run_dir / "model.safetensors").exists():
        raise FileExistsError(f"{run_dir}: holds a run with a checkpoint; it is not started over")
    if not (writer_died or looks_like_a_run(run_dir)):
        return []
    foreign = not_a_run_because(run_dir)
    if foreign:  # never delete what switchformer did not write
        raise FileExistsError(f"{run_dir}: holds files that are not a switchformer run ({foreign}); choose another "
                              "--run-name or --out-dir")  # fmt: skip
    removed = []
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer.json"):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    for name in ("checkpoints", "tensorboard"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name + "/")
    removed += remove_leftovers(run_dir)
    if removed:
        log.warning(
            "%s: starting over: the run there stopped before saving a complete checkpoint; removed %s",
            run_dir,
            ", ".join(removed),
        )
    return removed


def no_checkpoint_message(run_dir) -> str:
    return (
        f"{run_dir}: no complete checkpoint to resume from: the run stopped before saving its first one; "
        "start it over with the `switchformer train` command that began it (the same --run-name: "
        "what the stopped run left is replaced)"
    )


def check_resumable(run_dir, probe_lock: bool = True) -> None:
    """Before ``train --resume``: one clear line when ``run_dir`` cannot be resumed (in use by
    another writer, when ``probe_lock``; no complete checkpoint; not a run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not found; --resume takes a run directory")
    holder = lock_holder(run_dir) if probe_lock else None
    if holder is not None:
        raise RunInUseError(
            f"{run_dir}: in use by another training ({describe_holder(holder)}); wait for it to finish or stop it"
        )
    damaged = damaged_checkpoint_error(run_dir)
    if damaged is not None:
        raise damaged
    if has_complete_checkpoint(run_dir) or (run_dir / "model.safetensors").exists():
        return
    if looks_like_a_run(run_dir) or (run_dir / "tokenizer.json").exists():
        raise FileNotFoundError(no_checkpoint_message(run_dir))
    raise FileNotFoundError(f"{run_dir}: not a switchformer run (no config.json, no checkpoint)")


def claim_run(run_dir, *, resume: bool, main: bool = True) -> RunLock | None:
    """What ``train`` does before anything else: the run's lock (rank 0 only), then, under it, the
    run's state: a fresh ``train`` refuses a run that holds a checkpoint (``--resume`` it) and
    starts over one that stopped before its first; ``--resume`` needs a complete checkpoint.
    Returns the held lock (None on other ranks); the caller releases it."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire() if main else None
    try:
        if resume:
            check_resumable(run_dir, probe_lock=main)  # rank 0 holds it; the other ranks must not probe
        elif has_complete_checkpoint(run_dir) or checkpoint_folders(run_dir):
            raise FileExistsError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --run-name")
        elif (run_dir / "model.safetensors").exists():
            raise FileExistsError(f"{run_dir}: holds a model (model.safetensors); choose another --run-name")
        elif lock is not None:
            start_over(run_dir, writer_died=bool(lock.took_over))
        if lock is not None and lock.fresh:
            remove_leftovers(run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
