"""The static decoding step (``decode_step`` over a fixed-size cache, ``cache_implementation="static"``):
the same logits and tokens as the growing cache, for both families and every routing a decoding step
meets (capacity that drops, dropless, Hugging Face's per-sequence capacity, top-2, dense), and a step
that ``torch.compile(fullgraph=True)`` captures without a graph break."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import switchformer as sf
from switchformer.inference.routing import inference_routing
from switchformer.moe.layer import SwitchMoE
from switchformer.moe.offload import ExpertCache, StoredExperts
from tests.tolerances import assert_close

T5_CASES = {
    "capacity 2.0": dict(eval_capacity_factor=2.0),
    "capacity that drops": dict(eval_capacity_factor=0.5, min_capacity=1),
    "dropless": dict(eval_capacity_factor=None),
    "per-sequence expert_capacity (HF)": dict(expert_capacity=2),
    "top-2": dict(top_k=2, eval_capacity_factor=1.0, min_capacity=1),
    "dense": dict(encoder_sparse_step=0, decoder_sparse_step=0),
    "gated-gelu, untied": dict(activation="gated-gelu", tie_word_embeddings=False),
}
LM_CASES = {
    "capacity 2.0": dict(eval_capacity_factor=2.0),
    "capacity that drops": dict(eval_capacity_factor=0.5, min_capacity=1),
    "dropless, every layer": dict(eval_capacity_factor=None, sparse_step=1),
    "top-2": dict(top_k=2, eval_capacity_factor=1.0, min_capacity=1),
    "dense": dict(sparse_step=0),
}


def spread_routers(model) -> None:
    """Routers far from uniform, so that a step's tokens pick different experts and capacity binds."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SwitchMoE):
                layer.router.weight.normal_(0, 1.0)


def t5(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, num_experts=4,
                    decoder_sparse_step=1, dropout_rate=0.0, eos_token_id=1)  # fmt: skip
    model = sf.SwitchT5(sf.SwitchT5Config(**{**settings, **overrides})).eval()
    spread_routers(model)
    return model


def lm(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=4, num_experts=4, max_seq_len=64)
    model = sf.SwitchLM(sf.SwitchLMConfig(**{**settings, **overrides})).eval()
    spread_routers(model)
    return model


