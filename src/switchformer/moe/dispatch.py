"""Token permutation for mixture-of-experts layers, and the grouped matmul the experts run on.

The algorithm, as named functions:

1. :func:`plan_dispatch`: stable sort of the router's assignments by (expert, group), each
   assignment's position within its expert and group, the capacity mask, tokens per expert.
2. gather: ``x[plan.token]`` gives the kept tokens in expert-major order.
3. :func:`grouped_linear`: each expert's rows times that expert's weight matrix, with one of
   three interchangeable backends (``grouped_mm``, ``padded`` batched matmul, ``loop``).
4. :func:`combine`: scale by the gates and add back into token order; tokens that no expert
   kept (dropped by capacity, or padding) get exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "grouped_mm", "padded", "loop")


# ----------------------------------------------------------------------------- planning


@dataclass
class DispatchPlan:
    """Which assignments the experts process, in expert-major order, and how many per expert."""

    assignment: Tensor  # [M] indices into the router's flat assignment list, sorted by expert
    token: Tensor  # [M] token index of each kept assignment
    gate: Tensor  # [M] float32 gate of each kept assignment
    tokens_per_expert: Tensor  # [N] int64, after capacity
    demand_per_expert: Tensor  # [N] int64, before capacity
    routed: Tensor  # scalar int64: assignments of real (unmasked) tokens
    num_experts: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_counts(cls, tokens_per_expert: Tensor) -> DispatchPlan:
        """A plan for rows already grouped by expert (expert parallelism computes received tokens)."""
        empty = tokens_per_expert.new_zeros(0)
        total = tokens_per_expert.sum()
        return cls(empty, empty, empty.float(), tokens_per_expert, tokens_per_expert, total, tokens_per_expert.numel())

    @property
    def dropped(self) -> Tensor:
        return self.routed - self.tokens_per_expert.sum()

    def counts_list(self) -> list[int]:
        """Tokens per expert on the host (one device sync, cached)."""
        if "counts" not in self._cache:
            self._cache["counts"] = self.tokens_per_expert.tolist()
        return self._cache["counts"]

    def offsets(self) -> Tensor:
        """int32 cumulative ends of each expert's rows, the ``offs`` of ``grouped_mm``."""
        if "offsets" not in self._cache:
            self._cache["offsets"] = torch.cumsum(self.tokens_per_expert, 0).to(torch.int32)
        return self._cache["offsets"]

    def padded_slots(self) -> tuple[Tensor, int]:
        """Slot of each row in an ``[N, C]`` padded layout, and ``C`` (the largest expert batch)."""
        if "padded" not in self._cache:
            counts = self.tokens_per_expert
            width = max(self.counts_list(), default=0)
            expert_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(expert_of_row.numel(), device=counts.device) - starts[expert_of_row]
            self._cache["padded"] = (expert_of_row * width + position, width)
        return self._cache["padded"]


def plan_dispatch(
    token: Tensor,
    expert: Tensor,
    gate: Tensor,
    *,
    num_experts: int,
    num_groups: int,
    tokens_per_group: int,
    capacity: int | None,
    all_routed: bool = False,
) -> DispatchPlan:
    """Sort assignments by expert, keep the first ``capacity`` of each expert in each group.

    ``token``/``expert``/``gate`` are the router's flat assignments in priority order; ``expert ==
    num_experts`` means "not routed". ``capacity=None`` keeps everything (dropless).
    ``all_routed=True`` promises that no assignment is ``num_experts`` (no padding mask): a dropless
    plan then needs no device-to-host sync at all.
    """
    group = torch.div(token, tokens_per_group, rounding_mode="floor")
    key = expert * num_groups + group  # expert-major, then group; priority order kept by the stable sort
    sorted_key, order = torch.sort(key, stable=True)
    # a scatter-add rather than bincount: on CUDA bincount reads the largest key back to the host
    # (a sync that stalls the launch queue); the number of segments is known here
    segment_sizes = key.new_zeros((num_experts + 1) * num_groups).scatter_add_(0, key, torch.ones_like(key))
    segment_starts = torch.cumsum(segment_sizes, 0) - segment_sizes
    position = torch.arange(key.numel(), device=key.device) - segment_starts[sorted_key]

    routed_sizes = segment_sizes[: num_experts * num_groups].view(num_experts, num_groups)
    # keep=None: every assignment is kept, so no boolean mask (whose size the host must read)
    keep = None if all_routed else sorted_key < num_experts * num_groups
    if capacity is None:
        kept_sizes = routed_sizes
    else:
        kept_sizes = routed_sizes.clamp(max=capacity)
        keep = position < capacity if keep is None else keep & (position < capacity)
    assignment = order if keep is None else order[keep]
    return DispatchPlan(
        assignment=assignment,
        token=token[assignment],
        gate=gate[assignment],
        tokens_per_expert=kept_sizes.sum(1),
        demand_per_expert=routed_sizes.sum(1),
        routed=routed_sizes.sum(),
        num_experts=num_experts,
    )


