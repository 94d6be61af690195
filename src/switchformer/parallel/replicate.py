"""Plain data parallelism (``fsdp=false``): every rank keeps every dense weight (and its row's
experts) whole, and gradients are summed after backward in two flat all-reduces, one over the
world for dense weights, one over the ``edp`` column for expert shards, then divided by ``W``:
with the trainer's loss weights, the result is the gradient of the global batch's loss, exactly
what one process computes on it. Faster than FSDP2 for small models on few ranks (no all-gather
per layer); it needs the whole model and optimizer state on every rank.

Also the older checkpoint layout (expert shard files) for runs saved before DCP checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from switchformer.parallel.expert import is_expert_parameter
from switchformer.parallel.groups import ParallelState
from switchformer.routing import sync_bias_updates


def sum_over_world(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


@torch.no_grad()
def reduce_gradients(model: nn.Module, state: ParallelState) -> None:
    """Sum gradients over the data-parallel ranks (experts: over their EDP group), divide by W.

    The one synchronisation point of a data-parallel step, so it also brings the state updated
    outside autograd into agreement: the aux-loss-free routers' selection biases get one update
    over the load summed over every rank (:func:`switchformer.routing.sync_bias_updates`), the
    same on every replica and equal to one process on the global batch."""
    sync_bias_updates(model, sum_over_world)
    shared, expert = [], []
    for name, param in model.named_parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        (expert if is_expert_parameter(name) else shared).append(param.grad)
    for grads, group in ((shared, None), (expert, state.edp_group)):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= state.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# ----------------------------------------------------------------------------- checkpoints


def gather_full_state(model: nn.Module, state: ParallelState) -> dict[str, Tensor] | None:
    """The model's state dict with full (unsharded) expert tensors, on rank 0 of the world; None elsewhere."""
    full = {}
    for name, tensor in model.state_dict().items():
        if is_expert_parameter(name):
            parts = [torch.empty_like(tensor) for _ in range(state.expert_parallel_size)]
            dist.all_gather(parts, tensor.contiguous(), group=state.ep_group)
            full[name.replace(".experts.local.", ".experts.")] = torch.cat(parts, 0)
        else:
            full[name] = tensor
    return full if state.is_main else None


def shard_file_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank}-of-{ep_size}.safetensors"


def save_shards(model: nn.Module, state: ParallelState, directory) -> None:
    """Each rank of the first data-parallel replica (ranks ``0..P-1``) writes its expert shard;
    rank 0 also writes the shared (non-expert) weights. No tensor travels between ranks."""
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    own = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if state.rank < state.expert_parallel_size:
        experts = {
            name.replace(".experts.local.", ".experts."): t for name, t in own.items() if is_expert_parameter(name)
        }
        save_file(experts, str(directory / shard_file_name(state.ep_rank, state.expert_parallel_size)))
    if state.is_main:
        save_file({n: t for n, t in own.items() if not is_expert_parameter(n)}, str(directory / "shared.safetensors"))


def consolidate_shards(directory, ep_size: int) -> dict[str, Tensor]:
    """One unsharded state dict from ``shared.safetensors`` and the expert shard files."""
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    full = load_file(str(directory / "shared.safetensors"))
    shards = []
    for i in range(ep_size):
        file = directory / shard_file_name(i, ep_size)
        if not file.exists():
            raise FileNotFoundError(f"{file}: expert shard missing; cannot consolidate")
        shards.append(load_file(str(file)))
    for name in shards[0]:
        full[name] = torch.cat([shard[name] for shard in shards], 0)
    return full


def load_full_state(model: nn.Module, full: dict[str, Tensor], state: ParallelState | None) -> None:
    """Load an unsharded state dict into a model, sharded or not (any expert-parallel size)."""
    own = model.state_dict()
    converted = {}
    for name in own:
        if is_expert_parameter(name):
            source = full[name.replace(".experts.local.", ".experts.")]
            n_local = own[name].shape[0]
            first = state.ep_rank * n_local
            converted[name] = source[first : first + n_local]
        else:
            converted[name] = full[name]
    model.load_state_dict(converted)
