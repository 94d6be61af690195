"""Layers both model families share: RMSNorm, the dense FFN, the sparse-or-dense feed-forward slot,
dropout that costs nothing when off, the output projection and cached decoding's attention."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from switchformer.inference.scope import DecodingScope, DerivedWeight
from switchformer.moe.bounds import AT_LEAST_ONE, AT_LEAST_ZERO, FRACTION
from switchformer.moe.experts import ACTIVATIONS, apply_activation
from switchformer.moe.initialization import scaled_trunc_normal_
from switchformer.moe.layer import MoEAux, SwitchMoE

# Cached decoding's attention backends on CUDA: every SDPA backend but cuDNN's, which builds a new
# execution plan for each new key length, and a decoding step's key length is new every step
# (H200, Switch-Base-8 at batch 1: 73% of the host's time, about 2 ms a call; docs/gpu.md).
_DECODING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decoding_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` for cached decoding (inference, no dropout): queries
    ``[B, H, Lq, D]`` against a cache ``[B, H, Lk, D]`` whose ``Lk`` grows by one each step. The
    same arithmetic as plain SDPA; on CUDA it leaves out the cuDNN backend (see above)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    with sdpa_kernel(_DECODING_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that returns its input untouched when inactive (eval, or p = 0) instead of
    dispatching an identity op: decoding calls it tens of times per token."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.p > 0:
            return F.dropout(x, self.p, True, self.inplace)
        return x


def transposed_copy(weight: Tensor) -> Tensor:
    return weight.t().contiguous()


# Rows up to which output_logits reads a CPU weight through its transposed copy (see there).
_FEW_ROWS = 4


def output_logits(x: Tensor, weight: Tensor, transposed: DerivedWeight) -> Tensor:
    """``x @ weight.T``. A CPU decoding step of at most four rows goes through a contiguous
    ``[d, vocab]`` copy of ``weight`` instead (``transposed``, built once): MKL's product of one row
    with a transposed matrix ran at half the speed (vocabulary 8,192 x 256, one row: 580 against
    280 us, two rows 965 against 640; from eight rows on both layouts take the same time).
    Only inside a :class:`DecodingScope` (generation), where the copy is kept for the whole call;
    the model keeps it after generating (memory: one more output matrix)."""
    rows = x.numel() // x.shape[-1]
    few = rows <= _FEW_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled()
    if few and DecodingScope.current() is not None:
        return x @ transposed(weight)
    return x @ weight.t()


class _RMSNormFunction(torch.autograd.Function):
    """float32 RMSNorm with a hand-written backward: autograd's version of the four-op forward
    takes about ten passes over the activations, this one six (measured 4.6 against 6.8 ms for
    forward and backward at [8, 256, 256] on one core). Forward is the same arithmetic as below."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * normed).reshape(-1, x.shape[-1]).sum(0)
        grad_normed = grad_y * weight
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        mean_dot = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1) / x.shape[-1]
        grad_x = torch.addcmul(grad_normed * rstd, normed, rstd * mean_dot, value=-1)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.is_grad_enabled():
                return _RMSNormFunction.apply(x, self.weight, self.eps)
            # one call instead of six ops, bit-identical to the lines below: a decoding step runs a
            # dozen norms of a few rows ([8, 1, 256]: 14 against 21 us; [8, 256, 256]: the same)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Hugging Face's T5LayerNorm arithmetic: statistics in float32, cast back for half weights
        variance = x.float().square().mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class DenseFFN(nn.Module):
    """One feed-forward network, the same math as one expert: ``w_out(act(w_in x))``."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0, init_scale: float = 1.0
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        gated = ACTIVATIONS[activation][1]
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(d_model, d_ff * (2 if gated else 1)))
        self.w_out = nn.Parameter(torch.empty(d_ff, d_model))
        self.dropout = Dropout(dropout)
        scaled_trunc_normal_(self.w_in, fan_in=d_model, scale=init_scale)
        scaled_trunc_normal_(self.w_out, fan_in=d_ff, scale=init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(apply_activation(x @ self.w_in, self.activation)) @ self.w_out


class FeedForward(nn.Module):
    """The FFN slot of a block: a dense FFN or a Switch layer. Returns ``(y, aux or None)``."""

    def __init__(self, d_model: int, d_ff: int, *, sparse: bool, activation: str, dropout: float, moe_kwargs: dict):
        super().__init__()
        self.sparse = sparse
        if sparse:
            self.mlp = SwitchMoE(d_model, d_ff, activation=activation, **moe_kwargs)
        else:
            self.mlp = DenseFFN(d_model, d_ff, activation, dropout, init_scale=moe_kwargs.get("init_scale", 1.0))

    def forward(self, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, MoEAux | None]:
        if self.sparse:
            return self.mlp(x, token_mask=token_mask)
        return self.mlp(x), None


def is_sparse_layer(index: int, sparse_step: int) -> bool:
    """Hugging Face's layout: every layer for step 1, layers with ``i % step == 1`` otherwise, none for 0."""
    if sparse_step <= 0:
        return False
    return sparse_step == 1 or index % sparse_step == 1


def config_from_dict(cls, data: dict):
    """A config dataclass from a dict, refusing fields it does not have (a typo is an error)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"config: unknown fields {unknown}")
    return cls(**data)


# the model configs' size and rate settings and their bounds, for both families (the Switch layer's
# own settings are checked by the layer, with the same bounds: switchformer.moe.layer.LAYER_BOUNDS)
CONFIG_BOUNDS = {
    **dict.fromkeys(("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "max_seq_len"), AT_LEAST_ONE),
    **dict.fromkeys(("relative_attention_num_buckets", "relative_attention_max_distance"), AT_LEAST_ONE),
    **dict.fromkeys(("num_layers", "num_decoder_layers", "sparse_step"), AT_LEAST_ZERO),
    **dict.fromkeys(("encoder_sparse_step", "decoder_sparse_step"), AT_LEAST_ZERO),
    "dropout_rate": FRACTION,
}
