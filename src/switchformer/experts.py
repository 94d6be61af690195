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

from switchformer.dispatch import DispatchPlan, grouped_linear
from switchformer.init import scaled_trunc_normal_

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


class Experts(nn.Module):
    """``E`` feed-forward experts; ``forward`` takes rows already sorted by expert."""

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

    def reset_parameters(self) -> None:
        scaled_trunc_normal_(self.w_in, fan_in=self.d_model, scale=self.init_scale)
        scaled_trunc_normal_(self.w_out, fan_in=self.d_ff, scale=self.init_scale)

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        h = grouped_linear(x, self.w_in, plan, self.backend)
        h = self.dropout(apply_activation(h, self.activation))
        return grouped_linear(h, self.w_out, plan, self.backend)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
