"""Hugging Face configs <-> ours: ``SwitchTransformersConfig`` and ``T5Config`` fields to
:class:`SwitchT5Config` (activations, sparse steps, capacities, tied embeddings) and back."""

from __future__ import annotations

import logging

from switchformer.models.t5 import SwitchT5Config

log = logging.getLogger("switchformer")


# HF activation names (``transformers.activations.ACT2FN``) -> ours; the same function, not a lookalike
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",  # exact (erf) GELU
    "gelu_python": "gelu",
    "gelu_new": "gelu_new",  # tanh approximation
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_python_tanh": "gelu_new",
    "silu": "silu",
    "swish": "silu",
}


# gated FFNs: ``act(x @ wi_0) * (x @ wi_1)``
_HF_GATED_ACTIVATIONS = {"gelu_new": "gated-gelu", "silu": "swiglu"}


# The fields of transformers' config classes with their defaults (``SwitchTransformersConfig``,
# ``T5Config``; transformers 5), so a ``config.json`` that leaves one out reads as transformers reads it.
# tests/test_hf_interop.py checks these tables against transformers' own classes.
SWITCH_FIELDS = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=2048,
    expert_capacity=64,
    num_layers=12,
    num_sparse_encoder_layers=3,
    num_decoder_layers=12,  # not None: a Switch config without it has 12 decoder layers
    num_sparse_decoder_layers=3,
    num_heads=12,
    num_experts=8,
    router_bias=False,
    router_jitter_noise=0.01,
    router_dtype="float32",
    router_ignore_padding_tokens=False,  # stored by transformers' router, never used
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    router_z_loss_coef=0.001,
    router_aux_loss_coef=0.001,
    initializer_factor=1.0,
    dense_act_fn="relu",
    add_router_probs=False,
    use_cache=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=None,
    tie_word_embeddings=True,
    is_decoder=False,
    add_cross_attention=False,
)


T5_FIELDS = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=None,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    feed_forward_proj="relu",
    use_cache=True,
    pad_token_id=0,
    eos_token_id=1,
    classifier_dropout=0.0,
    is_decoder=False,
)


_ALIASES = {
    "switch_transformers": {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
    },
    "t5": {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    },
}


HF_MODEL_TYPES = tuple(_ALIASES)  # the Hugging Face model_type values from_hf reads


_NULLABLE = ("num_decoder_layers", "pad_token_id", "eos_token_id")  # int or null (eos: or a list)


