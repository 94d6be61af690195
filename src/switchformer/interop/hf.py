"""Hugging Face interop: load ``SwitchTransformersForConditionalGeneration`` and dense
``T5ForConditionalGeneration`` checkpoints (a directory or an in-memory model) into
:class:`SwitchT5`, and export back to a directory ``transformers`` loads.

Reading a directory needs only ``safetensors`` and ``torch`` (no ``transformers``): ``config.json``
plus ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
(sharded or not) read with ``torch.load(weights_only=True)``, so no pickled code ever runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from switchformer.data.files import read_json
from switchformer.interop.hf_config import config_from_hf, config_to_hf
from switchformer.interop.hf_weights import (
    expert_sources_from_hf,
    load_directory_weights,
    state_dict_from_hf,
    state_dict_to_hf,
)
from switchformer.models.placement import place_weights, plan_placement
from switchformer.models.t5 import SwitchT5
from switchformer.runs.files import default_file_mode, write_text_atomic

log = logging.getLogger("switchformer")


def from_hf(source, *, dtype: str | None = None, max_memory: int | None = None, device=None) -> SwitchT5:
    """A :class:`SwitchT5` with the weights and outputs of a HF Switch/T5 model or checkpoint dir.

    A directory is read memory-mapped into a model built on the meta device, so loading holds each
    weight once. ``dtype`` (``float32``, ``bfloat16``, ``int8``: int8 experts; None: the checkpoint's
    own) and ``max_memory`` (bytes; None: no budget) decide what is resident and what is offloaded
    (:mod:`switchformer.models.placement`); ``device`` (default: the CPU) is where it is computed.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file or setting that is wrong."""
    if isinstance(source, nn.Module):
        if max_memory is not None or dtype == "int8":
            raise ValueError(
                "from_hf: --dtype int8 and --max-memory need a checkpoint directory, not a model in memory"
            )
        hf_config = source.config.to_dict()
        hf_state = {k: v.detach() for k, v in source.state_dict().items()}
        config = config_from_hf(hf_config)
        state = state_dict_from_hf(hf_state, config, hf_config.get("model_type"))
        with torch.device("meta"):
            model = SwitchT5(config)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(dtype=getattr(torch, dtype) if dtype else next(iter(state.values())).dtype)
        return model.to(device) if device is not None else model
    path = Path(source)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found (expected a Hugging Face model directory)")
    hf_config = read_json(config_file)
    hf_state = load_directory_weights(path)
    config = config_from_hf(hf_config)
    flavour = hf_config.get("model_type")
    with torch.device("meta"):
        model = SwitchT5(config)
    if dtype is None:  # the checkpoint's own precision, as transformers' torch_dtype="auto"
        dtype = str(hf_state.meta(next(iter(hf_state))).dtype).removeprefix("torch.")
        dtype = dtype if dtype in ("float32", "bfloat16") else "float32"
    placement = plan_placement(model, dtype, max_memory, device)
    state = state_dict_from_hf(hf_state, config, flavour, experts=False)
    return place_weights(model, placement, state, expert_sources_from_hf(hf_state, config, flavour))


def to_hf(model: SwitchT5, out_dir) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` loads; atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config)
    state = {k: v.detach().cpu() for k, v in state_dict_to_hf(model).items()}
    _atomic_write(out / "model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"}))
    write_text_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def _atomic_write(target: Path, write) -> None:
    """``write(path)`` into a temporary file beside ``target``, then renamed over it: the weights are
    written by safetensors straight to a file, never held twice in memory as bytes."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would keep others from reading the export
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
