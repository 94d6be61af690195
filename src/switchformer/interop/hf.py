"""Hugging Face interop: load ``SwitchTransformersForConditionalGeneration`` and dense
``T5ForConditionalGeneration`` checkpoints (a directory or an in-memory model) into
:class:`SwitchT5`, and export back to a directory ``transformers`` loads.

Reading a directory needs only ``safetensors`` and ``torch`` (no ``transformers``): ``config.json``
plus ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
(sharded or not) read with ``torch.load(weights_only=True)``, so no pickled code ever runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from switchformer.data.files import read_json
from switchformer.models.t5 import SwitchT5, SwitchT5Config
from switchformer.runs.files import default_file_mode

log = logging.getLogger("switchformer")

# ----------------------------------------------------------------------------- configs

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


# ----------------------------------------------------------------------------- weights

_SHARED, _ENC_EMBED, _DEC_EMBED, _LM_HEAD = (
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "lm_head.weight",
)
_EMBEDDING_KEYS = (_SHARED, _ENC_EMBED, _DEC_EMBED, _LM_HEAD)
# Unused by transformers' model and skipped by its loader (``_keys_to_ignore_on_load_unexpected``):
# early T5 checkpoints hold a position bias for the first cross-attention, which T5 never applies.
_IGNORED_KEYS = {"t5": ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)}


def _key_pairs(config: SwitchT5Config, flavour: str) -> list[tuple[str, list[str], str]]:
    """(native key, HF keys, how) for every weight but the embeddings and the output head (see
    :func:`_embeddings_from_hf`). ``how``: ``copy``, ``t`` (transpose), ``gated`` (two HF matrices
    side by side), ``experts_t`` (per-expert matrices, transposed)."""
    pairs = []
    for stack in ("encoder", "decoder"):
        decoder = stack == "decoder"
        ff = 2 if decoder else 1
        for i, sparse in enumerate(config.sparse_layers(stack)):
            ours, hf = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            pairs.append((f"{ours}.attn_norm.weight", [f"{hf}.0.layer_norm.weight"], "copy"))
            for name in "qkvo":
                pairs.append((f"{ours}.attn.{name}.weight", [f"{hf}.0.SelfAttention.{name}.weight"], "copy"))
            if i == 0:
                pairs.append(
                    (
                        f"{ours}.attn.relative_attention_bias.weight",
                        [f"{hf}.0.SelfAttention.relative_attention_bias.weight"],
                        "copy",
                    )
                )
            if decoder:
                pairs.append((f"{ours}.cross_norm.weight", [f"{hf}.1.layer_norm.weight"], "copy"))
                for name in "qkvo":
                    pairs.append(
                        (f"{ours}.cross_attn.{name}.weight", [f"{hf}.1.EncDecAttention.{name}.weight"], "copy")
                    )
            pairs.append((f"{ours}.ffn_norm.weight", [f"{hf}.{ff}.layer_norm.weight"], "copy"))
            if sparse:
                mlp = f"{hf}.{ff}.mlp"
                pairs.append((f"{ours}.ffn.mlp.router.weight", [f"{mlp}.router.classifier.weight"], "copy"))
                for w, hf_name in (("w_in", "wi"), ("w_out", "wo")):
                    keys = [f"{mlp}.experts.expert_{e}.{hf_name}.weight" for e in range(config.num_experts)]
                    pairs.append((f"{ours}.ffn.mlp.experts.{w}", keys, "experts_t"))
            else:
                mlp = f"{hf}.{ff}.mlp" if flavour == "switch_transformers" else f"{hf}.{ff}.DenseReluDense"
                if config.activation in ("gated-gelu", "swiglu"):
                    pairs.append((f"{ours}.ffn.mlp.w_in", [f"{mlp}.wi_0.weight", f"{mlp}.wi_1.weight"], "gated"))
                else:
                    pairs.append((f"{ours}.ffn.mlp.w_in", [f"{mlp}.wi.weight"], "t"))
                pairs.append((f"{ours}.ffn.mlp.w_out", [f"{mlp}.wo.weight"], "t"))
        pairs.append((f"{stack}.final_norm.weight", [f"{stack}.final_layer_norm.weight"], "copy"))
    return pairs


def _hf_ties_embeddings(config: SwitchT5Config, flavour: str) -> bool:
    """Whether transformers 5 ties ``encoder/decoder.embed_tokens`` and ``lm_head`` to ``shared``:
    always for T5 (its ``tie_word_embeddings`` only scales the output), only when
    ``tie_word_embeddings`` for SwitchTransformers (otherwise all four are separate matrices, and
    ``shared`` feeds neither stack)."""
    return flavour == "t5" or config.tie_word_embeddings


def _embeddings_from_hf(hf_state: dict[str, Tensor], config: SwitchT5Config, flavour: str) -> dict[str, Tensor]:
    """Our ``shared.weight`` (and ``lm_head.weight`` when untied) from HF's four embedding matrices,
    resolved as transformers' loader resolves them; every one that is present must be the matrix our
    model uses in its place, or this raises naming it."""
    present = {k: hf_state[k] for k in _EMBEDDING_KEYS if k in hf_state}
    if _hf_ties_embeddings(config, flavour):
        # transformers ties each missing matrix to one that is present (the same for all of them)
        source = present.get(_SHARED)
        if source is None:
            source = next(iter(present.values()), None)
        effective = {k: present.get(k, source) for k in _EMBEDDING_KEYS}
    else:
        effective = dict(present)
        if _ENC_EMBED not in present and _DEC_EMBED not in present and _SHARED in present:
            # switchformer's to_hf wrote untied Switch models this way before it wrote the stacks' matrices
            # (transformers 4 reads it so; transformers 5 would initialise both at random)
            log.warning(
                "from_hf: %s and %s are missing; using %s for both (transformers 5 would initialise them at random)",
                _ENC_EMBED,
                _DEC_EMBED,
                _SHARED,
            )
            effective[_ENC_EMBED] = effective[_DEC_EMBED] = present[_SHARED]
        effective.setdefault(_SHARED, effective.get(_ENC_EMBED))  # transformers' forward never reads it
    missing = [k for k in _EMBEDDING_KEYS if effective.get(k) is None]
    if missing:
        raise ValueError(f"checkpoint: keys do not match the config: missing {missing} ({len(missing)})")
    embed = effective[_ENC_EMBED]
    if not torch.equal(effective[_DEC_EMBED], embed):
        raise ValueError(
            f"checkpoint: {_DEC_EMBED} differs from {_ENC_EMBED}; transformers embeds each stack's tokens "
            "with its own matrix, switchformer's SwitchT5 with one shared matrix"
        )
    if not torch.equal(effective[_SHARED], embed):
        raise ValueError(
            f"checkpoint: {_SHARED} differs from {_ENC_EMBED} and {_DEC_EMBED}, which transformers embeds "
            f"the tokens with; switchformer's SwitchT5 has one input embedding and cannot hold {_SHARED} as well"
        )
    if config.tie_word_embeddings:
        if not torch.equal(effective[_LM_HEAD], embed):
            raise ValueError(
                f"checkpoint: {_LM_HEAD} differs from the input embedding ({_SHARED}) but the config ties "
                "them (tie_word_embeddings: outputs scaled by d_model ** -0.5 through the shared matrix)"
            )
        return {"shared.weight": embed}
    # an untied head must own its memory even where HF ties it in memory
    return {"shared.weight": embed, "lm_head.weight": effective[_LM_HEAD].clone()}


def state_dict_from_hf(hf_state: dict[str, Tensor], config: SwitchT5Config, flavour: str) -> dict[str, Tensor]:
    """Convert HF weights to ours. Every tensor of ``hf_state`` is used or refused: missing or
    unexpected keys raise listing them, and so does an embedding matrix our model cannot hold."""
    pairs = _key_pairs(config, flavour)
    expected = {key for _, keys, _ in pairs for key in keys}
    missing = sorted(expected - set(hf_state))
    ignored = {k for k in _IGNORED_KEYS.get(flavour, ()) if k in hf_state}
    unexpected = sorted(hf_state.keys() - expected - set(_EMBEDDING_KEYS) - ignored)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint: keys do not match the config: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)}), unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    if ignored:
        log.info("from_hf: skipping %s (transformers' model has no such weight and skips it too)", sorted(ignored))
    state = _embeddings_from_hf(hf_state, config, flavour)
    for ours, keys, how in pairs:
        tensors = [hf_state[k] for k in keys]
        if how == "copy":
            state[ours] = tensors[0]
        elif how == "t":
            state[ours] = tensors[0].t().contiguous()
        elif how == "gated":
            state[ours] = torch.cat([tensors[0].t(), tensors[1].t()], dim=1).contiguous()
        else:
            state[ours] = torch.stack([t.t() for t in tensors]).contiguous()
    return state


def state_dict_to_hf(model: SwitchT5) -> dict[str, Tensor]:
    """HF's weights for ``model``: every matrix transformers' model holds that its loader does not
    tie to another (so it loads with no missing keys); repeated matrices are separate copies."""
    config = model.config
    flavour = "switch_transformers" if config.has_sparse_layers else "t5"
    ours = model.state_dict()
    out = {_SHARED: ours["shared.weight"].contiguous()}
    if not config.tie_word_embeddings:
        out[_LM_HEAD] = ours["lm_head.weight"].contiguous()
    if not _hf_ties_embeddings(config, flavour):  # untied Switch: each stack embeds with its own matrix
        out[_ENC_EMBED] = ours["shared.weight"].detach().clone().contiguous()
        out[_DEC_EMBED] = ours["shared.weight"].detach().clone().contiguous()
    for native, keys, how in _key_pairs(config, flavour):
        tensor = ours[native]
        if how == "copy":
            out[keys[0]] = tensor.contiguous()
        elif how == "t":
            out[keys[0]] = tensor.t().contiguous()
        elif how == "gated":
            gate, linear = tensor.chunk(2, dim=1)
            out[keys[0]], out[keys[1]] = gate.t().contiguous(), linear.t().contiguous()
        else:
            for key, expert in zip(keys, tensor.unbind(0)):
                out[key] = expert.t().contiguous()
    return out


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    """The tensors of ``file``; a damaged file is a ``ValueError`` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except OSError:
        raise
    except Exception as err:  # safetensors' own error type (a Rust panic for a bad header)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{file}: damaged or not a safetensors file ({reason})") from None


