"""Expert parallelism: each rank of an ``ep`` row holds ``E / P`` experts of every Switch layer and
runs the tokens any rank of the row routed to them, exchanged with all-to-all (see
:mod:`switchformer.parallel.groups` for the layout). Applied to a built model from outside.

Routing groups under expert parallelism: each rank routes its own local tokens (capacity is per
rank's local batch, or per ``group_size``/sequence as configured). One process reproduces a run
exactly with ``group_size`` set to the per-rank token count (the tests check this).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from switchformer.moe.dispatch import DispatchPlan
from switchformer.moe.experts import Experts
from switchformer.moe.layer import switch_layers
from switchformer.parallel.groups import ParallelState

# ----------------------------------------------------------------------------- all-to-all


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits: backward is the same exchange with
    the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ----------------------------------------------------------------------------- sharded experts


class ExpertParallelExperts(nn.Module):
    """Stands in for a layer's :class:`Experts`: holds ``E / P`` of them and runs all tokens routed
    to them by any rank of the EP group. ``forward(x, plan)`` has the same contract: rows sorted by
    global expert in, expert outputs in the same order out."""

    all_local = False  # tokens go to other ranks (SwitchMoE's few-token path and the static step need local)

    def __init__(self, experts: Experts, state: ParallelState):
        super().__init__()
        num_experts, p = experts.num_experts, state.expert_parallel_size
        if num_experts % p:
            raise ValueError(f"num_experts: {num_experts} experts cannot be split over {p} expert-parallel ranks")
        self.num_experts, self.num_local = num_experts, num_experts // p
        self.state = state
        first = state.ep_rank * self.num_local
        local = Experts(
            self.num_local,
            experts.d_model,
            experts.d_ff,
            activation=experts.activation,
            dropout=experts.dropout.p,
            init_scale=experts.init_scale,
            backend=experts.backend,
        )
        with torch.no_grad():  # slice the full, seeded tensors: EP=1 and EP=P start identical
            local.w_in.copy_(experts.w_in[first : first + self.num_local])
            local.w_out.copy_(experts.w_out[first : first + self.num_local])
        self.local = local
        self.first_expert = first

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        p, n_local, group = self.state.expert_parallel_size, self.num_local, self.state.ep_group
        counts = plan.tokens_per_expert  # [E] rows of this rank for every global expert
        # 1-2. exchange counts: recv[s, j] = rows rank s sends to my local expert j
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=group)
        send_splits = counts.view(p, n_local).sum(1).tolist()
        recv_counts = recv.view(p, n_local)
        recv_splits = recv_counts.sum(1).tolist()
        # 3. exchange tokens (rank-major, then local expert)
        received = all_to_all(x, recv_splits, send_splits, group)
        # 4. regroup expert-major, compute, undo
        order = _rank_major_to_expert_major(recv_counts)
        local_plan = DispatchPlan.for_counts(recv_counts.sum(0))
        computed = self.local(received.index_select(0, order), local_plan)
        restored = torch.empty_like(computed).index_copy(0, order, computed)
        # 5. send results back to where the tokens came from
        return all_to_all(restored, send_splits, recv_splits, group)


def _rank_major_to_expert_major(counts: Tensor) -> Tensor:
    """Row permutation taking [source rank][local expert] blocks to [local expert][source rank]
    (vectorised, on the tokens' device)."""
    p, n = counts.shape
    flat = counts.reshape(-1)
    source_starts = (torch.cumsum(flat, 0) - flat).view(p, n).t().reshape(-1)  # blocks, expert-major
    lengths = counts.t().reshape(-1)
    block_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=counts.device), lengths)
    target_starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(block_of_row.numel(), device=counts.device) - target_starts[block_of_row]
    return source_starts[block_of_row] + offset


def apply_expert_parallel(model: nn.Module, state: ParallelState) -> nn.Module:
    """Replace the experts of every Switch layer by this rank's shard (model built identically on
    every rank from the same seed first)."""
    for module in switch_layers(model):
        module.experts = ExpertParallelExperts(module.experts, state)
    return model


def is_expert_parameter(name: str) -> bool:
    """Whether ``name`` (a parameter of a model after :func:`apply_expert_parallel`) is an expert
    shard (held by one ``ep`` rank) rather than a weight every rank has."""
    return ".experts.local." in name or name.startswith("experts.local.")


def global_name(name: str) -> str:
    """The name a parameter has in the unsharded model (and in every checkpoint)."""
    name = name.replace(".experts.local.", ".experts.")
    return "experts." + name[len("experts.local.") :] if name.startswith("experts.local.") else name
