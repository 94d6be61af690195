"""Hugging Face weights <-> ours: the key mapping of ``SwitchTransformersForConditionalGeneration`` and
T5 state dicts (stacked experts from per-expert keys, tied or untied embeddings), and reading a
checkpoint directory's weights: ``model.safetensors``, a sharded index, or ``pytorch_model.bin``
(sharded or not) read with ``torch.load(weights_only=True)``, so no pickled code ever runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from switchformer.models.t5 import SwitchT5, SwitchT5Config
from switchformer.moe.offload import ExpertSource
from switchformer.runs.files import read_json
from switchformer.runs.lazy_tensors import LazyTensors

log = logging.getLogger("switchformer")

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


def state_dict_from_hf(
    hf_state: Mapping[str, Tensor], config: SwitchT5Config, flavour: str, experts: bool = True
) -> dict[str, Tensor]:
    """Convert HF weights to ours. Every tensor of ``hf_state`` is used or refused: missing or
    unexpected keys raise listing them, and so does an embedding matrix our model cannot hold.
    Without ``experts`` the Switch layers' experts are left out (see :func:`expert_sources_from_hf`)."""
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
        if how == "experts_t" and not experts:
            continue
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


def expert_sources_from_hf(
    hf_state: Mapping[str, Tensor], config: SwitchT5Config, flavour: str
) -> dict[str, ExpertSource]:
    """Switch layer name -> the source of its experts: expert ``e``'s ``(w_in, w_out)`` in our layout,
    transposed views of HF's per-expert matrices (read when used)."""
    keys: dict[str, dict[str, list[str]]] = {}
    for ours, hf_keys, how in _key_pairs(config, flavour):
        if how == "experts_t":
            layer, weight = ours.rsplit(".experts.", 1)
            keys.setdefault(layer, {})[weight] = hf_keys

    def source(w_in: list[str], w_out: list[str]) -> ExpertSource:
        return lambda e: (hf_state[w_in[e]].t(), hf_state[w_out[e]].t())

    return {layer: source(k["w_in"], k["w_out"]) for layer, k in keys.items()}


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


def weight_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: ``model.safetensors``, the shards of a sharded
    index (safetensors or ``.bin``), or ``pytorch_model.bin``; a missing shard is named."""
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: expected a 'weight_map' object (tensor name -> shard file)")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (path / shard).exists():
                    raise FileNotFoundError(f"{path / shard}: shard named in {index_name} is missing")
            return [path / shard for shard in shards]
    if (path / "pytorch_model.bin").exists():
        return [path / "pytorch_model.bin"]
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def load_directory_weights(path: Path) -> LazyTensors:
    """The tensors of a Hugging Face directory by name, memory-mapped and read on access."""
    return LazyTensors(weight_files(Path(path)))
