"""``SwitchT5``: the T5-style encoder-decoder of the Switch paper.

Mathematically identical to Hugging Face's ``SwitchTransformersForConditionalGeneration`` (and,
with no sparse layers, to ``T5ForConditionalGeneration``): pre-norm blocks with T5's RMS norm,
unscaled attention with a bucketed relative position bias computed in the first layer and shared
by the others, no biases anywhere, tied embeddings with ``d_model ** -0.5`` output scaling, and a
Switch layer in place of the FFN every ``sparse_step`` layers (HF's layout).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from switchformer.inference.generation import generate_seq2seq
from switchformer.inference.inputs import check_mask, check_token_ids
from switchformer.inference.scope import DerivedWeight
from switchformer.models.accounting import parameter_counts
from switchformer.models.caches import DecoderCache, StaticDecoderCache, check_cache_size
from switchformer.models.layers import (
    CONFIG_BOUNDS,
    Dropout,
    FeedForward,
    RMSNorm,
    config_from_dict,
    is_sparse_layer,
    output_logits,
    transposed_copy,
)
from switchformer.models.outputs import ModelOutput, RouterStats, finish_output
from switchformer.models.t5_attention import T5Attention, padding_bias
from switchformer.moe.bounds import check_bounds
from switchformer.moe.experts import ACTIVATIONS
from switchformer.moe.initialization import scaled_trunc_normal_


@dataclass
class SwitchT5Config:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    activation: str = "relu"
    tie_word_embeddings: bool = True
    # sparsity (encoder_sparse_step = decoder_sparse_step = 0 gives the dense T5 baseline)
    num_experts: int = 8
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    top_k: int = 1
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 4
    expert_capacity: int | None = None  # absolute, per sequence (HF); overrides the factors
    router_jitter_noise: float = 0.01
    normalize_gates: bool = False  # top-k > 1: gates renormalised over the chosen experts (see SwitchLMConfig)
    expert_dropout: float | None = None  # None: dropout_rate, as in HF
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    init_scale: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        self.validate()

    def validate(self) -> None:
        check_bounds(dataclasses.asdict(self), CONFIG_BOUNDS)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.has_sparse_layers and self.num_experts < 1:
            raise ValueError(f"num_experts: must be >= 1, got {self.num_experts}")

    @property
    def has_sparse_layers(self) -> bool:
        return any(self.sparse_layers("encoder")) or any(self.sparse_layers("decoder"))

    def sparse_layers(self, stack: str) -> list[bool]:
        if stack == "encoder":
            return [is_sparse_layer(i, self.encoder_sparse_step) for i in range(self.num_layers)]
        return [is_sparse_layer(i, self.decoder_sparse_step) for i in range(self.num_decoder_layers)]

    def moe_kwargs(self, causal: bool) -> dict:
        return dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            expert_capacity=self.expert_capacity,
            jitter_eps=self.router_jitter_noise,
            normalize_gates=self.normalize_gates,
            expert_dropout=self.dropout_rate if self.expert_dropout is None else self.expert_dropout,
            init_scale=self.init_scale,
            causal=causal,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SwitchT5Config:
        return config_from_dict(cls, data)


def dense_twin_config(config):
    """The FLOP-matched dense model: the same config with every sparse FFN replaced by one
    expert-sized dense FFN (top-1 routing only; top-k would need k times wider FFNs)."""
    if config.top_k != 1:
        raise ValueError("top_k: a FLOP-matched dense twin is defined here for top-1 routing only")
    if isinstance(config, SwitchT5Config):
        return replace(config, encoder_sparse_step=0, decoder_sparse_step=0)
    return replace(config, sparse_step=0)


# ----------------------------------------------------------------------------- blocks and stacks


class T5Block(nn.Module):
    def __init__(self, config: SwitchT5Config, *, decoder: bool, first: bool, sparse: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5Attention(config, has_relative_bias=first, bidirectional=not decoder)
        if decoder:
            self.cross_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
            self.cross_attn = T5Attention(config, has_relative_bias=False, bidirectional=True)
        self.ffn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = FeedForward(
            config.d_model,
            config.d_ff,
            sparse=sparse,
            activation=config.activation,
            dropout=config.dropout_rate,
            moe_kwargs=config.moe_kwargs(causal=decoder) if sparse else {"init_scale": config.init_scale},
        )
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, h, bias, token_mask, *, layer=0, cache=None, memory=None, memory_bias=None):
        normed = self.attn_norm(h)
        if cache is not None and not (torch.is_grad_enabled() or self.training):
            h = h + self.attn.forward_cached(normed, bias, cache, layer)  # decoding: no dropout in eval
        else:
            kv = None if cache is None else cache.append(layer, *self.attn.project_kv(normed))
            h = h + self.dropout(self.attn(normed, bias, kv))
        if memory is not None or cache is not None:
            cross_kv = cache.cross_kv[layer] if cache is not None else self.cross_attn.project_kv(memory)
            h = h + self.dropout(self.cross_attn(self.cross_norm(h), memory_bias, cross_kv))
        y, aux = self.ffn(self.ffn_norm(h), token_mask)
        return h + self.dropout(y), aux

    def forward_static(self, h, bias, cache: StaticDecoderCache, layer: int, token_mask):
        """One decoder block of a static decoding step (see ``SwitchT5.decode_step``): the hidden
        state and, for a Switch layer, its tokens per expert (``None`` for a dense one)."""
        keys, values = cache.self_kv[layer]
        h = h + self.attn.forward_static(self.attn_norm(h), bias, keys, values, cache.column)
        h = h + self.cross_attn(self.cross_norm(h), cache.cross_bias, cache.cross_kv[layer])
        normed = self.ffn_norm(h)
        if self.ffn.sparse:
            y, counts = self.ffn.mlp.forward_static(normed, token_mask)
            return h + y, counts
        return h + self.ffn.mlp(normed), None


class T5Stack(nn.Module):
    def __init__(self, config: SwitchT5Config, *, decoder: bool):
        super().__init__()
        self.name = "decoder" if decoder else "encoder"
        self.decoder = decoder
        sparse = config.sparse_layers(self.name)
        self.blocks = nn.ModuleList(
            T5Block(config, decoder=decoder, first=i == 0, sparse=s) for i, s in enumerate(sparse)
        )
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, h, bias, token_mask, stats: RouterStats, *, cache=None, memory=None, memory_bias=None):
        h = self.dropout(h)
        for i, block in enumerate(self.blocks):
            h, aux = block(h, bias, token_mask, layer=i, cache=cache, memory=memory, memory_bias=memory_bias)
            stats.add(f"{self.name}.{i}", aux)
        return self.dropout(self.final_norm(h))


# ----------------------------------------------------------------------------- model


class SwitchT5(nn.Module):
    """Encoder-decoder Switch Transformer. ``model(input_ids, attention_mask, decoder_input_ids,
    labels)`` returns a :class:`ModelOutput` (``.logits``, ``.loss``, ``.aux_loss``, ``.z_loss``,
    ``.router_stats``). With ``labels`` and no ``decoder_input_ids``, the decoder input is the
    labels shifted right (``decoder_start_token_id`` first, ``-100`` replaced by padding)."""

    is_encoder_decoder = True  # Hugging Face's name: what generation and serving dispatch on

    def __init__(self, config: SwitchT5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, decoder=False)
        self.decoder = T5Stack(config, decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._head_t = DerivedWeight(transposed_copy)  # the output matrix for few-row decoding steps
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal with the paper's reduced scale for every dense weight (the Switch layers
        initialise themselves the same way); norms start at one."""
        s = self.config.init_scale
        scaled_trunc_normal_(self.shared.weight, fan_in=1, scale=s)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scaled_trunc_normal_(module.weight, fan_in=module.in_features, scale=s)
            elif isinstance(module, T5Attention) and module.relative_attention_bias is not None:
                scaled_trunc_normal_(module.relative_attention_bias.weight, fan_in=self.config.d_model, scale=s)

    # -- pieces ------------------------------------------------------------------------------

    def shift_right(self, labels: Tensor) -> Tensor:
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, stats: RouterStats | None = None
    ) -> Tensor:
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        check_mask("attention_mask", attention_mask, input_ids)
        stats = RouterStats() if stats is None else stats
        h = self.shared(input_ids)
        seq = input_ids.shape[1]
        bias = self.encoder.blocks[0].attn.position_bias(seq, seq) if len(self.encoder.blocks) else None
        mask_bias = padding_bias(attention_mask, h.dtype if bias is None else bias.dtype)
        if mask_bias is not None:
            bias = mask_bias if bias is None else bias + mask_bias
        token_mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(h, bias, token_mask, stats)

    def decoder_self_bias(self, query_len: int, key_len: int, offset: int, mask: Tensor | None, dtype) -> Tensor:
        bias = self.decoder.blocks[0].attn.position_bias(query_len, key_len, offset).to(dtype)
        positions = torch.arange(offset, offset + query_len, device=bias.device)[:, None]
        future = torch.arange(key_len, device=bias.device)[None, :] > positions
        bias = bias.masked_fill(future, torch.finfo(dtype).min)
        mask_bias = padding_bias(mask, dtype)
        return bias if mask_bias is None else bias + mask_bias

    def decode(
        self,
        decoder_input_ids,
        memory,
        memory_mask=None,
        decoder_attention_mask=None,
        cache=None,
        stats=None,
        route_mask=None,
    ):
        """Decoder hidden states ``[B, query_len, d_model]`` of ``decoder_input_ids`` attending to
        ``memory`` (the encoder output; unused with a ``cache``, which holds its keys and values).
        ``decoder_attention_mask``: ``[B, query_len]``, or with a ``cache`` ``[B, cache.length +
        query_len]`` over the cached positions too (rows whose earlier positions are padding: a
        server's batch of requests that joined at different steps). Relative positions are
        counted in columns, so a row's padding on the left changes none of its distances."""
        check_token_ids("decoder_input_ids", decoder_input_ids, self.config.vocab_size)
        offset = cache.length if cache is not None else 0
        if cache is not None and decoder_attention_mask is not None:
            expected = (decoder_input_ids.shape[0], offset + decoder_input_ids.shape[1])
            if tuple(decoder_attention_mask.shape) != expected:
                raise ValueError(
                    f"decoder_attention_mask: shape {tuple(decoder_attention_mask.shape)}; with a cache of {offset} "
                    f"positions it covers them and the new tokens: {expected}"
                )
        else:
            check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
        stats = RouterStats() if stats is None else stats
        h = self.shared(decoder_input_ids)
        query_len = decoder_input_ids.shape[1]
        if cache is not None and decoder_attention_mask is None:
            bias = cache.self_bias[:, :, offset : offset + query_len, : offset + query_len]
        else:
            bias = self.decoder_self_bias(query_len, offset + query_len, offset, decoder_attention_mask, h.dtype)
        if cache is not None:
            memory_bias = cache.cross_bias
        else:
            memory_bias = padding_bias(memory_mask, h.dtype)
        if route_mask is None and decoder_attention_mask is not None:
            route_mask = decoder_attention_mask[:, -query_len:]
        token_mask = None if route_mask is None else route_mask.bool()
        out = self.decoder(h, bias, token_mask, stats, cache=cache, memory=memory, memory_bias=memory_bias)
        if cache is not None:
            cache.length += query_len
        return out

    def output_head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, weight)`` with logits ``x @ weight.T``: tied embeddings scale ``h`` by ``d_model ** -0.5``."""
        if self.lm_head is None:
            return h * self.config.d_model**-0.5, self.shared.weight
        return h, self.lm_head.weight

    def project(self, h: Tensor) -> Tensor:
        x, weight = self.output_head(h)
        return output_logits(x, weight, self._head_t)

    def new_cache(self, memory: Tensor, memory_mask: Tensor | None, max_length: int) -> DecoderCache:
        batch = memory.shape[0]
        heads, d_kv = self.config.num_heads, self.config.d_kv
        shape = (batch, heads, max_length, d_kv)
        layers, size = len(self.decoder.blocks), memory.element_size()
        check_cache_size((2 * layers * batch * heads * max_length * d_kv + heads * max_length**2) * size, max_length,
                         memory.device)  # fmt: skip
        self_kv = [(memory.new_zeros(shape), memory.new_zeros(shape)) for _ in self.decoder.blocks]
        cross_kv = [block.cross_attn.project_kv(memory) for block in self.decoder.blocks]
        cross_bias = padding_bias(memory_mask, memory.dtype)
        if cross_bias is None:
            cross_bias = memory.new_zeros(batch, 1, 1, memory.shape[1])
        # position bias and causal mask for every (query, key) pair the cache can hold, computed once
        self_bias = self.decoder_self_bias(max_length, max_length, 0, None, memory.dtype)
        return DecoderCache(self_kv, cross_kv, cross_bias, self_bias)

    def new_static_cache(
        self, memory: Tensor, memory_mask: Tensor | None, max_length: int, key_valid: Tensor | None = None
    ) -> StaticDecoderCache:
        """A :class:`StaticDecoderCache` of ``max_length`` decoder positions for ``memory`` (the
        encoder output ``[B, S, d_model]``), for :meth:`decode_step`."""
        batch, heads, d_kv = memory.shape[0], self.config.num_heads, self.config.d_kv
        shape = (batch, heads, max_length, d_kv)
        size = memory.element_size()
        check_cache_size(2 * len(self.decoder.blocks) * batch * heads * max_length * d_kv * size, max_length,
                         memory.device)  # fmt: skip
        self_kv = [(memory.new_zeros(shape), memory.new_zeros(shape)) for _ in self.decoder.blocks]
        cross_kv = [block.cross_attn.project_kv(memory) for block in self.decoder.blocks]
        cross_bias = padding_bias(memory_mask, memory.dtype)
        if cross_bias is None:
            cross_bias = memory.new_zeros(batch, 1, 1, memory.shape[1])
        return StaticDecoderCache(self_kv, cross_kv, cross_bias, key_valid)

    def decode_step(
        self, tokens: Tensor, cache: StaticDecoderCache, token_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The static decoding step: logits ``[B, vocab]`` of the next token after feeding
        ``tokens`` ``[B]`` at the cache's ``column``, and each Switch layer's tokens per expert
        (``[num_experts]``, device tensors). Every shape is fixed by the cache and nothing is read
        back to the host, so ``torch.compile(model.decode_step, fullgraph=True)`` captures it whole
        (and ``mode="reduce-overhead"`` replays it as a CUDA graph). The same tokens as
        :meth:`decode` with a :class:`DecoderCache` (``generate(cache_implementation="static")``).
        ``token_mask`` ``[B]`` (bool): rows that are idle (a server's free slots) route nowhere.
        The caller keeps ``column`` below the cache size (the step cannot check it)."""
        column, length = cache.column, cache.self_kv[0][0].shape[2]
        h = self.shared(tokens[:, None])
        dtype = h.dtype
        bias = self.decoder.blocks[0].attn.position_bias(1, length, column).to(dtype)
        future = torch.arange(length, device=h.device) > column
        bias = bias.masked_fill(future, torch.finfo(dtype).min)
        if cache.key_valid is not None:
            bias = bias + padding_bias(cache.key_valid, dtype)
        mask = None if token_mask is None else token_mask[:, None]
        counts = []
        for i, block in enumerate(self.decoder.blocks):
            h, layer_counts = block.forward_static(h, bias, cache, i, mask)
            if layer_counts is not None:
                counts.append(layer_counts)
        h = self.decoder.final_norm(h)
        column.add_(1)
        x, weight = self.output_head(h[:, -1])
        if torch.compiler.is_compiling():
            return x @ weight.t(), counts
        return output_logits(x, weight, self._head_t), counts

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> ModelOutput:
        """Loss (with ``labels``) and logits; ``label_smoothing`` smooths the cross-entropy as
        ``F.cross_entropy``'s (a training choice: 0, the default, scores the model)."""
        stats = RouterStats()
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("input_ids: required unless encoder_hidden_states is given")
            encoder_hidden_states = self.encode(input_ids, attention_mask, stats)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("decoder_input_ids: give decoder_input_ids or labels")
            if labels.dim() != 2 or labels.numel() == 0:
                shape = tuple(labels.shape)
                raise ValueError(f"labels: expected a non-empty [batch, sequence] tensor, got shape {shape}")
            decoder_input_ids = self.shift_right(labels)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(
                f"labels: shape {tuple(labels.shape)} does not match decoder_input_ids {tuple(decoder_input_ids.shape)}"
            )
        route_mask = None
        if decoder_attention_mask is None and labels is not None:
            # Padding known only from the labels is attended to, as in HF (it only ever follows
            # the real tokens), but it takes no expert capacity and stays out of router losses.
            route_mask = labels != -100
        h = self.decode(
            decoder_input_ids,
            encoder_hidden_states,
            attention_mask,
            decoder_attention_mask,
            stats=stats,
            route_mask=route_mask,
        )
        x, weight = self.output_head(h)
        return finish_output(
            self.config, x, weight, labels, stats, ("encoder", "decoder"), encoder_hidden_states, label_smoothing
        )

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Cached decoding: greedy, sampling (temperature, top-k, top-p), repetition penalty or beam
        search (``num_beams``); see :func:`switchformer.inference.generation.generate_seq2seq`."""
        return generate_seq2seq(self, input_ids, attention_mask, **kwargs)

    def num_parameters(self) -> dict[str, int]:

        return parameter_counts(self)