def combine(expert_out: Tensor, plan: DispatchPlan, num_tokens: int, slots: Tensor | None = None) -> Tensor:
    """Gate-weighted sum of each token's expert outputs, in token order; unprocessed tokens are 0.

    With ``slots`` (:func:`token_slots`) each token gathers its own rows, and the backward gathers
    too (:class:`_GatherCombine`); without, the rows are added into place (``index_add_``, whose
    backward is a gather and forward a scatter, one atomic add per row on a GPU)."""
    weighted = expert_out * plan.gate.to(expert_out.dtype).unsqueeze(-1)
    if slots is not None:
        return _GatherCombine.apply(weighted, plan.token, slots)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add_(0, plan.token, weighted)


def dispatch_rows(x: Tensor, plan: DispatchPlan, slots: Tensor | None = None) -> Tensor:
    """``x[plan.token]``: the kept assignments' rows in expert-major order. With ``slots`` its
    backward gathers each token's gradient from its rows (:class:`_GatherDispatch`) instead of
    adding them into place."""
    if slots is not None:
        return _GatherDispatch.apply(x, plan.token, slots)
    return x.index_select(0, plan.token)


def token_slots(assignment_token: Tensor, plan: DispatchPlan, top_k: int, tokens_per_group: int) -> Tensor:
    """``[tokens, top_k]`` int64: the row (among the plan's kept rows) of each token's choice of
    each rank, or the number of kept rows where that choice was dropped or not routed: the inverse
    of the sort, for token-choice routing, whose assignments are laid out ``[groups, top_k,
    tokens_per_group]`` (``assignment_token``: the router's token of each assignment). No value
    is read back to the host."""
    kept = plan.assignment.numel()
    count = assignment_token.numel()
    index = torch.arange(count, device=assignment_token.device)
    row_of = torch.full_like(index, kept).index_copy_(0, plan.assignment, index[:kept])
    rank = torch.div(index, tokens_per_group, rounding_mode="floor") % top_k
    slots = torch.empty_like(index).index_copy_(0, assignment_token * top_k + rank, row_of)
    return slots.view(-1, top_k)


def _gather_sum(rows: Tensor, slots: Tensor) -> Tensor:
    """``out[t] = sum_j rows[slots[t, j]]``, a slot past the last row reading zero."""
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    picked = padded.index_select(0, slots.reshape(-1))
    if slots.shape[1] == 1:
        return picked
    return picked.view(slots.shape[0], slots.shape[1], rows.shape[-1]).sum(1)  # (no -1: zero tokens)


