"""How much memory each rank of a distributed run holds for the model's state: parameters,
gradients and optimizer state, in elements and bytes, for any world size ``W``, expert-parallel size
``P`` and sharding (see :mod:`switchformer.parallel.groups` and :mod:`~switchformer.parallel.fsdp`).

Exact for what lives through a step: the tests compare it with the tensors each rank of a real run
holds. Not counted: activations (they grow with batch and sequence length), the weights FSDP
gathers for one unit at a time (reported separately: :attr:`RankMemory.gathered`), communication
buffers, and the framework's own overhead (CUDA context, allocator caching).

Layout per tensor: an expert weight ``[E, a, b]`` is cut into ``E / P`` experts per rank, whose
second dimension (else third, whichever divides evenly) FSDP splits over the ``W / P`` ranks of the
column; a dense weight's first
dimension FSDP splits over all ``W`` ranks. FSDP splits as ``torch.chunk`` does (``ceil(n / k)``
rows each, the last ranks fewer or none). Without FSDP every rank holds every dense weight and its
``E / P`` experts whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from switchformer.parallel.fsdp import expert_shard_dim, local_tensor


@dataclass(frozen=True)
class RankMemory:
    """Elements one rank holds (multiply by the bytes per value: 4 for float32)."""

    parameters: int
    gradients: int
    optimizer: int
    gathered: int  # transient: the largest FSDP unit's whole weights, gathered for its forward/backward

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def _chunk(n: int, parts: int, index: int) -> int:
    """Rows of ``n`` that part ``index`` of ``parts`` gets from ``torch.chunk``."""
    size = math.ceil(n / parts)
    return max(0, min(size, n - index * size))


def _is_expert(name: str) -> bool:
    return ".experts." in name or name.startswith("experts.")


def local_shape(name: str, shape: tuple[int, ...], world: int, expert_parallel: int, rank: int, fsdp: bool):
    """The shape of the part of parameter ``name`` (of the unsharded model, shape ``shape``) that
    ``rank`` holds."""
    if _is_expert(name):
        shape = (shape[0] // expert_parallel, *shape[1:])
        if fsdp and len(shape) > 1:
            column = world // expert_parallel
            dim = expert_shard_dim(name, shape, column)
            shape = tuple(_chunk(size, column, rank // expert_parallel) if d == dim else size
                          for d, size in enumerate(shape))  # fmt: skip
        return shape
    if fsdp and shape:
        return (_chunk(shape[0], world, rank), *shape[1:])
    return shape


def _optimizer_elements(shape: tuple[int, ...], optimizer: str) -> int:
    """AdamW: two moments per value and a step count per tensor; Adafactor (not under FSDP): the
    row and column means of the last two dimensions, or the whole second moment of a vector."""
    if optimizer == "adamw":
        return 2 * math.prod(shape) + 1
    if len(shape) >= 2:
        return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] + 1
    return math.prod(shape) + 1


def estimate_rank_memory(
    model: nn.Module,
    world: int,
    expert_parallel: int = 1,
    rank: int = 0,
    fsdp: bool = True,
    optimizer: str = "adamw",
) -> RankMemory:
    """``rank``'s elements of parameters, gradients and optimizer state for ``model`` (the
    unsharded model; on the ``meta`` device costs nothing).

    Raises ValueError naming ``expert_parallel`` or ``world_size`` when the layout is impossible."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"world_size: must be >= 1 with rank in [0, world_size), got {world} and rank {rank}")
    if expert_parallel < 1 or world % expert_parallel:
        divisors = [p for p in range(1, world + 1) if world % p == 0]
        raise ValueError(
            f"expert_parallel: world size {world} is not a multiple of {expert_parallel}; give --expert-parallel "
            f"with one of {divisors}"
        )
    if optimizer not in ("adamw", "adafactor"):
        raise ValueError(f"optimizer: unknown {optimizer!r}; adamw or adafactor")
    params = optim = 0
    units: dict[str, int] = {}
    for name, param in model.named_parameters():
        shape = tuple(param.shape)
        if _is_expert(name) and shape[0] % expert_parallel:
            raise ValueError(
                f"num_experts: {shape[0]} experts cannot be split over {expert_parallel} expert-parallel ranks ({name})"
            )
        mine = local_shape(name, shape, world, expert_parallel, rank, fsdp)
        params += math.prod(mine)
        optim += _optimizer_elements(mine, optimizer)
        whole = math.prod(shape) // (expert_parallel if _is_expert(name) else 1)
        unit = _unit_of(name)
        units[unit] = units.get(unit, 0) + whole
    gathered = max(units.values(), default=0) if fsdp and world > 1 else 0
    return RankMemory(parameters=params, gradients=params, optimizer=optim, gathered=gathered)


