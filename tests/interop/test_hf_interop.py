"""Hugging Face interop: what ``to_hf`` writes loads in ``transformers`` with
no missing or unexpected keys and the same logits; every tensor ``from_hf`` reads is used or refused by
name; ``config.json`` is read field by field as transformers' own config classes and models read it."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from switchformer.interop import hf_config as interop  # noqa: E402
from switchformer.interop.hf import from_hf, to_hf  # noqa: E402
from switchformer.interop.hf_config import config_from_hf  # noqa: E402
from switchformer.interop.hf_weights import state_dict_from_hf  # noqa: E402
from switchformer.models.t5 import SwitchT5, SwitchT5Config  # noqa: E402
from switchformer.moe.experts import ACTIVATIONS  # noqa: E402

pytestmark = [pytest.mark.hf]

TINY = dict(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=24, dropout_rate=0.0, decoder_start_token_id=0)
SWITCH_BASE = dict(
    TINY,
    model_type="switch_transformers",
    num_layers=4,
    num_decoder_layers=3,
    num_experts=4,
    num_sparse_encoder_layers=2,
    num_sparse_decoder_layers=1,
    router_jitter_noise=0.0,
)
T5_BASE = dict(TINY, model_type="t5", num_layers=3, num_decoder_layers=2, feed_forward_proj="relu")
HF_CLASSES = {
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration"),
    "t5": ("T5Config", "T5ForConditionalGeneration"),
}


def hf_config(d: dict):
    """transformers' config object for a ``config.json`` dict, built as ``from_pretrained`` builds it."""
    config_cls = getattr(transformers, HF_CLASSES[d["model_type"]][0])
    return config_cls.from_dict({k: v for k, v in d.items() if k != "model_type"})


