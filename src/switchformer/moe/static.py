"""The Switch layer for a static-shape decoding step: the same routing and arithmetic as
``SwitchMoE.forward`` in eval mode, with every shape fixed by the input's and no value read back to
the host (no ``.item()``, ``nonzero``, boolean indexing or Python branch on a tensor), so a
decoding step can be captured whole by ``torch.compile(fullgraph=True)`` and replayed as a CUDA
graph (as gpt-fast and vLLM do for dense models).

How the data-dependent parts become static:

- **capacity**: each assignment's position within its expert is a cumulative count over a one-hot
  of the experts in priority order; an assignment at or past the capacity is kept in the
  computation but weighted by zero, so it adds exactly nothing (a dropped token's output is 0, as
  in :func:`switchformer.moe.dispatch.combine`).
- **expert batches**: one assignment multiplies by its expert's matrices gathered (the bytes of
  the one expert used, as the eager few-token path reads). More assignments are sorted by expert
  (on the device) and run through ``grouped_mm`` with offsets computed on the device, which reads
  only the experts used and does only the rows' work, where ``grouped_mm`` runs (GPUs in bfloat16;
  the CPU outside ``torch.compile``, whose float32 fake kernel is missing in torch 2.13); elsewhere
  they fill ``E`` padded blocks of ``C`` rows (``C`` the capacity, or every assignment when
  dropless) multiplied by one batched matmul, which reads every expert once.
- **padding rows** (a server's idle slots): ``token_mask`` False routes the row nowhere: no
  expert, zero output, not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from switchformer.moe.dispatch import grouped_mm_available, grouped_mm_valid
from switchformer.moe.experts import Experts, apply_activation


def static_moe_forward(layer, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(y, tokens_per_expert)`` of ``layer`` (a :class:`~switchformer.moe.layer.SwitchMoE` in eval
    mode, without autograd) for ``x [..., d_model]`` (float32 or bfloat16): ``y`` shaped like ``x``,
    ``tokens_per_expert`` ``[num_experts]`` int64 counted after capacity, both on ``x``'s device.

    Routing is the layer's inference routing (one group of all tokens, or one group per sequence
    for an absolute ``expert_capacity``), as ``forward`` routes in eval mode; ``token_mask``
    (``x.shape[:-1]``, bool) leaves rows unrouted. Raises ``ValueError`` for what it cannot run
    without reading values back: training mode, expert choice, experts that are not resident
    :class:`~switchformer.moe.experts.Experts` (offloaded or expert-parallel), and several routing
    groups whose capacity can drop tokens (never the case in decoding, where a group is a sequence
    of one token or the whole step)."""
    check_static(layer)
    d_model, num_experts = layer.d_model, layer.num_experts
    num_groups, group_len = layer.routing_groups(x)
    capacity = layer.capacity(group_len)
    if capacity is not None and capacity >= group_len:
        capacity = None  # an expert gets at most one assignment per token of a group: nothing drops
    if capacity is not None and num_groups > 1:
        raise ValueError(
            f"static decoding: {num_groups} routing groups with a capacity of {capacity} (of {group_len} tokens) "
            "could drop tokens; route the step as one group (inference_routing(decoding=True))"
        )
    flat = x.reshape(-1, d_model)
    mask = None if token_mask is None else token_mask.reshape(num_groups, group_len).bool()
    routing = layer.router(flat.view(num_groups, group_len, d_model), mask, capacity)
    expert, token = routing.expert, routing.token  # [A] in priority order; expert == E: not routed
    # [A, E]; a comparison, not F.one_hot, whose CUDA kernel checks its input's range on the host
    routed = (expert[:, None] == torch.arange(num_experts, device=expert.device)).long()
    # position of each assignment within its expert (priority order), and who is kept
    position = (routed.cumsum(0) * routed).sum(1) - 1
    keep = expert < num_experts
    if capacity is not None:
        keep = keep & (position < capacity)
    weight = routing.gate * keep  # float32; a dropped or unrouted assignment adds exactly zero
    tokens_per_expert = (routed * keep[:, None]).sum(0)
    safe_expert = expert.clamp(max=num_experts - 1)
    experts: Experts = layer.experts
    rows = flat.index_select(0, token).to(experts.w_in.dtype)
    if expert.numel() == 1:
        out = _gathered_ffn(experts, rows, safe_expert)
    elif grouped_mm_valid(rows, experts.w_in) and grouped_mm_valid(rows, experts.w_out):  # gated: w_in is 2x wide
        out = _grouped_ffn(experts, rows, safe_expert)
    else:
        slots = capacity if capacity is not None else flat.shape[0]
        out = _padded_ffn(experts, rows, safe_expert, position.clamp(max=slots - 1), keep, slots)
    y = flat.new_zeros(flat.shape[0], d_model, dtype=out.dtype)
    y = y.index_add(0, token, out * weight.to(out.dtype)[:, None])
    return y.to(x.dtype).view(x.shape), tokens_per_expert


