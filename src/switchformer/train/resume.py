"""``train --resume``: which checkpoint a run continues from, and loading it into this process's layout.

Three formats are read, whatever layout the run now has:
- a DCP checkpoint (``dcp/``, written by every run under torchrun): DCP reshards it to this layout;
- a single-process checkpoint (``model.safetensors`` and ``optimizer.pt``): in one process as it is;
  on several, every rank reads the whole files and keeps its part;
- a run with weights of its own and no checkpoint (converted, upcycled, consolidated): its weights,
  a fresh optimizer, step 0.

The hand-written shard layout of multi-process runs before DCP (``optimizer-rank*.pt`` beside a
``model.safetensors``, no ``dcp/``) is no longer read: such a checkpoint is refused with one line
saying which version reads it (see CHANGELOG.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

from switchformer.parallel import (
    DCP_FOLDER,
    checkpoint_state,
    ensure_optimizer_state,
    global_name,
    load_dcp,
    load_full_state_into,
)
from switchformer.runs.files import RunFileError, short_message
from switchformer.runs.state import no_checkpoint_message
from switchformer.train.checkpoint import (
    load_checkpoint,
    load_model_weights,
    read_optimizer_state,
    read_safetensors,
    read_state,
    restore_rng,
    resume_checkpoint,
    with_earlier_hint,
)
from switchformer.train.layout import check_global_batch

log = logging.getLogger("switchformer")

# the last commit whose trainer wrote (and read) the hand-written shard layout
LEGACY_SHARDS_VERSION = "switchformer before commit 5e2e4ae (2026-11, DCP checkpoints)"


def resume(run_dir: Path, model, optimizer, parallel, config, world: int) -> tuple[dict, Path]:
    """Load the checkpoint ``run_dir`` continues from into ``model`` and ``optimizer`` (this process's
    part of them under ``parallel``); returns its ``state.json`` (``step`` 0 for a run with weights of
    its own) and where it came from. Raises ``FileNotFoundError`` for a run with nothing to resume,
    :class:`RunFileError` naming a damaged file, ``ValueError`` for a global batch that changed."""
    checkpoint = resume_checkpoint(run_dir)  # an incomplete newest one is named, not skipped
    if checkpoint is None and (run_dir / "model.safetensors").exists():
        checkpoint = run_dir  # a converted run: its weights, a fresh optimizer, step 0
    if checkpoint is None:
        raise FileNotFoundError(no_checkpoint_message(run_dir))
    if (checkpoint / DCP_FOLDER).is_dir():  # any layout: DCP reshards to this one
        state = read_state(checkpoint)
        try:
            load_dcp(checkpoint / DCP_FOLDER, model, optimizer, parallel)
        except RunFileError as err:
            raise with_earlier_hint(checkpoint, err) from None
        restore_rng(state)
    elif checkpoint == run_dir:
        if parallel is None:
            load_model_weights(model, run_dir)
        else:
            load_full_weights(model, parallel, read_safetensors(run_dir / "model.safetensors"))
        return {"step": 0}, checkpoint
    elif not (checkpoint / "optimizer.pt").is_file() and any(checkpoint.glob("optimizer-rank*.pt")):
        raise RunFileError(checkpoint, f"a checkpoint in the hand-written shard layout (optimizer-rank*.pt) that "
                           f"{LEGACY_SHARDS_VERSION} wrote; resume it with that version")  # fmt: skip
    elif parallel is not None:
        state = load_one_process_checkpoint(checkpoint, model, optimizer, parallel)  # saved by one, resumed on many
    else:
        state = load_checkpoint(checkpoint, model, optimizer)
    check_global_batch(config, state, world)
    log.info("resumed from %s at step %d", checkpoint, state["step"])
    return state, checkpoint


def load_full_weights(model, parallel, full: dict) -> None:
    """An unsharded state dict (``model.safetensors``) into this rank's model, any layout."""
    if parallel is None:
        model.load_state_dict(full)
        return
    load_full_state_into(checkpoint_state(model, None, parallel)["model"], full)


def load_one_process_checkpoint(checkpoint: Path, model, optimizer, parallel) -> dict:
    """A single-process checkpoint (``model.safetensors``, ``optimizer.pt``) into this rank's shards:
    every rank reads the whole files and keeps its part. ``optimizer.pt`` numbers the parameters in the
    optimizer's order (:func:`~switchformer.train.optimizer.build_optimizer`'s groups), the same in
    every layout, which gives each saved state its parameter's name."""
    state = read_state(checkpoint)
    ensure_optimizer_state(model, optimizer)
    targets = checkpoint_state(model, optimizer, parallel)
    full = {"model": read_safetensors(checkpoint / "model.safetensors")}
    saved = read_optimizer_state(checkpoint / "optimizer.pt")
    names = {id(p): global_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    try:
        full["optim"] = {order[int(index)]: entry for index, entry in saved["state"].items()}
        for part in ("model", "optim"):
            load_full_state_into(flatten(targets[part]), flatten(full[part]))
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise RunFileError(checkpoint, f"does not fit this model and optimizer ({short_message(err)})") from None
    restore_rng(state)
    return state


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": t}}`` as ``{"a.b": t}``: a nested state dict's leaves by dotted name."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
