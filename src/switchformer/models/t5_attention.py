"""T5's attention: multi-head attention without query scaling, with a bucketed relative position
bias (computed by the first layer of a stack and shared by the others) and an additive mask, in
three forms: the whole sequence (training, encoding), cached decoding of new positions against a
growing cache, and the static decoding step over a fixed-size cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchformer.inference.scope import DerivedWeight
from switchformer.models.caches import DecoderCache
from switchformer.models.layers import decoding_attention


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucketing of ``memory_position - query_position``: exact buckets for small distances,
    logarithmic ones up to ``max_distance``, one bucket beyond; separate halves per direction when
    bidirectional, only the past otherwise."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _side_by_side(*weights: Tensor) -> Tensor:
    return torch.cat(weights).t().contiguous()


class T5Attention(nn.Module):
    """Multi-head attention without query scaling (T5 folds it into the init); the additive bias
    carries the relative positions and the mask."""

    def __init__(self, config, *, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.key_width = self.num_heads * self.d_kv  # what a score and a weighted value cost per key
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads) if has_relative_bias else None
        self._fused_qkv = DerivedWeight(_side_by_side)

    def position_bias(self, query_len: int, key_len: int, offset: int | Tensor = 0) -> Tensor:
        """``[1, heads, query_len, key_len]``; queries start at position ``offset`` (cached decoding:
        an int, or a one-element device tensor in a static decoding step)."""
        device = self.relative_attention_bias.weight.device
        context = torch.arange(query_len, device=device)[:, None] + offset
        memory = torch.arange(key_len, device=device)[None, :]
        bucket = relative_position_bucket(memory - context, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def split_heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k(source)), self.split_heads(self.v(source))

    def fused_qkv_weight(self) -> Tensor:
        """``[d_model, 3 * inner]``: the q, k and v projections side by side, so a decoding step
        projects with one matmul. Separate weights stay the parameters (Hugging Face's layout)."""
        return self._fused_qkv(self.q.weight, self.k.weight, self.v.weight)

    def forward_cached(self, x: Tensor, bias: Tensor, cache: DecoderCache, layer: int) -> Tensor:
        """Self-attention of new decoder positions against the cache; inference only (no autograd).
        The same math as ``forward``, in fewer, larger ops: decoding runs it for every token."""
        batch, length, d_model = x.shape
        inner = self.num_heads * self.d_kv
        qkv = torch.mm(x.reshape(batch * length, d_model), self.fused_qkv_weight())
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = cache.append(layer, k, v)
        out = decoding_attention(q, k, v, bias.to(q.dtype), scale=1.0)
        out = F.linear(out.transpose(1, 2).reshape(batch * length, inner), self.o.weight)
        return out.view(batch, length, d_model)

    def forward_static(self, x: Tensor, bias: Tensor, keys: Tensor, values: Tensor, column: Tensor) -> Tensor:
        """Self-attention of one new decoder position per row ``x [B, 1, d_model]`` in a static
        decoding step: its key and value are written at ``column`` (a one-element device tensor) of
        the cache buffers ``keys``/``values`` ``[B, heads, L, d_kv]``, and every one of the ``L``
        columns is attended with ``bias`` ``[1 or B, heads, 1, L]``, which masks the columns not yet
        written. Shapes never change from step to step and nothing is read back to the host."""
        batch, length, d_model = x.shape
        if torch.compiler.is_compiling():  # a compiled step fuses the projections itself
            q, k, v = (self.split_heads(proj(x)) for proj in (self.q, self.k, self.v))
        else:
            qkv = torch.mm(x.reshape(batch * length, d_model), self.fused_qkv_weight())
            q, k, v = qkv.view(batch, length, 3, self.num_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)
        keys.index_copy_(2, column, k)
        values.index_copy_(2, column, v)
        out = decoding_attention(q, keys, values, bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: Tensor, bias: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q = self.split_heads(self.q(x))
        k, v = kv if kv is not None else self.project_kv(x)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def padding_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``[B, 1, 1, S]`` additive bias: 0 where ``mask`` is true, the dtype's minimum elsewhere."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