def check_static(layer) -> None:
    """``ValueError`` naming what keeps ``layer`` off the static path (see :func:`static_moe_forward`)."""
    if layer.training or torch.is_grad_enabled():
        raise ValueError("static decoding: inference only (eval mode, no autograd)")
    check_static_layer(layer)


def check_static_layer(layer) -> None:
    """``ValueError`` for a layer whose routing or experts the static step cannot run, whatever
    the mode, naming the cause and the way out (the growing cache runs them all)."""
    if layer.routing == "expert_choice":
        raise ValueError(
            "cache_implementation: expert_choice routing ranks tokens across the step; decode with the growing cache "
            "(--cache dynamic)"
        )
    experts = layer.experts
    if type(experts) is Experts:
        # probed here, eagerly: a compiled step only reads the answer (grouped_mm_valid)
        grouped_mm_available(experts.w_in.device.type, experts.w_in.dtype)
        return
    if getattr(experts, "quantize", False):
        cause = "int8-stored experts (--dtype int8) are converted on use"
    elif getattr(experts, "_cache", None) is not None:
        cause = "offloaded experts (--max-memory) are read from their files on use"
    elif not getattr(experts, "all_local", False):
        cause = "expert-parallel experts exchange tokens between processes"
    else:
        cause = f"{type(experts).__name__} experts are not resident float weights"
    raise ValueError(
        f"cache_implementation: static decoding needs every expert resident in float32 or bfloat16; {cause}: decode "
        "with the growing cache (--cache dynamic)"
    )


def _gathered_ffn(experts: Experts, rows: Tensor, expert: Tensor) -> Tensor:
    """Each assignment's row through its own expert: ``[A, d] -> [A, d]``."""
    h = torch.bmm(rows[:, None, :], experts.w_in.index_select(0, expert))
    h = apply_activation(h, experts.activation)
    return torch.bmm(h, experts.w_out.index_select(0, expert))[:, 0]


def _grouped_ffn(experts: Experts, rows: Tensor, expert: Tensor) -> Tensor:
    """Rows sorted by expert (stable, on the device), each expert's rows through its matrices with
    ``grouped_mm`` (offsets: cumulative counts, computed without a host read), then unsorted.
    Dropped assignments are computed too (their weight is zero): the shapes stay fixed."""
    order = torch.argsort(expert, stable=True)
    counts = (expert[:, None] == torch.arange(experts.num_experts, device=expert.device)).sum(0)
    offsets = counts.cumsum(0).to(torch.int32)
    h = F.grouped_mm(rows.index_select(0, order), experts.w_in, offs=offsets)
    h = apply_activation(h, experts.activation)
    out = F.grouped_mm(h, experts.w_out, offs=offsets)
    return torch.empty_like(out).index_copy_(0, order, out)


def _padded_ffn(experts: Experts, rows: Tensor, expert: Tensor, position: Tensor, keep: Tensor, slots: int) -> Tensor:
    """Rows placed in ``[E, slots]`` blocks by (expert, position), one batched matmul per weight,
    read back per assignment. A dropped assignment writes to, and reads from, a spare last slot."""
    num_experts, d_model = experts.num_experts, rows.shape[1]
    spare = num_experts * slots
    slot = torch.where(keep, expert * slots + position, spare)
    blocks = rows.new_zeros(spare + 1, d_model).index_copy(0, slot, rows)
    h = torch.bmm(blocks[:spare].view(num_experts, slots, d_model), experts.w_in)
    h = apply_activation(h, experts.activation)
    out = torch.bmm(h, experts.w_out).view(spare, d_model)  # (no -1: zero rows)
    return torch.cat([out, out.new_zeros(1, out.shape[1])]).index_select(0, slot)
