"""Checkpoints: a directory per step, written atomically, loaded without unpickling code.

``checkpoints/step_000100/`` holds ``model.safetensors``, ``optimizer.pt`` (tensors and numbers
only, read back with ``weights_only=True``) and ``state.json`` (step, RNG state, counters). It is
written under a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest complete one. The run directory also holds ``config.json`` (how to
rebuild the model) and ``tokenizer.json``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step_"


def write_text_atomic(path: Path, text: str) -> None:
    """A temporary file in the same folder, synced, then renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, extra: dict, keep_last: int) -> Path:
    """One process: model, optimizer and state, renamed into place when complete."""
    tmp = begin_checkpoint(run_dir, step)
    try:
        write_checkpoint_files(tmp, step, model_state(model), optimizer.state_dict(), extra)
        return finish_checkpoint(tmp, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A temporary directory beside the final one (same filesystem, so the rename is atomic)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".{CHECKPOINT_PREFIX}{step:07d}."))


def write_checkpoint_files(
    tmp: Path,
    step: int,
    weights: dict | None,
    optimizer_state: dict | None,
    extra: dict,
    optimizer_name: str = "optimizer.pt",
) -> None:
    """``weights``: the full (consolidated) model state, written by one process; every process of a
    distributed run writes its own optimizer state under ``optimizer_name``."""
    if weights is not None:
        save_file(weights, str(tmp / "model.safetensors"))
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        (tmp / "state.json.part").write_text(json.dumps(dict(extra, step=step, rng=rng), indent=2))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / optimizer_name)


def finish_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Mark complete (state.json last), rename into place, prune old checkpoints."""
    os.replace(tmp / "state.json.part", tmp / "state.json")
    final = tmp.parent / tmp.name[1:].rsplit(".", 1)[0]
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(tmp.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: model weights not found")
    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{file}: weights do not match the model config: missing {sorted(missing)[:20]}, "
            f"unexpected {sorted(unexpected)[:20]}"
        )


def load_checkpoint(path: Path, model, optimizer, optimizer_name: str = "optimizer.pt", load_weights=None) -> dict:
    """Restore model (``load_weights(full_state)`` for a sharded model), optimizer and RNG; returns
    ``state.json``."""
    if load_weights is None:
        load_model_weights(model, path)
    else:
        load_weights(load_file(str(path / "model.safetensors")))
    file = path / optimizer_name
    if not file.exists():
        raise FileNotFoundError(
            f"{file}: no optimizer state for this process; resume with the number of "
            "processes the run was saved with (model weights load into any layout)"
        )
    optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    rng = torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return state
