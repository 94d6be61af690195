"""Plain data parallelism (``fsdp=false``): every rank keeps every dense weight (and its row's
experts) whole, and gradients are summed after backward in two flat all-reduces, one over the
world for dense weights, one over the ``edp`` column for expert shards, then divided by ``W``:
with the trainer's loss weights, the result is the gradient of the global batch's loss, exactly
what one process computes on it. Faster than FSDP2 for small models on few ranks (no all-gather
per layer); it needs the whole model and optimizer state on every rank. Its checkpoints are DCP's,
as FSDP's are (:mod:`switchformer.parallel.checkpoint`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from switchformer.moe.routing import sync_bias_updates
from switchformer.parallel.expert import is_expert_parameter
from switchformer.parallel.groups import ParallelState


def sum_over_world(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


@torch.no_grad()
def reduce_gradients(model: nn.Module, state: ParallelState) -> None:
    """Sum gradients over the data-parallel ranks (experts: over their EDP group), divide by W.

    The one synchronisation point of a data-parallel step, so it also brings the state updated
    outside autograd into agreement: the aux-loss-free routers' selection biases get one update
    over the load summed over every rank (:func:`switchformer.moe.routing.sync_bias_updates`), the
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
