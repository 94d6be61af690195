"""Experts: ``E`` independent feed-forward networks stored as stacked weights.

Weights are ``w_in [E, d_model, d_ff]`` (``[E, d_model, 2 * d_ff]`` for gated activations: gate
half first, linear half second) and ``w_out [E, d_ff, d_model]``: one tensor per layer, dim 0 the
expert, so expert parallelism can shard dim 0 and the matmuls read ``x @ w[e]`` without transposes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchformer.moe.dispatch import DispatchPlan, grouped_linear, recycled_grad_buffer, resolve_backend
from switchformer.moe.initialization import scaled_trunc_normal_

_gelu_tanh = functools.partial(F.gelu, approximate="tanh")

# name -> (elementwise function, gated?)
ACTIVATIONS = {
    "relu": (F.relu, False),  # original Switch / T5 v1.0
    "gelu": (F.gelu, False),
    "gelu_new": (_gelu_tanh, False),  # Hugging Face's name for the tanh approximation
    "silu": (F.silu, False),
    "gated-gelu": (_gelu_tanh, True),  # T5 v1.1 / Switch checkpoints trained with GEGLU
    "swiglu": (F.silu, True),
}


def apply_activation(h: Tensor, activation: str) -> Tensor:
    fn, gated = ACTIVATIONS[activation]
    if not gated:
        return fn(h)
    gate, linear = h.chunk(2, dim=-1)
    return fn(gate) * linear


class _FusedLoopFFN(torch.autograd.Function):
    """Both matmuls and the activation of one expert after another, over contiguous row slices.

    Each expert's hidden activations are used while they are still in cache, instead of one pass
    over all rows per operation; backward likewise finishes one expert before the next and writes
    weight gradients into stacked buffers (see ``dispatch._LoopGroupedLinear``). Saved for
    backward: the input and one ``[M, d_ff]`` buffer: relu's output (its own derivative mask), or
    the pre-activation of other activations, which backward re-applies one expert at a time.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], activation: str) -> Tensor:
        hidden = x.new_empty(x.shape[0], w_in.shape[2])
        out = x.new_empty(x.shape[0], w_out.shape[2])
        relu = activation == "relu"
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                h = torch.mm(x[rows], w_in[e], out=hidden[rows])
                h = h.relu_() if relu else apply_activation(h, activation)
                torch.mm(h, w_out[e], out=out[rows])
            start += count
        ctx.save_for_backward(x, w_in, w_out, hidden)
        ctx.counts, ctx.activation = counts, activation
        ctx.leaf = (w_in.is_leaf, w_out.is_leaf)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w_in, w_out, hidden = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_in = grad_w_out = None
        if need_w_in:
            grad_w_in = recycled_grad_buffer(w_in) if ctx.leaf[0] else torch.empty_like(w_in)
        if need_w_out:
            grad_w_out = recycled_grad_buffer(w_out) if ctx.leaf[1] else torch.empty_like(w_out)
        relu = ctx.activation == "relu"
        start = 0
        for e, count in enumerate(ctx.counts):
            rows = slice(start, start + count)
            start += count
            if not count:
                for grad in (grad_w_in, grad_w_out):
                    if grad is not None:
                        grad[e].zero_()
                continue
            g = grad_out[rows]
            if relu:
                h = hidden[rows]
                if grad_w_out is not None:
                    torch.mm(h.t(), g, out=grad_w_out[e])
                grad_u = torch.mm(g, w_out[e].t())
                torch.ops.aten.threshold_backward.grad_input(grad_u, h, 0, grad_input=grad_u)  # relu' in place
            else:
                with torch.enable_grad():
                    u = hidden[rows].detach().requires_grad_()
                    h = apply_activation(u, ctx.activation)
                if grad_w_out is not None:
                    torch.mm(h.detach().t(), g, out=grad_w_out[e])
                (grad_u,) = torch.autograd.grad(h, u, torch.mm(g, w_out[e].t()))
            if grad_w_in is not None:
                torch.mm(x[rows].t(), grad_u, out=grad_w_in[e])
            if grad_x is not None:
                torch.mm(grad_u, w_in[e].t(), out=grad_x[rows])
        return grad_x, grad_w_in, grad_w_out, None, None


class Experts(nn.Module):
    """``E`` feed-forward experts; ``forward`` takes rows already sorted by expert."""

    all_local = True  # every expert is computed here (SwitchMoE's few-token path may call forward_one)

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        init_scale: float = 0.1,
        backend: str = "auto",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        gated = ACTIVATIONS[activation][1]
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.init_scale = init_scale
        self.backend = backend
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_ff * (2 if gated else 1)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.dropout = nn.Dropout(dropout)  # expert dropout: separate from the model's dropout
        self.reset_parameters()

    @property
    def params_per_expert(self) -> int:
        return (self.w_in.numel() + self.w_out.numel()) // self.num_experts

    def reset_parameters(self) -> None:
        scaled_trunc_normal_(self.w_in, fan_in=self.d_model, scale=self.init_scale)
        scaled_trunc_normal_(self.w_out, fan_in=self.d_ff, scale=self.init_scale)

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        if self._fused(x):
            return self._fused_forward(x, plan)
        h = grouped_linear(x, self.w_in, plan, self.backend)
        h = self.dropout(apply_activation(h, self.activation))
        return grouped_linear(h, self.w_out, plan, self.backend)

    def forward_one(self, expert: int, x: Tensor) -> Tensor:
        """Expert ``expert``'s FFN on a few rows ``x`` (no dispatch, no dropout: inference fast path)."""
        return apply_activation(x.to(self.w_in.dtype) @ self.w_in[expert], self.activation) @ self.w_out[expert]

    def _fused(self, x: Tensor) -> bool:
        """The loop backend runs each expert's whole FFN at once, unless expert dropout is active
        (dropout needs its own mask between the matmuls)."""
        if self.dropout.p > 0 and self.training:
            return False
        return resolve_backend(self.backend, x, self.w_in) == "loop"

    def _fused_forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        w_in, w_out = self.w_in, self.w_out
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
            with torch.autocast(device_type=device_type, enabled=False):
                return _FusedLoopFFN.apply(x, w_in, w_out, plan.counts_list(), self.activation)
        return _FusedLoopFFN.apply(x.to(w_in.dtype), w_in, w_out, plan.counts_list(), self.activation)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