def _unit_of(name: str) -> str:
    """The FSDP unit a parameter belongs to (see :func:`switchformer.parallel.fsdp.apply_fsdp`):
    a layer's experts, a block, T5's position bias, or the root."""
    parts = name.split(".")
    if "experts" in parts:
        return ".".join(parts[: parts.index("experts") + 1])
    if "relative_attention_bias" in parts:
        return ".".join(parts[: parts.index("relative_attention_bias") + 1])
    if "blocks" in parts:
        return ".".join(parts[: parts.index("blocks") + 2])
    return "<root>"


def _mib(elements: int, bytes_per_value: int) -> str:
    size = elements * bytes_per_value / 2**20
    if size < 1:
        return f"{size * 1024:,.1f} KiB"
    return f"{size:,.1f} MiB" if size < 10 * 1024 else f"{size / 1024:,.1f} GiB"


def memory_report(
    model: nn.Module, world: int, expert_parallel: int, fsdp: bool, optimizer: str = "adamw", bytes_per_value: int = 4
) -> list[str]:
    """The lines ``switchformer info --world-size W --expert-parallel P`` prints: the fullest rank's
    parameters, gradients and optimizer state (float32 unless ``bytes_per_value`` says otherwise)."""
    if world < 1:
        raise ValueError(f"--world-size: must be >= 1, got {world}")
    if expert_parallel < 1:
        raise ValueError(f"--expert-parallel: must be >= 1, got {expert_parallel}")
    if fsdp and world > 1 and optimizer == "adafactor":
        raise ValueError("optimizer: this run's adafactor needs weights whole on every rank: add --no-fsdp")
    ranks = [estimate_rank_memory(model, world, expert_parallel, r, fsdp, optimizer) for r in range(world)]
    top = max(ranks, key=lambda m: m.total)
    layout = "FSDP2: weights sharded" if fsdp else "replicated weights (fsdp=false)"
    if world == 1:
        layout = "one process"
    lines = [
        f"  memory per rank: world {world}, expert parallel {expert_parallel}, {layout}; {optimizer}, "
        f"{bytes_per_value} bytes per value (the fullest rank):",
        f"    parameters       {_mib(top.parameters, bytes_per_value):>12}  ({top.parameters:,} values)",
        f"    gradients        {_mib(top.gradients, bytes_per_value):>12}",
        f"    optimizer state  {_mib(top.optimizer, bytes_per_value):>12}",
        f"    total            {_mib(top.total, bytes_per_value):>12}",
    ]
    if top.gathered:
        lines.append(
            f"    + up to {_mib(top.gathered, bytes_per_value)} gathered at a time (the largest FSDP unit's "
            "whole weights, during its forward and backward)"
        )
    lines.append("    activations are not counted: they grow with batch_size x seq_len")
    return lines


def held_elements(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Elements of parameters, gradients and optimizer state this process holds (its shards only)."""
    params = list(model.parameters())
    return {
        "parameters": sum(local_tensor(p).numel() for p in params),
        "gradients": sum(local_tensor(p.grad).numel() for p in params if p.grad is not None),
        "optimizer": sum(
            local_tensor(v).numel() for entry in optimizer.state.values() for v in entry.values() if torch.is_tensor(v)
        ),
    }