def _hf_sparse_step(num_layers: int, num_sparse: int) -> int:
    # HF's own rule (configuration_switch_transformers.py), quirks included.
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def hf_config_attributes(hf: dict) -> dict:
    """The attributes transformers' config class ends up with for a ``config.json`` dict, in its order:
    class defaults, then the dict's own fields, then ``__post_init__``'s derived values (from the
    fields, before aliases), then every other key of the dict, aliases (``hidden_size``, ...) mapped
    to their fields. So an explicit ``encoder_sparse_step`` beats the one derived from
    ``num_sparse_encoder_layers``, and T5's ``dense_act_fn``/``is_gated_act``/``scale_decoder_outputs``
    beat those derived from ``feed_forward_proj``/``tie_word_embeddings``, as in transformers."""
    model_type = hf.get("model_type")
    if model_type not in _ALIASES:
        raise ValueError(f"config.json: model_type {model_type!r} is neither 'switch_transformers' nor 't5'")
    fields = SWITCH_FIELDS if model_type == "switch_transformers" else T5_FIELDS
    attrs = dict(fields)
    extra = {}
    for key, value in hf.items():
        (attrs if key in fields else extra)[key] = value
    for key, default in fields.items():  # transformers' @strict type checks, for what changes the math
        value = attrs[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and key not in _NULLABLE:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config.json: {key} must be an integer, got {value!r}")
    if attrs["num_decoder_layers"] is None:
        attrs["num_decoder_layers"] = attrs["num_layers"]
    if model_type == "switch_transformers":
        attrs["encoder_sparse_step"] = _hf_sparse_step(attrs["num_layers"], attrs["num_sparse_encoder_layers"])
        attrs["decoder_sparse_step"] = _hf_sparse_step(attrs["num_decoder_layers"], attrs["num_sparse_decoder_layers"])
    else:
        proj = attrs["feed_forward_proj"]
        act_info = proj.split("-") if isinstance(proj, str) else []
        if not act_info or (len(act_info) > 1 and act_info[0] != "gated") or len(act_info) > 2:
            raise ValueError(f"config.json: feed_forward_proj {proj!r} is neither 'ACT' nor 'gated-ACT'")
        attrs["dense_act_fn"] = "gelu_new" if proj == "gated-gelu" else act_info[-1]
        attrs["is_gated_act"] = act_info[0] == "gated"
        # transformers 5 always ties T5's embeddings; the key only says whether outputs are scaled
        attrs["scale_decoder_outputs"] = extra.pop("tie_word_embeddings", None) is not False
        attrs["tie_word_embeddings"] = True
    aliases = _ALIASES[model_type]
    for key, value in extra.items():
        attrs[aliases.get(key, key)] = value
    return attrs


def config_from_hf(hf: dict) -> SwitchT5Config:
    """Our config from a HF ``config.json`` dict (``switch_transformers`` or ``t5``), read as
    transformers reads it (see :func:`hf_config_attributes`). A field that would change the model's
    outputs in a way :class:`SwitchT5` does not implement raises a ``ValueError`` naming it."""
    a = hf_config_attributes(hf)
    switch = a["model_type"] == "switch_transformers"
    for key in ("encoder_sparse_step", "decoder_sparse_step") if switch else ():
        if isinstance(a[key], bool) or not isinstance(a[key], int):
            raise ValueError(f"config.json: {key} must be an integer, got {a[key]!r}")
    pad = a["pad_token_id"] if a["pad_token_id"] is not None else 0
    start = a.get("decoder_start_token_id")
    common = dict(
        vocab_size=a["vocab_size"],
        d_model=a["d_model"],
        d_kv=a["d_kv"],
        d_ff=a["d_ff"],
        num_layers=a["num_layers"],
        num_decoder_layers=a["num_decoder_layers"],
        num_heads=a["num_heads"],
        relative_attention_num_buckets=a["relative_attention_num_buckets"],
        relative_attention_max_distance=a["relative_attention_max_distance"],
        dropout_rate=a["dropout_rate"],
        layer_norm_epsilon=a["layer_norm_epsilon"],
        # output scaling by d_model ** -0.5 (and, for us, one matrix for input and output embeddings)
        tie_word_embeddings=a["tie_word_embeddings"] if switch else bool(a["scale_decoder_outputs"]),
        pad_token_id=pad,
        eos_token_id=_first(a["eos_token_id"]) if a["eos_token_id"] is not None else 1,
        decoder_start_token_id=start if start is not None else pad,
        init_scale=a["initializer_factor"],
    )
    if switch:
        if a["router_bias"]:
            raise ValueError("config.json: router_bias true is not supported (switchformer's routers have no bias)")
        if a["router_dtype"] != "float32":
            raise ValueError(
                f"config.json: router_dtype {a['router_dtype']!r} is not supported "
                "(switchformer routes in float32, the paper's selective precision)"
            )
        act = a["dense_act_fn"]
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"config.json: dense_act_fn {act!r} is not supported (known: {sorted(_HF_ACTIVATIONS)})")
        # HF's stack: layer i is sparse iff step > 0 and (step == 1 or i % step == 1); so is ours
        return SwitchT5Config(
            **common,
            activation=_HF_ACTIVATIONS[act],
            num_experts=a["num_experts"],
            encoder_sparse_step=max(a["encoder_sparse_step"], 0),
            decoder_sparse_step=max(a["decoder_sparse_step"], 0),
            expert_capacity=a["expert_capacity"],
            router_jitter_noise=a["router_jitter_noise"],
            router_aux_loss_coef=a["router_aux_loss_coef"],
            router_z_loss_coef=a["router_z_loss_coef"],
        )
    act = a["dense_act_fn"]
    if act not in _HF_ACTIVATIONS:
        raise ValueError(
            f"config.json: feed_forward_proj {a['feed_forward_proj']!r} (dense_act_fn {act!r}) is not supported "
            f"(known activations: {sorted(_HF_ACTIVATIONS)})"
        )
    ours = _HF_ACTIVATIONS[act]
    if a["is_gated_act"]:
        if ours not in _HF_GATED_ACTIVATIONS:
            raise ValueError(
                f"config.json: feed_forward_proj {a['feed_forward_proj']!r} (gated {act!r}) is not supported "
                "(gated FFNs: gated-gelu with the tanh approximation, gated-silu)"
            )
        ours = _HF_GATED_ACTIVATIONS[ours]
    return SwitchT5Config(**common, activation=ours, encoder_sparse_step=0, decoder_sparse_step=0)


def _first(value):
    return value[0] if isinstance(value, list) else value


def config_to_hf(config: SwitchT5Config) -> dict:
    """HF ``config.json`` dict: ``switch_transformers`` if the model has sparse layers, else ``t5``."""
    common = dict(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate,
        layer_norm_epsilon=config.layer_norm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        is_encoder_decoder=True,
    )
    if not config.has_sparse_layers:
        gated = {"gated-gelu": "gated-gelu", "swiglu": "gated-silu"}
        plain = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "silu": "silu"}
        proj = gated.get(config.activation) or plain[config.activation]
        return dict(common, model_type="t5", architectures=["T5ForConditionalGeneration"], feed_forward_proj=proj)
    if config.activation not in ("relu", "gelu", "gelu_new", "silu"):
        raise ValueError(
            f"activation: Hugging Face SwitchTransformers has no gated FFN; cannot export {config.activation!r}"
        )
    if config.top_k != 1:
        raise ValueError("top_k: Hugging Face SwitchTransformers routes top-1 only")
    # transformers honours explicit sparse steps (they beat num_sparse_*_layers), so every layout of ours
    # is expressible; the counts are written too, for readers that look at them
    sparse = {stack: sum(config.sparse_layers(stack)) for stack in ("encoder", "decoder")}
    capacity = config.expert_capacity
    if capacity is None:
        capacity = 64
        log.warning(
            "to_hf: Hugging Face uses an absolute per-sequence expert_capacity; writing %d "
            "(this model routes with capacity factors)",
            capacity,
        )
    return dict(
        common,
        model_type="switch_transformers",
        architectures=["SwitchTransformersForConditionalGeneration"],
        num_experts=config.num_experts,
        num_sparse_encoder_layers=sparse["encoder"],
        num_sparse_decoder_layers=sparse["decoder"],
        encoder_sparse_step=config.encoder_sparse_step,
        decoder_sparse_step=config.decoder_sparse_step,
        expert_capacity=capacity,
        router_jitter_noise=config.router_jitter_noise,
        router_aux_loss_coef=config.router_aux_loss_coef,
        router_z_loss_coef=config.router_z_loss_coef,
        dense_act_fn=config.activation,
        router_bias=False,
        router_dtype="float32",
        initializer_factor=config.init_scale,
    )