def hf_model(d: dict, seed: int = 0):
    """A transformers model for ``d`` with weights SwitchT5 can hold: the stacks embed with the shared
    matrix (transformers 5 gives an untied Switch model three separate random ones), routers spread."""
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[d["model_type"]][1])(hf_config(d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(0, 1.0)
        for stack in (model.encoder, model.decoder):
            if stack.embed_tokens.weight is not model.shared.weight:
                stack.embed_tokens.weight.copy_(model.shared.weight)
    return model


def inputs(seed=1, batch=2, src=11, tgt=7, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, src), generator=g), torch.randint(2, vocab, (batch, tgt), generator=g)


def logits(model, ids, decoder_ids):
    with torch.no_grad():
        if isinstance(model, SwitchT5):
            return model(ids, decoder_input_ids=decoder_ids).logits
        return model(input_ids=ids, decoder_input_ids=decoder_ids).logits


def hf_sparse_layers(model) -> dict[str, list[bool]]:
    """Which layers of the instantiated transformers model hold a Switch layer."""
    return {
        stack: [bool(getattr(block.layer[-1], "is_sparse", False)) for block in getattr(model, stack).block]
        for stack in ("encoder", "decoder")
    }


def ours_sparse_layers(model: SwitchT5) -> dict[str, list[bool]]:
    return {stack: model.config.sparse_layers(stack) for stack in ("encoder", "decoder")}


def load_hf_dir(path, model_type):
    cls = getattr(transformers, HF_CLASSES[model_type][1])
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def assert_loads_cleanly(info):
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


# ----------------------------------------------------------------------------- round trips


def untie_head(model, seed=5):
    """A separate output matrix, as in T5 v1.1 and untied Switch checkpoints."""
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
    return model


ROUND_TRIPS = {
    "switch-tied": lambda: hf_model(dict(SWITCH_BASE, expert_capacity=3)),  # capacity 3: tokens dropped
    "switch-untied": lambda: untie_head(hf_model(dict(SWITCH_BASE, tie_word_embeddings=False))),
    "switch-untied-gelu": lambda: untie_head(
        hf_model(dict(SWITCH_BASE, tie_word_embeddings=False, dense_act_fn="gelu_new", num_sparse_encoder_layers=4))
    ),
    "t5-v1.0": lambda: hf_model(dict(T5_BASE, feed_forward_proj="relu")),  # relu, tied and scaled
    "t5-v1.1": lambda: untie_head(hf_model(dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False))),
    "t5-untied-tied-matrix": lambda: hf_model(dict(T5_BASE, feed_forward_proj="gated-silu", tie_word_embeddings=False)),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_round_trip_through_transformers(kind, tmp_path):
    hf = ROUND_TRIPS[kind]()
    model_type = hf.config.model_type
    ids, labels = inputs()
    want = logits(hf, ids, labels)
    ours = from_hf(hf).eval()
    torch.testing.assert_close(logits(ours, ids, labels), want, rtol=1e-5, atol=1e-5)

    to_hf(ours, tmp_path / "out")
    reloaded, info = load_hf_dir(tmp_path / "out", model_type)
    assert_loads_cleanly(info)
    assert hf_sparse_layers(reloaded) == hf_sparse_layers(hf)
    torch.testing.assert_close(logits(reloaded, ids, labels), want, rtol=1e-5, atol=1e-5)

    again = from_hf(tmp_path / "out").eval()  # and back from the directory: the same weights
    assert again.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_native_models_export_with_equal_logits(tied, sparse, tmp_path):
    """Models built here (the issue's case: an untied SwitchT5) load in transformers with every
    weight from the file and our logits."""
    torch.manual_seed(0)
    config = SwitchT5Config(
        **TINY,
        num_layers=3,
        num_decoder_layers=2,
        num_experts=4,
        encoder_sparse_step=2 if sparse else 0,
        decoder_sparse_step=1 if sparse else 0,
        expert_capacity=64,
        tie_word_embeddings=tied,
        init_scale=1.0,
    )
    ours = SwitchT5(config).eval()
    to_hf(ours, tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert model_type == ("switch_transformers" if sparse else "t5")
    if sparse and not tied:  # transformers 5 reads an untied Switch model's stacks from their own matrices
        assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"} <= written.keys()
    reloaded, info = load_hf_dir(tmp_path, model_type)
    assert_loads_cleanly(info)
    ids, labels = inputs()
    torch.testing.assert_close(logits(reloaded, ids, labels), logits(ours, ids, labels), rtol=1e-5, atol=1e-5)


def test_export_writes_layouts_that_num_sparse_layers_cannot_express(tmp_path):
    """Five layers with a Switch layer every third (layers 1 and 4): transformers' rule from two sparse
    layers would give 1 and 3; the explicit steps it honours keep ours."""
    torch.manual_seed(0)
    config = SwitchT5Config(
        **TINY,
        num_layers=5,
        num_decoder_layers=5,
        num_experts=2,
        encoder_sparse_step=3,
        decoder_sparse_step=4,
        expert_capacity=64,
        init_scale=1.0,
    )
    ours = SwitchT5(config).eval()
    to_hf(ours, tmp_path)
    reloaded, info = load_hf_dir(tmp_path, "switch_transformers")
    assert_loads_cleanly(info)
    assert (
        hf_sparse_layers(reloaded)
        == ours_sparse_layers(ours)
        == {
            "encoder": [False, True, False, False, True],
            "decoder": [False, True, False, False, False],
        }
    )
    ids, labels = inputs()
    torch.testing.assert_close(logits(reloaded, ids, labels), logits(ours, ids, labels), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- every tensor used or refused


def saved(hf, path, edit=None):
    """``hf`` saved by transformers, then its weights edited by ``edit(state)``."""
    hf.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    if edit is not None:
        edit(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def _randn_like(t, seed=3):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))


def _set(key, value_of):
    return lambda state: state.__setitem__(key, value_of(state))


REFUSED = {
    # a tensor no layer reads
    "unused bias": (
        SWITCH_BASE,
        _set("encoder.block.0.layer.0.SelfAttention.q.bias", lambda s: torch.zeros(8)),
        r"unexpected \['encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias'\]",
    ),
    # transformers embeds the decoder's tokens with its own matrix: one shared matrix cannot hold both
    "switch untied, decoder embedding differs": (
        dict(SWITCH_BASE, tie_word_embeddings=False),
        _set("decoder.embed_tokens.weight", lambda s: _randn_like(s["shared.weight"])),
        "decoder.embed_tokens.weight differs",
    ),
    # transformers' untied Switch model never reads `shared`; a different one would be lost
    "switch untied, stale shared": (
        dict(SWITCH_BASE, tie_word_embeddings=False),
        _set("shared.weight", lambda s: _randn_like(s["shared.weight"])),
        "shared.weight differs",
    ),
    "switch untied, head missing": (
        dict(SWITCH_BASE, tie_word_embeddings=False),
        lambda s: s.pop("lm_head.weight"),
        r"missing \['lm_head\.weight'\]",
    ),
    # tied config (scaled output) with a head of its own: transformers unties it, we cannot
    "switch tied, head differs": (
        SWITCH_BASE,
        _set("lm_head.weight", lambda s: _randn_like(s["shared.weight"])),
        "lm_head.weight differs",
    ),
    "t5 v1.0, head differs": (
        T5_BASE,
        _set("lm_head.weight", lambda s: _randn_like(s["shared.weight"])),
        "lm_head.weight differs",
    ),
    # transformers 5 unties T5's stack embeddings when the checkpoint holds different ones
    "t5, encoder embedding differs": (
        T5_BASE,
        _set("encoder.embed_tokens.weight", lambda s: _randn_like(s["shared.weight"])),
        "decoder.embed_tokens.weight differs from encoder.embed_tokens.weight",
    ),
    "t5, both stack embeddings differ from shared": (
        T5_BASE,
        lambda s: s.update(
            {k: _randn_like(s["shared.weight"]) for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
        ),
        "shared.weight differs",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_tensor_that_would_be_lost_is_refused_by_name(case, tmp_path):
    config, edit, message = REFUSED[case]
    path = saved(hf_model(config), tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        from_hf(path)


def test_every_embedding_matrix_transformers_reads_is_ours(tmp_path):
    """Checkpoints whose stacks' matrices equal ``shared`` (transformers' own untied files, old
    ``.bin`` files holding every name) load with transformers' logits."""
    hf = untie_head(hf_model(dict(SWITCH_BASE, tie_word_embeddings=False)))
    saved(hf, tmp_path)
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= load_file(
        str(tmp_path / "model.safetensors")
    ).keys()
    ids, labels = inputs()
    torch.testing.assert_close(
        logits(from_hf(tmp_path).eval(), ids, labels), logits(hf, ids, labels), rtol=1e-5, atol=1e-5
    )


def test_early_t5_cross_attention_bias_is_skipped_as_transformers_skips_it():
    hf = hf_model(T5_BASE)
    state = dict(hf.state_dict())
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(32, 2)
    config = config_from_hf(hf.config.to_dict())
    converted = state_dict_from_hf(state, config, "t5")
    assert set(converted) == set(SwitchT5(config).state_dict())
    state["decoder.block.1.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(32, 2)
    with pytest.raises(ValueError, match=r"unexpected \['decoder\.block\.1\.layer\.1\.EncDecAttention"):
        state_dict_from_hf(state, config, "t5")


def test_untied_switch_written_before_the_fix_still_loads(tmp_path, caplog):
    """``shared`` and ``lm_head`` only (what ``to_hf`` wrote for untied Switch models before): read as
    transformers 4 reads it, the stacks embedding with ``shared``, and said so."""
    hf = untie_head(hf_model(dict(SWITCH_BASE, tie_word_embeddings=False)))
    saved(hf, tmp_path, lambda s: [s.pop(k) for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")])
    ids, labels = inputs()
    with caplog.at_level(logging.WARNING, logger="switchformer"):
        model = from_hf(tmp_path).eval()
    assert "encoder.embed_tokens.weight" in caplog.text
    torch.testing.assert_close(logits(model, ids, labels), logits(hf, ids, labels), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sparse steps


@pytest.mark.parametrize(
    "fields",
    [
        dict(num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, encoder_sparse_step=2, decoder_sparse_step=2),
        dict(num_sparse_encoder_layers=3, num_sparse_decoder_layers=3, encoder_sparse_step=1, decoder_sparse_step=3),
        dict(num_sparse_encoder_layers=1, num_sparse_decoder_layers=2, encoder_sparse_step=2, decoder_sparse_step=0),
    ],
)
def test_sparse_steps_in_config_json_are_honoured(fields, tmp_path):
    """4+4 layers whose ``config.json`` holds sparse steps that disagree with ``num_sparse_*_layers``:
    we build the Switch layers transformers builds, and give its logits."""
    d = dict(SWITCH_BASE, num_layers=4, num_decoder_layers=4, **fields)
    hf = hf_model(d)
    layout = hf_sparse_layers(hf)
    derived = {  # what num_sparse_*_layers alone would give: a different model
        stack: [i % (4 // n) == 1 or 4 // n == 1 for i in range(4)]
        for stack, n in (("encoder", d["num_sparse_encoder_layers"]), ("decoder", d["num_sparse_decoder_layers"]))
    }
    assert layout != derived
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(d))  # exactly these fields, nothing else
    ids, labels = inputs()
    want = logits(hf, ids, labels)
    for source in (hf, tmp_path):
        ours = from_hf(source).eval()
        assert ours_sparse_layers(ours) == layout
        torch.testing.assert_close(logits(ours, ids, labels), want, rtol=1e-5, atol=1e-5)


def test_switch_base_8_shaped_config_with_steps():
    """The issue's config: 12+12 layers, d_model 768, 8 experts, steps 2 and the default three sparse
    layers: six Switch layers per stack (odd layers), as transformers builds."""
    d = dict(
        model_type="switch_transformers",
        num_layers=12,
        num_decoder_layers=12,
        d_model=768,
        num_experts=8,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
    )
    config = config_from_hf(d)
    hf = hf_config(d)
    for stack, step in (("encoder", hf.encoder_sparse_step), ("decoder", hf.decoder_sparse_step)):
        assert config.sparse_layers(stack) == [i % 2 == 1 for i in range(12)]
        assert config.sparse_layers(stack) == [step == 1 or i % step == 1 for i in range(12)]


# ----------------------------------------------------------------------------- field by field

ABSENT = object()
# (model type, field, value or ABSENT, None or the field a refusal must name)
FIELD_CASES = [
    *[
        ("switch_transformers", field, value, None)
        for field, values in {
            "vocab_size": [ABSENT, 80],
            "d_model": [ABSENT, 24],
            "d_kv": [ABSENT, 6],
            "d_ff": [ABSENT, 8],
            "expert_capacity": [ABSENT, 2],
            "num_layers": [ABSENT, 1, 6],
            "num_sparse_encoder_layers": [ABSENT, 0, 1, 3, 5],
            "num_decoder_layers": [ABSENT, None, 1, 5],
            "num_sparse_decoder_layers": [ABSENT, 0, 2],
            "num_heads": [ABSENT, 3],
            "num_experts": [ABSENT, 2],
            "router_bias": [ABSENT, False],
            "router_jitter_noise": [ABSENT, 0.2],
            "router_dtype": [ABSENT, "float32"],
            "router_ignore_padding_tokens": [True],  # stored by transformers' router, never used
            "relative_attention_num_buckets": [ABSENT, 8],
            "relative_attention_max_distance": [ABSENT, 4],
            "dropout_rate": [ABSENT, 0.3],
            "layer_norm_epsilon": [ABSENT, 0.5],
            "router_z_loss_coef": [ABSENT, 0.5],
            "router_aux_loss_coef": [ABSENT, 0.25],
            "initializer_factor": [ABSENT, 0.5],
            "dense_act_fn": [ABSENT, "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "gelu_python"],
            "add_router_probs": [True],
            "use_cache": [False],
            "pad_token_id": [ABSENT, 3],
            "eos_token_id": [ABSENT, 2, [2, 5]],
            "tie_word_embeddings": [ABSENT, True, False],
            "encoder_sparse_step": [0, 1, 3, 5, -1],
            "decoder_sparse_step": [0, 1, 2],
            "hidden_size": [24],  # an alias of d_model; it wins over d_model
            "num_attention_heads": [4],
            "num_hidden_layers": [2],  # aliased after the sparse step is derived from num_layers' old value
            "decoder_start_token_id": [ABSENT, 5],
            "scale_decoder_outputs": [False],  # a T5 field: SwitchTransformers never reads it
            "is_gated_act": [True],  # likewise
        }.items()
        for value in values
    ],
    ("switch_transformers", "router_bias", True, "router_bias"),
    ("switch_transformers", "router_dtype", "bfloat16", "router_dtype"),
    ("switch_transformers", "dense_act_fn", "quick_gelu", "dense_act_fn"),
    ("switch_transformers", "dense_act_fn", "gelu_fast", "dense_act_fn"),
    ("switch_transformers", "encoder_sparse_step", None, "encoder_sparse_step"),
    *[
        ("t5", field, value, None)
        for field, values in {
            "vocab_size": [ABSENT, 80],
            "d_model": [ABSENT, 24],
            "d_kv": [ABSENT, 6],
            "d_ff": [ABSENT, 8],
            "num_layers": [ABSENT, 1],
            "num_decoder_layers": [ABSENT, None, 4],
            "num_heads": [ABSENT, 3],
            "relative_attention_num_buckets": [ABSENT, 8],
            "relative_attention_max_distance": [ABSENT, 4],
            "dropout_rate": [ABSENT, 0.3],
            "layer_norm_epsilon": [ABSENT, 0.5],
            "initializer_factor": [ABSENT, 0.5],
            "feed_forward_proj": [
                ABSENT,
                "gelu",
                "gelu_new",
                "silu",
                "gated-gelu",
                "gated-gelu_new",
                "gated-gelu_pytorch_tanh",
                "gated-silu",
                "gated-swish",
            ],
            "use_cache": [False],
            "pad_token_id": [ABSENT, 3],
            "eos_token_id": [ABSENT, 2],
            "classifier_dropout": [0.5],
            "tie_word_embeddings": [ABSENT, True, False, None],
            "scale_decoder_outputs": [False, True],
            "head_dim": [6],  # alias of d_kv
            "hidden_size": [24],
            "num_attention_heads": [4],
            "num_hidden_layers": [2],  # num_decoder_layers defaults to num_layers before the alias
            "decoder_start_token_id": [5],
            "encoder_sparse_step": [1],  # a Switch field: T5 never reads it
        }.items()
        for value in values
    ],
    ("t5", "feed_forward_proj", "gated-relu", "feed_forward_proj"),  # a gated ReLU FFN: not implemented
    ("t5", "feed_forward_proj", "gated-gelu_fast", "feed_forward_proj"),
    ("t5", "feed_forward_proj", "quick_gelu", "feed_forward_proj"),
    ("t5", "feed_forward_proj", "gated-gelu-new", "feed_forward_proj"),  # transformers refuses it too
    ("t5", "feed_forward_proj", "geglu-gelu", "feed_forward_proj"),
]
# derived T5 fields that a saved config.json holds and transformers reads over feed_forward_proj
FIELD_CASES += [
    ("t5", "dense_act_fn+is_gated_act", dict(feed_forward_proj="gated-gelu", dense_act_fn="silu"), None),
    ("t5", "dense_act_fn+is_gated_act", dict(feed_forward_proj="gated-gelu", is_gated_act=False), None),
    ("t5", "dense_act_fn+is_gated_act", dict(feed_forward_proj="relu", dense_act_fn="gelu"), None),
    ("t5", "dense_act_fn+is_gated_act", dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu"), "gated"),
    ("t5", "dense_act_fn+is_gated_act", dict(feed_forward_proj="gated-gelu", dense_act_fn="relu6"), "dense_act_fn"),
]


def _case_id(case):
    model_type, field, value, refused = case
    shown = "absent" if value is ABSENT else value
    return f"{'switch' if model_type == 'switch_transformers' else 't5'}-{field}={shown}{'-refused' if refused else ''}"


def _case_dict(model_type, field, value):
    d = dict(SWITCH_BASE if model_type == "switch_transformers" else T5_BASE)
    if isinstance(value, dict):
        d.update(value)
    elif value is ABSENT:
        d.pop(field, None)
    else:
        d[field] = value
    return d


def _describe_hf(model) -> dict:
    """What transformers' instantiated model does, read from its modules."""
    config = model.config
    encoder_attn = model.encoder.block[0].layer[0].SelfAttention
    ffns = [block.layer[-1] for block in model.encoder.block] or [block.layer[-1] for block in model.decoder.block]
    routers = [
        block.layer[-1].mlp.router
        for stack in (model.encoder, model.decoder)
        for block in stack.block
        if getattr(block.layer[-1], "is_sparse", False)
    ]
    out = dict(
        vocab_size=model.shared.num_embeddings,
        d_model=model.shared.embedding_dim,
        d_kv=encoder_attn.key_value_proj_dim,
        num_heads=encoder_attn.n_heads,
        relative_attention_num_buckets=encoder_attn.relative_attention_bias.num_embeddings,
        relative_attention_max_distance=encoder_attn.relative_attention_max_distance,
        layer_norm_epsilon=model.encoder.final_layer_norm.variance_epsilon,
        dropout_rate=model.encoder.dropout.p,
        sparse=hf_sparse_layers(model),
        pad_token_id=config.pad_token_id,
    )
    if routers:
        out.update(
            num_experts=routers[0].num_experts,
            expert_capacity=routers[0].expert_capacity,
            router_jitter_noise=routers[0].jitter_noise,
            router_aux_loss_coef=model.router_aux_loss_coef,
            router_z_loss_coef=model.router_z_loss_coef,
        )
    ffn = getattr(ffns[0], "mlp", None) or ffns[0].DenseReluDense
    if hasattr(ffn, "router"):
        ffn = ffn.experts["expert_0"]
    out["gated"] = hasattr(ffn, "wi_0")
    out["d_ff"] = (ffn.wi_0 if out["gated"] else ffn.wi).out_features
    out["activation"] = ffn.act
    return out


def _describe_ours(config: SwitchT5Config, model: SwitchT5) -> dict:
    out = dict(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon,
        dropout_rate=config.dropout_rate,
        sparse=ours_sparse_layers(model),
        pad_token_id=config.pad_token_id,
    )
    if config.has_sparse_layers:
        out.update(
            num_experts=config.num_experts,
            expert_capacity=config.expert_capacity,
            router_jitter_noise=config.router_jitter_noise,
            router_aux_loss_coef=config.router_aux_loss_coef,
            router_z_loss_coef=config.router_z_loss_coef,
        )
    fn, gated = ACTIVATIONS[config.activation]
    out["gated"] = gated
    out["d_ff"] = config.d_ff
    out["activation"] = fn
    return out


@pytest.mark.parametrize("case", FIELD_CASES, ids=[_case_id(c) for c in FIELD_CASES])
def test_config_field_is_read_as_transformers_reads_it(case):
    """Each field present (a value) or absent (transformers' default): our reader gives the model that
    transformers' config class and model build, checked on the instantiated modules and on logits; a
    field whose math we do not implement is refused naming it."""
    model_type, field, value, refused = case
    d = _case_dict(model_type, field, value)
    try:
        hf_config(d)
    except Exception:  # transformers refuses the config: so must we, naming the field
        with pytest.raises(ValueError, match=refused or field):
            config_from_hf(d)
        return
    if refused:
        with pytest.raises(ValueError, match=refused):
            config_from_hf(d)
        return
    hf = hf_model(d)
    config = config_from_hf(d)
    ours = SwitchT5(config).eval()
    ours.load_state_dict(state_dict_from_hf(dict(hf.state_dict()), config, model_type))
    got, want = _describe_ours(config, ours), _describe_hf(hf)
    act_got, act_want = got.pop("activation"), want.pop("activation")
    if want["pad_token_id"] is None:
        want.pop("pad_token_id"), got.pop("pad_token_id")
    assert got == want
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(act_got(x), act_want(x), rtol=1e-6, atol=1e-6)
    if model_type == "switch_transformers":
        assert config.tie_word_embeddings == hf.config.tie_word_embeddings  # ties and scales the output
    else:
        assert config.tie_word_embeddings == hf.config.scale_decoder_outputs
    ids, labels = inputs(vocab=min(64, config.vocab_size))
    torch.testing.assert_close(logits(ours, ids, labels), logits(hf, ids, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["switch_transformers", "t5"])
def test_reader_knows_every_field_and_default_of_transformers_config(model_type):
    """Our tables of fields, defaults and aliases are transformers' own (a field transformers adds
    fails here until the reader handles it)."""
    config_cls = getattr(transformers, HF_CLASSES[model_type][0])
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(config_cls) if f.name not in base}
    ours = interop.SWITCH_FIELDS if model_type == "switch_transformers" else interop.T5_FIELDS
    assert ours == theirs
    assert interop._ALIASES[model_type] == config_cls.attribute_map
    # and the derived attributes, from an empty config.json
    derived = interop.hf_config_attributes({"model_type": model_type})
    hf = hf_config({"model_type": model_type})
    for key in ("num_decoder_layers", "encoder_sparse_step", "decoder_sparse_step", "dense_act_fn", "is_gated_act"):
        if hasattr(hf, key) and key in derived:
            assert derived[key] == getattr(hf, key), key
    if model_type == "t5":
        assert derived["scale_decoder_outputs"] == hf.scale_decoder_outputs


def test_damaged_weight_files_are_named(tmp_path):
    from switchformer.interop.hf_weights import load_directory_weights as _load_directory_weights

    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged or not a safetensors file"):
        _load_directory_weights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip or a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: damaged, or holds more than tensors"):
        _load_directory_weights(tmp_path)