def prompts(rows=5, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # a short row: padding at the end of an encoder input
    return ids, mask


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_decode_step_gives_the_growing_caches_logits_at_every_step(case):
    # teacher-forced on the same tokens, so no argmax tie can hide or fake a difference
    model = t5(**T5_CASES[case])
    ids, mask = prompts()
    dropped = []
    with torch.inference_mode(), inference_routing(model, "eval", decoding=True):
        memory = model.encode(ids, mask)
        growing, static = model.new_cache(memory, mask, 12), model.new_static_cache(memory, mask, 12)
        tokens = torch.zeros(ids.shape[0], dtype=torch.long)
        for step in range(11):
            stats = sf.models.outputs.RouterStats()
            h = model.decode(tokens[:, None], memory, mask, cache=growing, stats=stats)
            expected = model.project(h[:, -1])
            logits, counts = model.decode_step(tokens, static)
            assert_close(logits, expected, f"{case}, step {step}", rtol=1e-5, atol=1e-5)
            assert [c.tolist() for c in counts] == [aux.tokens_per_expert.tolist() for _, aux in stats.layers]
            dropped.append(sum(aux.dropped_fraction for _, aux in stats.layers))
            tokens = torch.randint(2, 96, tokens.shape, generator=torch.Generator().manual_seed(step))
    if case == "capacity that drops":
        assert max(dropped) > 0  # the premise: capacity did drop tokens in some step


@pytest.mark.parametrize("case", LM_CASES)
def test_lm_decode_step_gives_the_growing_caches_logits_at_every_step(case):
    model = lm(**LM_CASES[case])
    ids, mask = prompts()
    mask = mask.flip(1)  # a decoder-only model takes left-padded prompts
    dropped = []
    with torch.inference_mode(), inference_routing(model, "eval", decoding=True):
        growing, static = model.new_cache(ids.shape[0], 24), model.new_static_cache(ids.shape[0], 24)
        model.hidden_states(ids, mask, cache=growing)
        model.hidden_states(ids, mask, cache=static)
        static.sync_column()
        tokens = torch.zeros(ids.shape[0], dtype=torch.long)
        for step in range(14):
            stats = sf.models.outputs.RouterStats()
            h, _ = model.hidden_states(tokens[:, None], None, cache=growing, stats=stats)
            expected = model.project(h[:, -1])
            logits, counts = model.decode_step(tokens, static)
            assert_close(logits, expected, f"{case}, step {step}", rtol=1e-5, atol=1e-5)
            assert [c.tolist() for c in counts] == [aux.tokens_per_expert.tolist() for _, aux in stats.layers]
            dropped.append(sum(aux.dropped_fraction for _, aux in stats.layers))
            tokens = torch.randint(2, 96, tokens.shape, generator=torch.Generator().manual_seed(step))
    if case == "capacity that drops":
        assert max(dropped) > 0


def same_tokens(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    assert torch.equal(expected, actual), f"{what}:\n{expected}\n{actual}"


@pytest.mark.parametrize("settings", [{}, {"num_beams": 3}, {"num_beams": 2, "no_repeat_ngram_size": 2}])
@pytest.mark.parametrize("case", ["capacity 2.0", "dropless", "per-sequence expert_capacity (HF)"])
def test_t5_generate_with_the_static_cache_gives_the_same_tokens(case, settings):
    model = t5(**T5_CASES[case])
    ids, mask = prompts()
    expected = model.generate(ids, mask, max_new_tokens=10, **settings)
    actual = model.generate(ids, mask, max_new_tokens=10, cache_implementation="static", **settings)
    same_tokens(expected, actual, f"{case} {settings}")


@pytest.mark.parametrize("case", ["capacity 2.0", "dropless, every layer"])
def test_lm_generate_and_stream_with_the_static_cache_give_the_same_tokens(case):
    model = lm(**LM_CASES[case])
    ids, mask = prompts()
    mask = mask.flip(1)
    expected = model.generate(ids, mask, max_new_tokens=12)
    same_tokens(expected, model.generate(ids, mask, max_new_tokens=12, cache_implementation="static"), case)
    streamed = list(sf.inference.generation.stream_causal(model, ids, mask, max_new_tokens=12,
                                                            cache_implementation="static"))  # fmt: skip
    same_tokens(expected[:, ids.shape[1] :], torch.stack(streamed, 1), f"{case}, streamed")


def test_sampling_with_the_static_cache_draws_the_same_tokens_from_the_same_seed():
    model = lm()
    ids, _ = prompts()
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    expected = model.generate(ids, generator=torch.Generator().manual_seed(5), **kwargs)
    actual = model.generate(ids, generator=torch.Generator().manual_seed(5), cache_implementation="static", **kwargs)
    same_tokens(expected, actual, "sampled")


def test_a_longer_static_cache_changes_nothing():
    # metamorphic: columns the step has not written are masked, however many there are
    model = t5()
    ids, mask = prompts()
    with torch.inference_mode(), inference_routing(model, "eval", decoding=True):
        memory = model.encode(ids, mask)
        short, long = model.new_static_cache(memory, mask, 6), model.new_static_cache(memory, mask, 40)
        tokens = torch.zeros(ids.shape[0], dtype=torch.long)
        for step in range(6):
            a, _ = model.decode_step(tokens, short)
            b, _ = model.decode_step(tokens, long)
            assert_close(b, a, f"step {step}", rtol=1e-5, atol=1e-5)
            tokens = a.argmax(-1)


@pytest.mark.parametrize("family", ["t5", "lm"])
def test_idle_rows_route_nowhere_and_leave_the_live_rows_alone(family):
    # a server's free slots: token_mask False; the live rows' logits are those of the live rows alone
    model = t5(eval_capacity_factor=None) if family == "t5" else lm(eval_capacity_factor=None)
    ids, _ = prompts(rows=4)
    live = torch.tensor([True, False, True, False])
    with torch.inference_mode(), inference_routing(model, "dropless", decoding=True):
        if family == "t5":
            full = model.new_static_cache(model.encode(ids), None, 8)
            alone = model.new_static_cache(model.encode(ids[live]), None, 8)
        else:
            full, alone = model.new_static_cache(4, 20), model.new_static_cache(2, 20)
            model.hidden_states(ids, None, cache=full)
            model.hidden_states(ids[live], None, cache=alone)
            full.sync_column()
            alone.sync_column()
        tokens = torch.full((4,), 5)
        for step in range(5):
            a, counts = model.decode_step(tokens, full, token_mask=live)
            b, counts_alone = model.decode_step(tokens[live], alone)
            assert_close(a[live], b, f"step {step}", rtol=1e-5, atol=1e-5)
            assert [c.tolist() for c in counts] == [c.tolist() for c in counts_alone]  # idle rows not counted
            tokens = a.argmax(-1)


@pytest.mark.parametrize("family", ["t5", "lm"])
def test_the_step_compiles_whole_and_gives_the_same_tokens(family):
    # fullgraph=True raises at the first graph break (a host read, a data-dependent branch); the eager
    # backend traces the step as inductor would without generating code, which keeps this test fast
    model = t5() if family == "t5" else lm()
    ids, mask = prompts()
    if family == "lm":
        mask = mask.flip(1)
    torch._dynamo.reset()
    compiled = torch.compile(model.decode_step, fullgraph=True, backend="eager")
    with torch.inference_mode(), inference_routing(model, "eval", decoding=True):
        if family == "t5":
            memory = model.encode(ids, mask)
            eager_cache, compiled_cache = (model.new_static_cache(memory, mask, 10) for _ in range(2))
        else:
            eager_cache, compiled_cache = (model.new_static_cache(ids.shape[0], 24) for _ in range(2))
            for cache in (eager_cache, compiled_cache):
                model.hidden_states(ids, mask, cache=cache)
                cache.sync_column()
        tokens = torch.zeros(ids.shape[0], dtype=torch.long)
        for step in range(8):
            expected, _ = model.decode_step(tokens, eager_cache)
            actual, _ = compiled(tokens, compiled_cache)
            assert_close(actual, expected, f"step {step}", rtol=1e-5, atol=1e-5)
            tokens = expected.argmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "lm"])
