"""``SwitchLM``: a decoder-only Switch language model for generation and chat.

Pre-norm blocks with RMSNorm, rotary position embeddings, ``scaled_dot_product_attention``, a
SwiGLU (or GELU) FFN that is a causal Switch layer every ``sparse_step`` layers, tied embeddings.
``sparse_step=0`` is the dense baseline built from the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from switchformer.inference.generation import generate_causal
from switchformer.inference.inputs import check_mask, check_token_ids
from switchformer.inference.scope import DerivedWeight
from switchformer.models.accounting import parameter_counts
from switchformer.models.caches import LMCache, StaticLMCache
from switchformer.models.layers import (
    CONFIG_BOUNDS,
    Dropout,
    FeedForward,
    RMSNorm,
    config_from_dict,
    decoding_attention,
    is_sparse_layer,
    output_logits,
    transposed_copy,
)
from switchformer.models.outputs import RouterStats, finish_output
from switchformer.models.vocab_loss import IGNORE_INDEX
from switchformer.moe.bounds import check_bounds
from switchformer.moe.experts import ACTIVATIONS
from switchformer.moe.initialization import scaled_trunc_normal_
from switchformer.moe.layer import SwitchMoE
from switchformer.moe.routing import ROUTINGS


@dataclass
class SwitchLMConfig:
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    d_ff: int = 1408
    activation: str = "swiglu"
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    num_experts: int = 8
    sparse_step: int = 2  # 0: dense baseline
    top_k: int = 1
    routing: str = "token_choice"
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 4
    group_size: int | None = None  # routing group size in tokens; None: the whole local batch
    router_jitter_noise: float = 0.0
    # top-k > 1: gates renormalised over the k chosen experts (they sum to one; an upcycled model's
    # identical experts then compute the dense FFN exactly); top-1 keeps Switch's raw gate
    normalize_gates: bool = False
    expert_dropout: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    init_scale: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int | None = None

    def __post_init__(self):
        check_bounds(dataclasses.asdict(self), CONFIG_BOUNDS)
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"num_heads: d_model={self.d_model} must split into an even head size over {self.num_heads} heads"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: unknown {self.routing!r}; choose one of {ROUTINGS}")
        if self.has_sparse_layers:
            if self.num_experts < 1:
                raise ValueError(f"num_experts: must be >= 1, got {self.num_experts}")
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"top_k: must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    @property
    def has_sparse_layers(self) -> bool:
        return any(self.sparse_layers())

    def sparse_layers(self) -> list[bool]:
        return [is_sparse_layer(i, self.sparse_step) for i in range(self.num_layers)]

    def moe_kwargs(self) -> dict:
        return dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            routing=self.routing,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            group_size=self.group_size,
            jitter_eps=self.router_jitter_noise,
            normalize_gates=self.normalize_gates,
            expert_dropout=self.expert_dropout,
            init_scale=self.init_scale,
            causal=True,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SwitchLMConfig:
        return config_from_dict(cls, data)


# ----------------------------------------------------------------------------- rotary embedding


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[B, H, S, Dh]``; ``cos``/``sin``: ``[B, 1, S, Dh/2]`` (rotate-half convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- cache


# ----------------------------------------------------------------------------- blocks


class LMAttention(nn.Module):
    def __init__(self, config: SwitchLMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_model // config.num_heads
        self.key_width = self.num_heads * self.head_dim  # what a score and a weighted value cost per key
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.o = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(self, x, cos, sin, mask: Tensor | None, cache: LMCache | None = None, layer: int = 0) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            out = decoding_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.o(out.transpose(1, 2).reshape(batch, seq, -1))

    def forward_static(self, x, cos, sin, mask: Tensor, keys: Tensor, values: Tensor, column: Tensor) -> Tensor:
        """One new position per row ``x [B, 1, d_model]`` in a static decoding step: its key and
        value written at ``column`` (a one-element device tensor) of ``keys``/``values`` ``[B, heads,
        L, head_dim]``, every column attended under ``mask`` ``[B, 1, 1, L]`` (bool)."""
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, 1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys.index_copy_(2, column, k)
        values.index_copy_(2, column, v)
        out = decoding_attention(q, keys, values, mask)
        return self.o(out.transpose(1, 2).reshape(batch, 1, -1))


class LMBlock(nn.Module):
    def __init__(self, config: SwitchLMConfig, sparse: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = LMAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = FeedForward(
            config.d_model,
            config.d_ff,
            sparse=sparse,
            activation=config.activation,
            dropout=config.dropout_rate,
            moe_kwargs=config.moe_kwargs() if sparse else {"init_scale": config.init_scale},
        )
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, h, cos, sin, mask, token_mask, cache=None, layer=0):
        h = h + self.dropout(self.attn(self.attn_norm(h), cos, sin, mask, cache, layer))
        y, aux = self.ffn(self.ffn_norm(h), token_mask)
        return h + self.dropout(y), aux

    def forward_static(self, h, cos, sin, mask, cache: StaticLMCache, layer: int, token_mask):
        """One block of a static decoding step: the hidden state and, for a Switch layer, its
        tokens per expert (``None`` for a dense one)."""
        keys, values = cache.kv[layer]
        h = h + self.attn.forward_static(self.attn_norm(h), cos, sin, mask, keys, values, cache.column)
        normed = self.ffn_norm(h)
        if self.ffn.sparse:
            y, counts = self.ffn.mlp.forward_static(normed, token_mask)
            return h + y, counts
        return h + self.ffn.mlp(normed), None


def next_token_labels(labels: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
    """Position ``t``'s target is ``labels[t + 1]``; -100 where either that target or the input at
    ``t`` is padding (with left padding the last pad position would otherwise be scored for
    predicting the first real token), and at the last position."""
    if labels is None:
        return None
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    if attention_mask is not None:
        real = attention_mask.bool()
        next_real = torch.cat([real[:, 1:], real.new_zeros(real.shape[0], 1)], dim=1)
        targets = targets.masked_fill(~(real & next_real), IGNORE_INDEX)
    return targets


class SwitchLM(nn.Module):
    """Decoder-only Switch LM. ``model(input_ids, attention_mask=None, labels=None,
    label_smoothing=0.0)``; ``labels`` are the input ids themselves (shifted inside), ``-100`` to
    ignore positions; ``label_smoothing`` smooths the cross-entropy (training only)."""

    is_encoder_decoder = False  # Hugging Face's name: what generation and serving dispatch on

    def __init__(self, config: SwitchLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LMBlock(config, sparse) for sparse in config.sparse_layers())
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._head_t = DerivedWeight(transposed_copy)  # the output matrix for few-row decoding steps
        self.dropout = Dropout(config.dropout_rate)
        cos, sin = rope_tables(config.max_seq_len, config.d_model // config.num_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def materialize_buffers(self, device, dtype: torch.dtype) -> None:
        """The rotary tables again (they are not saved), for a model built on the meta device."""
        config = self.config
        cos, sin = rope_tables(config.max_seq_len, config.d_model // config.num_heads, config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        s = self.config.init_scale
        # The tied output layer is unscaled (unlike T5's d_model ** -0.5), so embeddings start small
        # enough that initial logits are O(1): std sqrt(s / d_model). With fan_in=1 the first steps
        # started near cross-entropy 30 instead of ln(vocab).
        scaled_trunc_normal_(self.embed.weight, fan_in=self.config.d_model, scale=s)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scaled_trunc_normal_(module.weight, fan_in=module.in_features, scale=s)

    def sparse_layers(self) -> list[SwitchMoE]:
        return [block.ffn.mlp for block in self.blocks if block.ffn.sparse]

    def hidden_states(self, input_ids, attention_mask=None, cache: LMCache | None = None, stats=None):
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        stats = RouterStats() if stats is None else stats
        if cache is None:
            check_mask("attention_mask", attention_mask, input_ids)
            if seq > self.config.max_seq_len:
                raise ValueError(f"input_ids: sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
            if attention_mask is None:
                positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
                mask = None
            else:
                valid = attention_mask.bool()
                positions = (valid.long().cumsum(1) - 1).clamp_min(0)
                mask = self._attention_mask(valid, 0, seq)
            token_mask = None if attention_mask is None else attention_mask.bool()
        else:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
            if attention_mask is not None:
                valid = attention_mask[:, -seq:].bool()
            end = cache.length + seq
            if end > cache.capacity:
                raise ValueError(f"cache: {end} positions exceed the cache size {cache.capacity}")
            cache.key_valid[:, cache.length : end] = valid
            positions = cache.next_position[:, None] + (valid.long().cumsum(1) - 1).clamp_min(0)
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(
                    f"input_ids: position {int(positions.max())} exceeds max_seq_len={self.config.max_seq_len}"
                )
            cache.next_position = cache.next_position + valid.long().sum(1)
            mask = self._attention_mask(cache.key_valid[:, :end], cache.length, seq)
            token_mask = valid if not bool(valid.all()) else None
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        h = self.dropout(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            h, aux = block(h, cos, sin, mask, token_mask, cache, i)
            stats.add(f"layers.{i}", aux)
        if cache is not None:
            cache.length += seq
        return self.final_norm(h), stats

    @staticmethod
    def _attention_mask(key_valid: Tensor, offset: int, query_len: int) -> Tensor:
        """``[B, 1, q, k]`` bool: causal, valid keys only, and each query always sees itself (so
        padding rows never attend to nothing, which would put NaNs into the cache)."""
        key_len = key_valid.shape[1]
        query_pos = torch.arange(offset, offset + query_len, device=key_valid.device)[:, None]
        key_pos = torch.arange(key_len, device=key_valid.device)[None, :]
        allowed = (key_pos <= query_pos) & key_valid[:, None, :]
        allowed = allowed | (key_pos == query_pos)
        return allowed.unsqueeze(1)

    def output_head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, weight)`` with logits ``x @ weight.T`` (tied: the embedding matrix)."""
        return h, self.embed.weight if self.lm_head is None else self.lm_head.weight

    def project(self, h: Tensor) -> Tensor:
        x, weight = self.output_head(h)
        return output_logits(x, weight, self._head_t)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        label_smoothing: float = 0.0,
    ):
        if decoder_input_ids is not None:
            raise ValueError("decoder_input_ids: SwitchLM is decoder-only; pass input_ids")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        h, stats = self.hidden_states(input_ids, attention_mask)
        x, weight = self.output_head(h)
        labels = next_token_labels(labels, attention_mask)
        return finish_output(self.config, x, weight, labels, stats, ("layers",), label_smoothing=label_smoothing)

    def new_cache(self, batch: int, max_length: int, device=None, dtype=None) -> LMCache:
        device = device or self.embed.weight.device
        return LMCache(batch, self.config, max_length, device, dtype or self.embed.weight.dtype)

    def new_static_cache(self, batch: int, max_length: int, device=None, dtype=None) -> StaticLMCache:
        """A :class:`StaticLMCache`: prefill it with :meth:`hidden_states`, call its ``sync_column``,
        then step with :meth:`decode_step`."""
        device = device or self.embed.weight.device
        return StaticLMCache(batch, self.config, max_length, device, dtype or self.embed.weight.dtype)

    def decode_step(
        self, tokens: Tensor, cache: StaticLMCache, token_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The static decoding step: logits ``[B, vocab]`` of the next token after feeding
        ``tokens`` ``[B]`` at the cache's ``column`` and each row's ``next_position``, and each
        Switch layer's tokens per expert (device tensors). Every shape is fixed by the cache and
        nothing is read back to the host, so ``torch.compile(model.decode_step, fullgraph=True)``
        captures it whole. The same tokens as :meth:`hidden_states` with an :class:`LMCache`
        (``generate(cache_implementation="static")``). ``token_mask`` ``[B]`` (bool): idle rows (a
        server's free slots) route nowhere. The caller keeps ``column`` below the cache size and
        positions below ``max_seq_len`` (the step cannot check them)."""
        column = cache.column
        cache.key_valid.index_fill_(1, column, True)  # each row sees its own new key
        positions = cache.next_position
        # a server's idle slots keep counting; the rows in use stay below max_seq_len (the caller's rule)
        table_row = positions.clamp(max=self.config.max_seq_len - 1)
        cos = self.rope_cos[table_row][:, None, None, :]
        sin = self.rope_sin[table_row][:, None, None, :]
        mask = cache.key_valid[:, None, None, :]
        h = self.embed(tokens[:, None])
        routed = None if token_mask is None else token_mask[:, None]
        counts = []
        for i, block in enumerate(self.blocks):
            h, layer_counts = block.forward_static(h, cos, sin, mask, cache, i, routed)
            if layer_counts is not None:
                counts.append(layer_counts)
        h = self.final_norm(h)
        positions.add_(1)
        column.add_(1)
        x, weight = self.output_head(h[:, -1])
        if torch.compiler.is_compiling():
            return x @ weight.t(), counts
        return output_logits(x, weight, self._head_t), counts

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Cached decoding of left-padded prompts; see :func:`switchformer.inference.generation.generate_causal`."""
        return generate_causal(self, input_ids, attention_mask, **kwargs)

    def num_parameters(self) -> dict[str, int]:

        return parameter_counts(self)
