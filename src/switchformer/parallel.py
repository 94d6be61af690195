"""Expert and data parallelism over ``torch.distributed``, applied to a model from outside.

Process groups (world ``W``, expert-parallel size ``P``, ``W % P == 0``):

- expert-parallel (EP) groups: consecutive ranks ``[0..P-1], [P..2P-1], ...``; the experts of every
  Switch layer are split over the ranks of an EP group (rank ``i`` of the group holds experts
  ``[i*E/P, (i+1)*E/P)``), and tokens travel to them with all-to-all exchanges;
- expert-data-parallel (EDP) groups: the ranks that hold the same experts (same index in their EP
  group); expert gradients are summed over it;
- data parallelism: every other weight is replicated on all ranks and its gradient is summed over
  the whole world.

Gradients are then divided by ``W``: with equal local batches, the result is the gradient of the
mean loss over the concatenated global batch, exactly what one process computes on it.

Routing groups under expert parallelism: each rank routes its own local tokens (capacity is per
rank's local batch, or per ``group_size``/sequence as configured). One process reproduces a run
exactly with ``group_size`` set to the per-rank token count (the tests check this).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from switchformer.dispatch import DispatchPlan
from switchformer.experts import Experts
from switchformer.moe import SwitchMoE
from switchformer.routing import sync_bias_updates


@dataclass
class ParallelState:
    world_size: int
    rank: int
    expert_parallel_size: int
    ep_group: object  # dist.ProcessGroup
    edp_group: object

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(expert_parallel_size: int = 1, timeout_s: float = 120.0) -> ParallelState | None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs) and build the EP and
    EDP groups. Returns None when not launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and expert_parallel_size == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return make_groups(expert_parallel_size)


def make_groups(expert_parallel_size: int) -> ParallelState:
    world, rank = dist.get_world_size(), dist.get_rank()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"expert_parallel: world size {world} is not a multiple of {expert_parallel_size}")
    ep_group = edp_group = None
    for start in range(0, world, expert_parallel_size):  # every rank must create every group
        group = dist.new_group(list(range(start, start + expert_parallel_size)))
        if start <= rank < start + expert_parallel_size:
            ep_group = group
    for offset in range(expert_parallel_size):
        group = dist.new_group(list(range(offset, world, expert_parallel_size)))
        if rank % expert_parallel_size == offset:
            edp_group = group
    return ParallelState(world, rank, expert_parallel_size, ep_group, edp_group)


def check_same_config(config: dict, state: ParallelState) -> None:
    """Every rank must run the same configuration; a mismatch fails on all ranks at once."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) != 1:
        bad = [r for r, d in enumerate(gathered) if d != gathered[0]]
        raise ValueError(f"config: ranks {bad} run a different configuration than rank 0")


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
    for module in model.modules():
        if isinstance(module, SwitchMoE):
            module.experts = ExpertParallelExperts(module.experts, state)
    return model


def is_expert_parameter(name: str) -> bool:
    return ".experts.local." in name or name.startswith("experts.local.")


def _sum_over_world(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


@torch.no_grad()
def reduce_gradients(model: nn.Module, state: ParallelState) -> None:
    """Sum gradients over the data-parallel ranks (experts: over their EDP group), divide by W.

    The one synchronisation point of a data-parallel step, so it also brings the state updated
    outside autograd into agreement: the aux-loss-free routers' selection biases get one update
    over the load summed over every rank (:func:`switchformer.routing.sync_bias_updates`), the
    same on every replica and equal to one process on the global batch."""
    sync_bias_updates(model, _sum_over_world)
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