def test_generate_with_a_step_compiled_by_inductor_gives_the_same_tokens(family):
    model = t5() if family == "t5" else lm()
    ids, mask = prompts()
    if family == "lm":
        mask = mask.flip(1)
    torch._dynamo.reset()
    expected = model.generate(ids, mask, max_new_tokens=8)
    actual = model.generate(ids, mask, max_new_tokens=8, cache_implementation="static", compile=True)
    same_tokens(expected, actual, family)
    # a second call with other prompts: the kept compiled step must read this call's cache, not the
    # first call's (transformers#30351: a compiled static cache "locked" to its first prompt)
    other, other_mask = prompts(rows=5, seed=7)
    if family == "lm":
        other_mask = other_mask.flip(1)
    again = model.generate(other, other_mask, max_new_tokens=8, cache_implementation="static", compile=True)
    same_tokens(model.generate(other, other_mask, max_new_tokens=8), again, f"{family}, the kept compiled step")
    # the kept compiled step does not keep the model alive
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_bad_cache_options_are_refused_by_name():
    model = lm()
    ids, _ = prompts()
    with pytest.raises(ValueError, match="cache_implementation: unknown 'paged'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="paged")
    with pytest.raises(ValueError, match="compile: only the static decoding step compiles whole"):
        model.generate(ids, max_new_tokens=2, compile=True)
    with pytest.raises(ValueError, match="compile: expected True or False"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", compile="yes")


@pytest.mark.parametrize("kind", ["int8", "offloaded"])
def test_offloaded_or_int8_experts_are_refused_before_decoding_naming_why(kind):
    # their experts come from a store with host reads; the refusal names the cause and the way out,
    # before any token is chosen
    model = lm(sparse_step=1)
    layer = model.blocks[0].ffn.mlp
    experts = layer.experts
    store = dict(quantize=True) if kind == "int8" else dict(cache=ExpertCache(1 << 20), key="layer0")
    layer.experts = StoredExperts(4, 32, 64, experts.activation, lambda e: (experts.w_in[e], experts.w_out[e]),
                                  dtype=torch.float32, **store)  # fmt: skip
    cause = r"int8-stored experts \(--dtype int8\)" if kind == "int8" else r"offloaded experts \(--max-memory\)"
    ids, _ = prompts()
    streamed = []
    with pytest.raises(ValueError, match=f"static decoding needs every expert resident .*; {cause} .*--cache dynamic"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", streamer=streamed.append)
    assert streamed == []
    model.generate(ids, max_new_tokens=2)  # the growing cache still runs them


def test_a_static_decoder_cache_reorders_every_per_row_buffer_in_place():
    # beam search keeps the buffers' addresses (a captured step stays valid) and moves every
    # per-row tensor, a row's key mask included
    from switchformer.models.caches import StaticDecoderCache

    rows = torch.arange(4.0)[:, None, None, None]
    self_kv = [(rows.expand(4, 2, 5, 3).clone(), rows.expand(4, 2, 5, 3).clone() + 10)]
    cross_kv = [(rows.expand(4, 2, 6, 3).clone(), rows.expand(4, 2, 6, 3).clone() + 20)]
    cross_bias = rows.expand(4, 1, 1, 6).clone()
    key_valid = torch.tensor([[True] * 5, [False] * 5, [True, False] * 2 + [True], [False, True] * 2 + [False]])
    cache = StaticDecoderCache(self_kv, cross_kv, cross_bias, key_valid.clone())
    def addresses():
        return [t.data_ptr() for t in (*cache.self_kv[0], *cache.cross_kv[0], cache.cross_bias, cache.key_valid)]

    before = addresses()
    index = torch.tensor([2, 2, 0, 3])
    cache.reorder(index)
    assert addresses() == before
    for t, offset in ((cache.self_kv[0][1], 10), (cache.cross_kv[0][0], 0), (cache.cross_bias, 0)):
        assert torch.equal(t[:, 0, 0, 0], index.float() + offset)
    assert torch.equal(cache.key_valid, key_valid[index])
