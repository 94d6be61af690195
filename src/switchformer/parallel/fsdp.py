"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the run's mesh, applied from outside the model.

- Expert shards (each rank's ``E / P`` experts, after :func:`~switchformer.parallel.expert.apply_expert_parallel`)
  are sharded over the ``edp`` column, on their second dimension (``d_model`` of ``w_in``, ``d_ff``
  of ``w_out``) or else their third, whichever the column divides (:func:`expert_shard_dim`): the
  first, the expert dimension, is often smaller than the column (torchtitan shards it on the
  second then too). Their gradients are summed over the column and divided by the whole world ``W``,
  not the column's size, since every dense gradient is a mean over ``W`` ranks too.
- Every transformer block is one FSDP unit over the whole world (``dp``); the root unit holds
  the rest (embeddings, final norms). All-gathers of the next block overlap the current one's
  compute and the reduce-scatter of gradients overlaps backward: the engine does it, not a loop
  after backward.

Gradient clipping over sharded gradients: :func:`grad_norm` (the norm of the whole model's
gradient, exactly what one process computes).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from switchformer.parallel.expert import ExpertParallelExperts, is_expert_parameter
from switchformer.parallel.groups import ParallelState


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of either model family, in order (LM ``blocks``; T5 encoder's then decoder's)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "blocks":
            blocks.extend(module)
    return blocks


def expert_shard_dim(name: str, shape: tuple[int, ...], column: int) -> int:
    """The dimension FSDP shards an expert shard ``[E/P, a, b]`` on over a column of ``column``
    ranks: the second (``d_model`` of ``w_in``, ``d_ff`` of ``w_out``), else the third, whichever
    ``column`` divides (FSDP2 shards unevenly only on the first, and the first, the experts, is
    split by expert parallelism already).

    Raises ValueError naming the weight and the settings that would fit."""
    if column == 1:
        return 1
    for dim in (1, 2):
        if dim < len(shape) and shape[dim] % column == 0:
            return dim
    sizes = " or ".join(str(size) for size in shape[1:3])
    raise ValueError(
        f"fsdp: {name} {list(shape)} cannot be split evenly over the {column} ranks that hold the same experts "
        f"(FSDP2 shards it on its second or third dimension, {sizes}, one of which must be a multiple of {column}); "
        "choose the number of processes and expert-parallel size so that processes / expert_parallel divides one, "
        "or keep weights whole (train: --set fsdp=false; info: --no-fsdp)"
    )


def apply_fsdp(model: nn.Module, state: ParallelState) -> nn.Module:
    """Shard ``model`` (already expert-parallel and on its device) in place; returns it.

    The methods other than ``forward`` that run the model (``generate``, ``encode``, ``decode``)
    are registered, so that the root's weights are gathered for them too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    world = state.world_size
    edp_mesh = state.mesh["edp"]
    column = edp_mesh.size()
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            dims = {param: expert_shard_dim(f"{name}.{n}", tuple(param.shape), column)
                    for n, param in module.local.named_parameters()}  # fmt: skip
            fully_shard(module.local, mesh=edp_mesh, shard_placement_fn=lambda param, dims=dims: Shard(dims[param]))
            module.local.set_gradient_divide_factor(float(world))
            if edp_mesh.size() > 1:
                # gloo has no pre-multiplied sum: sum, then scale (also exact on NCCL). Not on a
                # column of one rank, where torch 2.13 would divide by the factor twice.
                module.local.set_force_sum_reduction_for_comms(True)
    for name, module in model.named_modules():
        # T5's relative position bias lives in the first block but the stack calls it before any
        # block runs: a unit of its own, gathered when called
        if name.endswith("relative_attention_bias"):
            fully_shard(module, mesh=state.dp_mesh)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=state.dp_mesh)
    fully_shard(model, mesh=state.dp_mesh)
    for method in ("generate", "encode", "decode"):
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


@contextlib.contextmanager
def whole_weights(model: nn.Module):
    """Every FSDP unit of ``model`` gathered for the duration of the block, so that code calling
    into submodules directly (generation's key/value caches, T5's cross-attention projections)
    sees whole weights; resharded after. Costs the whole model's weights on every rank: for a
    short sample, not for training."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard; a plain tensor itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def grad_norm(model: nn.Module, state: ParallelState) -> float:
    """The L2 norm of the whole model's gradient (every expert of every rank, every dense weight
    once), the same on every rank.

    Sharded (FSDP): every rank holds a distinct piece of every gradient, so the squares summed over
    the world are the total. Replicated: dense gradients are whole on every rank (already
    reduced); expert shards differ along the ``ep`` row only."""
    device = local_tensor(next(model.parameters())).device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    dense, expert = [zero], [zero]
    for name, param in model.named_parameters():
        if param.grad is not None:  # summed on the device: one host sync for the whole model
            (expert if is_expert_parameter(name) else dense).append(
                local_tensor(param.grad).detach().double().pow(2).sum()
            )
    dense_sq, expert_sq = torch.stack(dense).sum(), torch.stack(expert).sum()
    if state.fsdp:
        total = dense_sq + expert_sq
        dist.all_reduce(total)
    else:
        dist.all_reduce(expert_sq, group=state.ep_group)
        total = dense_sq + expert_sq
    return math.sqrt(float(total))


@torch.no_grad()
def scale_gradients(model: nn.Module, scale: float) -> None:
    for param in model.parameters():
        if param.grad is not None:
            local_tensor(param.grad).mul_(scale)