def _load_directory_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    for index_name, loader in (
        ("model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = path / index_name
        if index.exists():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            state = {}
            for shard in shards:
                if not (path / shard).exists():
                    raise FileNotFoundError(f"{path / shard}: shard named in {index_name} is missing")
                state.update(loader(path / shard))
            return state
    if (path / "pytorch_model.bin").exists():
        return _load_bin(path / "pytorch_model.bin")
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def _load_bin(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    except OSError:
        raise
    except Exception as err:  # a cut or foreign file: unpickling, zip or weights-only errors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{file}: damaged, or holds more than tensors ({reason})") from None


def from_hf(source) -> SwitchT5:
    """A :class:`SwitchT5` with the weights and outputs of a HF Switch/T5 model or checkpoint dir."""
    if isinstance(source, nn.Module):
        hf_config = source.config.to_dict()
        hf_state = {k: v.detach() for k, v in source.state_dict().items()}
    else:
        path = Path(source)
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: not found (expected a Hugging Face model directory)")
        hf_config = read_json(config_file)
        hf_state = _load_directory_weights(path)
    config = config_from_hf(hf_config)
    flavour = hf_config.get("model_type")
    state = state_dict_from_hf(hf_state, config, flavour)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = SwitchT5(config)
    model.load_state_dict(state, strict=True, assign=True)
    # meta buffers (none today) would need materialising; parameters now hold the loaded tensors
    return model.to(dtype)


def to_hf(model: SwitchT5, out_dir) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` loads; atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config)
    state = {k: v.detach().cpu() for k, v in state_dict_to_hf(model).items()}
    _atomic_write(out / "model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would keep others from reading the export
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