class _GatherCombine(torch.autograd.Function):
    """Combine by gathering each token's rows (forward) and each row's token gradient (backward):
    both directions read, neither scatters."""

    @staticmethod
    def forward(ctx, weighted: Tensor, token: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(token)
        return _gather_sum(weighted, slots)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


class _GatherDispatch(torch.autograd.Function):
    """``x[token]`` whose backward gathers (sums each token's rows' gradients) instead of scattering."""

    @staticmethod
    def forward(ctx, x: Tensor, token: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(slots)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slots,) = ctx.saved_tensors
        return _gather_sum(grad, slots), None, None


# ----------------------------------------------------------------------------- grouped matmul


class _LoopGroupedLinear(torch.autograd.Function):
    """Per-expert matmuls over contiguous row slices of a stacked weight ``[E, K, N]``.

    Autograd through ``w[e]`` inside a Python loop would materialise a full-size zero gradient per
    expert (cost grows with E^2), and ``unbind`` re-stacks one at the end. Here backward writes each
    expert's weight gradient straight into its slice of one preallocated ``[E, K, N]`` tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], weight.shape[2])
        start = 0
        for e, count in enumerate(counts):
            if count:
                torch.mm(x[start : start + count], weight[e], out=out[start : start + count])
            start += count
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        ctx.weight_is_leaf = weight.is_leaf
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = recycled_grad_buffer(weight) if ctx.weight_is_leaf else torch.empty_like(weight)
        start = 0
        for e, count in enumerate(ctx.counts):
            rows = slice(start, start + count)
            if grad_x is not None and count:
                torch.mm(grad_out[rows], weight[e].t(), out=grad_x[rows])
            if grad_w is not None:
                if count:
                    torch.mm(x[rows].t(), grad_out[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += count
        return grad_x, grad_w, None


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _detect_storage_refcount() -> int | None:
    try:
        return _storage_refs(torch.empty(1))
    except (AttributeError, RuntimeError, TypeError):
        return None


_UNSHARED_STORAGE_REFS = _detect_storage_refcount()


def recycled_grad_buffer(weight: Tensor) -> Tensor:
    """A gradient buffer for a stacked leaf weight, reused across steps when nothing else holds it.

    A fresh ``[E, K, N]`` gradient is a new multi-hundred-MiB allocation every backward; on CPU,
    where PyTorch has no caching allocator, its pages then fault in one by one, which measured here
    cost as much as computing the gradient. We keep the last buffer on the weight and hand out a
    fresh *view* of it (autograd adopts that view as ``weight.grad`` without copying). It is reused
    only when no tensor but ours refers to its storage: not ``weight.grad`` (still accumulating),
    not a gradient a caller kept. Otherwise a new buffer is made, so results never alias.
    """
    buffer = getattr(weight, "_switchformer_grad_buffer", None)
    reusable = (
        _UNSHARED_STORAGE_REFS is not None
        and buffer is not None
        and buffer.shape == weight.shape
        and buffer.dtype == weight.dtype
        and buffer.device == weight.device
        and _storage_refs(buffer) == _UNSHARED_STORAGE_REFS
    )
    if not reusable:
        buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
        weight._switchformer_grad_buffer = buffer
    return buffer.view(buffer.shape)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects expanded, zero-stride gradients such as the one ``.sum()`` produces)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _loop(x: Tensor, weight: Tensor, plan: DispatchPlan) -> Tensor:
    return _LoopGroupedLinear.apply(x, weight, plan.counts_list())


def _padded(x: Tensor, weight: Tensor, plan: DispatchPlan) -> Tensor:
    slots, width = plan.padded_slots()
    num_experts, k, n = weight.shape
    padded = x.new_zeros(num_experts * width, k).index_copy(0, slots, x)
    out = torch.bmm(padded.view(num_experts, width, k), weight)
    return out.view(num_experts * width, n).index_select(0, slots)


def _grouped_mm(x: Tensor, weight: Tensor, plan: DispatchPlan) -> Tensor:
    return _ContiguousGrad.apply(F.grouped_mm(x, weight, offs=plan.offsets()))


_IMPLEMENTATIONS = {"loop": _loop, "padded": _padded, "grouped_mm": _grouped_mm}


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Feature detection: does this PyTorch run ``F.grouped_mm`` forward and backward here? Probed
    once per device type and dtype, eagerly (see :func:`grouped_mm_valid`)."""
    key = (device_type, dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe_grouped_mm(device_type, dtype)
    return _PROBED[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        x = torch.randn(8, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
        out = F.grouped_mm(x, w, offs=offs)
        out.backward(torch.ones_like(out))  # a contiguous gradient: see _ContiguousGrad
        return True
    except (RuntimeError, NotImplementedError, TypeError, AssertionError):
        return False


def grouped_mm_valid(x: Tensor, weight: Tensor) -> bool:
    """grouped_mm needs row strides that are multiples of 16 bytes, and a supported device/dtype.
    Inside ``torch.compile`` only an earlier eager probe's answer is read (a probe traced into a
    graph would put a backward pass in it); unprobed counts as unavailable."""
    size = x.element_size()
    aligned = (weight.shape[1] * size) % 16 == 0 and (weight.shape[2] * size) % 16 == 0
    if not (aligned and x.dtype == weight.dtype):
        return False
    if torch.compiler.is_compiling():
        # torch 2.13's fake-tensor kernel of grouped_mm accepts bf16 only
        return x.dtype == torch.bfloat16 and _PROBED.get((x.device.type, x.dtype), False)
    return grouped_mm_available(x.device.type, x.dtype)


def resolve_backend(backend: str, x: Tensor, weight: Tensor) -> str:
    """The backend to run: the requested one, or for ``auto`` the fastest valid one measured
    (``benchmarks/moe_layer.py``): ``loop`` on CPU, ``grouped_mm`` (else ``padded``) on GPUs."""
    if backend == "auto":
        if x.device.type == "cpu":
            return "loop"
        return "grouped_mm" if grouped_mm_valid(x, weight) else "padded"
    if backend == "grouped_mm" and not grouped_mm_valid(x, weight):
        raise ValueError(
            f"backend='grouped_mm' is not usable for {x.dtype} on {x.device.type} with weight shape "
            f"{tuple(weight.shape)} (needs torch.nn.functional.grouped_mm and 16-byte aligned rows); "
            "use backend='auto'"
        )
    return backend


def grouped_linear(x: Tensor, weight: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """``out[rows of expert e] = x[rows of expert e] @ weight[e]`` for rows sorted by expert.

    ``x``: ``[M, K]``, ``weight``: ``[E, K, N]``. Under autocast the matmuls run in the autocast
    dtype, like ``nn.Linear`` would.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        if x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        return _IMPLEMENTATIONS[resolve_backend(backend, x, weight)](x, weight, plan)
    dtype = torch.get_autocast_dtype(device_type)
    x, weight = x.to(dtype), weight.to(dtype)
    name = resolve_backend(backend, x, weight)
    with torch.autocast(device_type=device_type, enabled=False):
        return _IMPLEMENTATIONS[name](x, weight, plan)
