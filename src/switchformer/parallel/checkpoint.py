"""Checkpoints of any layout with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards of the model and optimizer state in parallel, and any other layout (world size, expert
parallel size, FSDP or not, one process) reads them back, resharded by DCP.

What makes that work is one naming and one global shape for every tensor, whatever the layout:
:func:`checkpoint_state` presents each weight under its unsharded name (``...experts.w_in``, never
``.experts.local.``) as a DTensor of the unsharded model's shape, whose local part is this rank's
own storage. Expert shards: ``Shard(0)`` over ``ep`` (each rank of a row has ``E/P`` experts),
and over ``edp`` FSDP's ``Shard(1)`` or ``Shard(2)``, or ``Replicate()`` without FSDP; dense weights: FSDP's own
DTensors, or plain tensors when replicated (DCP saves one copy). Optimizer state (AdamW's
moments; the step count) follows its parameter, under ``optim.<name>.<field>``. DCP loads in
place, into the model's and optimizer's own tensors.

A consolidated ``model.safetensors`` (unsharded names and shapes, for single-process ``eval``,
``generate``, ``serve``, ``convert``) is written from the same state by DCP's Hugging Face writer:
each rank writes its shards, which are then merged one tensor at a time, so no rank ever holds the
whole model.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from switchformer.parallel.expert import global_name, is_expert_parameter
from switchformer.parallel.fsdp import local_tensor
from switchformer.parallel.groups import ParallelState
from switchformer.runs.files import RunFileError, short_message

DCP_FOLDER = "dcp"


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


def _as_global(name: str, tensor: torch.Tensor, state: ParallelState | None) -> torch.Tensor:
    """``tensor`` (a weight of ``name`` or its optimizer state) as the unsharded model's tensor:
    itself in one process, for a dense weight (FSDP's DTensor, or a replicated plain tensor) and
    for a step count; for an expert shard, a DTensor over the ``(edp, ep)`` mesh. Every non-scalar
    tensor of an expert shard (the weight, AdamW's moments, Adafactor's factored rows) has the
    experts first, so it is ``Shard(0)`` over ``ep``."""
    if state is None or not is_expert_parameter(name) or tensor.dim() == 0:
        return tensor
    full = (tensor.shape[0] * state.expert_parallel_size, *tensor.shape[1:])
    over_edp = tensor.placements[0] if isinstance(tensor, DTensor) else Replicate()  # FSDP: Shard(1) or (2)
    return DTensor.from_local(
        local_tensor(tensor),
        state.mesh,
        [over_edp, Shard(0)],
        run_check=False,
        shape=torch.Size(full),
        stride=_contiguous_stride(full),
    )


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: ParallelState | None) -> dict:
    """``{"model": {name: tensor}, "optim": {name: {field: tensor}}}`` under unsharded names,
    sharing storage with the model and optimizer (see the module's docstring)."""
    weights = {global_name(name): _as_global(name, t, state) for name, t in model.state_dict().items()}
    result = {"model": weights}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        moments = {}
        for param, entry in optimizer.state.items():
            name = names[id(param)]
            moments[global_name(name)] = {
                field: _as_global(name, value, state)
                for field, value in entry.items()
                if isinstance(value, torch.Tensor)
            }
        result["optim"] = moments
    return result


@torch.no_grad()
def load_full_state_into(targets: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Unsharded tensors (``full``, by unsharded name: a ``model.safetensors``) into ``targets``
    (:func:`checkpoint_state`'s), each rank copying only its own part.

    Raises KeyError naming a tensor ``full`` lacks, ValueError for one of another shape."""
    for name, target in targets.items():
        if name not in full:
            raise KeyError(f"{name}: missing")
        source = full[name]
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"{name}: shape {tuple(source.shape)}, the model has {tuple(target.shape)}")
        if isinstance(target, DTensor):  # this rank's part, cut locally (every rank holds the whole)
            part = distribute_tensor(source.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(part.to_local())
        else:
            target.copy_(source)


def ensure_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (zeros), so that a checkpoint can load into it:
    one step at learning rate 0 over zero gradients, which changes no weight."""
    if all(p in optimizer.state for group in optimizer.param_groups for p in group["params"]):
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr


# What DCP's ``.metadata`` pickle may name: its own dataclasses, tensor shapes, dtypes and layouts.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
# An entry of bytes makes DCP read its data with torch.load(weights_only=False); switchformer's
# checkpoints hold tensors only
_REFUSED = {"BytesStorageMetadata"}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` without running anything it names: only the classes DCP's own
    metadata is made of are found (torch's ``weights_only`` idea, for the one pickle DCP reads
    with plain ``pickle.load``)."""

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module in _METADATA_MODULES
            and name not in _REFUSED
            and isinstance(getattr(importlib.import_module(module), name, None), type)
        )
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"refused {module}.{name}: not part of a checkpoint's metadata")
        return super().find_class(module, name)


def read_metadata(directory: Path):
    """``directory/.metadata`` read by :class:`_MetadataUnpickler`, and every shard file it names
    checked to be there and long enough. Raises :class:`switchformer.runs.files.RunFileError`
    naming the file and what is wrong (before DCP, whose own errors are a traceback per rank)."""
    import torch.distributed.checkpoint as dcp

    file = Path(directory) / ".metadata"
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise RunFileError(file, "missing; DCP writes it last, so the checkpoint is incomplete") from None
    except Exception as err:  # refused, cut short, not a pickle
        raise RunFileError(file, f"damaged or not a DCP checkpoint's metadata ({short_message(err)})") from None
    if not isinstance(metadata, dcp.Metadata):
        raise RunFileError(file, f"not a DCP checkpoint's metadata (it holds a {type(metadata).__name__})")
    for key, entry in (metadata.state_dict_metadata or {}).items():
        if not isinstance(entry, dcp.TensorStorageMetadata):  # bytes would be unpickled by DCP
            raise RunFileError(
                file, f"{key} is not a tensor ({type(entry).__name__}); refused, switchformer saves tensors"
            )
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        path = str(getattr(info, "relative_path", ""))
        ends[path] = max(ends.get(path, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
    for path, end in sorted(ends.items()):
        shard = Path(directory) / path
        if not shard.is_file():
            raise RunFileError(shard, "missing: a shard of this checkpoint; the checkpoint is incomplete")
        if shard.stat().st_size < end:
            raise RunFileError(shard, f"cut short: {shard.stat().st_size} bytes, the metadata needs {end}")
    return metadata


def _safe_reader(directory: Path):
    """DCP's file reader, with ``.metadata`` read by :func:`read_metadata`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(directory))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(directory))


def save_dcp(directory: Path, model: nn.Module, optimizer, state: ParallelState | None) -> None:
    """Model and optimizer state into ``directory`` (every rank calls it; each writes its shards;
    ``state`` None: one process)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(str(directory))
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(checkpoint_state(model, optimizer, state), storage_writer=writer, no_dist=state is None)


def load_dcp(directory: Path, model: nn.Module, optimizer, state: ParallelState | None) -> None:
    """A DCP checkpoint of any layout into this rank's model and optimizer, in place.

    Raises :class:`switchformer.runs.files.RunFileError` naming the folder when it does not fit
    (another model, missing tensors)."""
    import torch.distributed.checkpoint as dcp

    read_metadata(Path(directory))  # a damaged or planted checkpoint is named before DCP reads it
    if optimizer is not None:
        ensure_optimizer_state(model, optimizer)
    target = checkpoint_state(model, optimizer, state)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=_safe_reader(directory), no_dist=state is None)
    except (Exception, dcp.CheckpointException) as err:  # DCP wraps each rank's failure (a BaseException)
        raise RunFileError(
            Path(directory),
            f"cannot be loaded into this model and optimizer: damaged or another model's ({_root_cause(err)})",
        ) from None


def _root_cause(err: BaseException) -> str:
    """The last line of an error (DCP's carry every rank's traceback), up to its first sentence."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__).split(". ")[0]


def export_safetensors(directory: Path, model: nn.Module, state: ParallelState) -> Path:
    """``directory/model.safetensors``: the whole model under unsharded names and shapes, written
    by every rank's shards and merged tensor by tensor (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    staging = directory / ".consolidating"
    writer = dcp.HuggingFaceStorageWriter(str(staging), save_distributed=True, enable_consolidation=True)
    dcp.save(checkpoint_state(model, None, state)["model"], storage_writer=writer)
    dist.barrier()
    final = directory / "model.safetensors"
    if state.is_main:
        merged = sorted(staging.glob("*.safetensors"))
        if len(merged) != 1:
            raise RuntimeError(f"{staging}: expected one consolidated safetensors file, found {len(merged)}")
        os.replace(merged[0], final)
        shutil.rmtree(staging)
    dist.barrier()
    return final
