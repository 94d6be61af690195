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

from switchformer.models.common import is_sparse_layer
from switchformer.models.t5 import SwitchT5, SwitchT5Config

log = logging.getLogger("switchformer")

# HF activation names -> ours (non-gated)
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "silu": "silu",
    "swish": "silu",
}
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


# ----------------------------------------------------------------------------- configs


def _hf_sparse_step(num_layers: int, num_sparse: int) -> int:
    # HF's own rule (configuration_switch_transformers.py), quirks included.
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def config_from_hf(hf: dict) -> SwitchT5Config:
    """Our config from a HF ``config.json`` dict (``switch_transformers`` or ``t5``)."""
    model_type = hf.get("model_type")
    common = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        # transformers >= 5 always ties T5's weights and records the output scaling separately
        tie_word_embeddings=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id")
        if hf.get("decoder_start_token_id") is not None
        else hf.get("pad_token_id", 0) or 0,
    )
    if model_type == "switch_transformers":
        act = hf.get("dense_act_fn", "relu")
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"config.json: dense_act_fn {act!r} is not supported (known: {sorted(_HF_ACTIVATIONS)})")
        num_dec = common["num_decoder_layers"]
        return SwitchT5Config(
            **common,
            activation=_HF_ACTIVATIONS[act],
            num_experts=hf["num_experts"],
            encoder_sparse_step=_hf_sparse_step(hf["num_layers"], hf.get("num_sparse_encoder_layers", 3)),
            decoder_sparse_step=_hf_sparse_step(num_dec, hf.get("num_sparse_decoder_layers", 3)),
            expert_capacity=hf.get("expert_capacity", 64),
            router_jitter_noise=hf.get("router_jitter_noise", 0.01),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            router_z_loss_coef=hf.get("router_z_loss_coef", 0.001),
            init_scale=hf.get("initializer_factor", 1.0),
        )
    if model_type == "t5":
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        gated = parts[0] == "gated"
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in _HF_ACTIVATIONS:
            raise ValueError(f"config.json: feed_forward_proj {proj!r} is not supported")
        ours = _HF_ACTIVATIONS[act]
        if gated:
            gated_names = {"gelu_new": "gated-gelu", "silu": "swiglu"}
            if ours not in gated_names:
                raise ValueError(f"config.json: feed_forward_proj {proj!r} is not supported")
            ours = gated_names[ours]
        return SwitchT5Config(
            **common,
            activation=ours,
            encoder_sparse_step=0,
            decoder_sparse_step=0,
            init_scale=hf.get("initializer_factor", 1.0),
        )
    raise ValueError(f"config.json: model_type {model_type!r} is neither 'switch_transformers' nor 't5'")


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
    sparse = {}
    for stack, layers, step in (
        ("encoder", config.num_layers, config.encoder_sparse_step),
        ("decoder", config.num_decoder_layers, config.decoder_sparse_step),
    ):
        count = sum(is_sparse_layer(i, step) for i in range(layers))
        hf_layout = [is_sparse_layer(i, _hf_sparse_step(layers, count)) for i in range(layers)]
        if hf_layout != [is_sparse_layer(i, step) for i in range(layers)]:
            raise ValueError(
                f"{stack}_sparse_step: the sparse layout of step {step} over {layers} layers "
                "cannot be expressed in Hugging Face's config"
            )
        sparse[stack] = count
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


def _key_pairs(config: SwitchT5Config, flavour: str) -> list[tuple[str, list[str], str]]:
    """(native key, HF keys, how) for every weight. ``how``: ``copy``, ``t`` (transpose),
    ``gated`` (two HF matrices side by side), ``experts_t`` (per-expert matrices, transposed)."""
    pairs = [("shared.weight", ["shared.weight"], "copy")]
    if not config.tie_word_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"], "copy"))
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


def state_dict_from_hf(hf_state: dict[str, Tensor], config: SwitchT5Config, flavour: str) -> dict[str, Tensor]:
    """Convert HF weights to ours; missing or unexpected keys (or wrong shapes) raise, listing them."""
    pairs = _key_pairs(config, flavour)
    expected = {key for _, keys, _ in pairs for key in keys}
    present = set(hf_state) | ({"lm_head.weight"} if "shared.weight" in hf_state else set())
    missing = sorted(expected - present)
    unexpected = sorted(
        k
        for k in hf_state.keys() - expected
        if k not in _TIED_ALIASES and not (k == "lm_head.weight" and config.tie_word_embeddings)
    )
    if missing or unexpected:
        raise ValueError(
            f"checkpoint: keys do not match the config: missing {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)}), unexpected {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    if not config.tie_word_embeddings and "lm_head.weight" not in hf_state:
        hf_state = dict(hf_state, **{"lm_head.weight": hf_state["shared.weight"]})  # tied in memory, unscaled
    if (
        config.tie_word_embeddings
        and "lm_head.weight" in hf_state
        and not torch.equal(hf_state["lm_head.weight"], hf_state["shared.weight"])
    ):
        raise ValueError("checkpoint: lm_head.weight differs from shared.weight but the config ties them")
    state = {}
    for ours, keys, how in pairs:
        tensors = [hf_state[k] for k in keys]
        if how == "copy":
            # an untied head must own its memory even where HF ties it in memory
            state[ours] = tensors[0].clone() if ours == "lm_head.weight" else tensors[0]
        elif how == "t":
            state[ours] = tensors[0].t().contiguous()
        elif how == "gated":
            state[ours] = torch.cat([tensors[0].t(), tensors[1].t()], dim=1).contiguous()
        else:
            state[ours] = torch.stack([t.t() for t in tensors]).contiguous()
    return state


def state_dict_to_hf(model: SwitchT5) -> dict[str, Tensor]:
    config = model.config
    flavour = "switch_transformers" if config.has_sparse_layers else "t5"
    ours = model.state_dict()
    out = {}
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


def _load_directory_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    for index_name, loader in (
        ("model.safetensors.index.json", lambda f: load_file(str(f))),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
    return torch.load(file, map_location="cpu", weights_only=True)  # tensors only, no pickled code


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
        hf_config = json.loads(config_file.read_text())
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
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
