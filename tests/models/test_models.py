"""SwitchT5 and SwitchLM on their own: caches, batching, learning, accounting, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from switchformer import SwitchLM, SwitchLMConfig, SwitchT5, SwitchT5Config, dense_twin_config
from switchformer.inference.generation import stream_causal, stream_seq2seq
from switchformer.inference.routing import inference_routing
from switchformer.inference.sampling import SamplingConfig, process_logits
from switchformer.inference.scope import DecodingScope, DerivedWeight
from switchformer.models.layers import output_logits, transposed_copy


def t5(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=2,
        dropout_rate=0.0,
        init_scale=1.0,
        router_jitter_noise=0.0,
    )
    config.update(overrides)
    return SwitchT5(SwitchT5Config(**config)).eval()


def lm(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        vocab_size=64,
        d_model=32,
        num_layers=3,
        num_heads=4,
        d_ff=48,
        num_experts=4,
        sparse_step=2,
        max_seq_len=64,
        init_scale=1.0,
    )
    config.update(overrides)
    return SwitchLM(SwitchLMConfig(**config)).eval()


# ----------------------------------------------------------------------------- caches


def test_t5_cached_decoding_matches_full_recompute():
    model = t5()
    ids = torch.randint(2, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    target = torch.randint(2, 64, (2, 6))
    with torch.no_grad(), inference_routing(model, "dropless"):  # as generation routes
        full = model(ids, attention_mask=mask, decoder_input_ids=target).logits
        memory = model.encode(ids, mask)
        cache = model.new_cache(memory, mask, 6)
        steps = [model.project(model.decode(target[:, t : t + 1], memory, mask, cache=cache)) for t in range(6)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(memory, mask, 6)  # several positions per call, then one
        chunks = [
            model.decode(target[:, :4], memory, mask, cache=cache),
            model.decode(target[:, 4:], memory, mask, cache=cache),
        ]
        torch.testing.assert_close(model.project(torch.cat(chunks, 1)), full, atol=1e-5, rtol=1e-5)
        # decoding projects q, k, v with one fused copy of their weights: it must follow weight changes
        # and the output matrix's transposed copy (a step of two rows reads through it)
        for block in model.decoder.blocks:
            block.attn.k.weight.mul_(1.5)  # in place: a new version
            block.attn.v.weight = torch.nn.Parameter(block.attn.v.weight * 0.5)  # a new tensor
        model.shared.weight.mul_(1.25)
        full = model(ids, attention_mask=mask, decoder_input_ids=target).logits
        memory = model.encode(ids, mask)
        cache = model.new_cache(memory, mask, 6)
        steps = [model.project(model.decode(target[:, t : t + 1], memory, mask, cache=cache)) for t in range(6)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_lm_cached_decoding_matches_full_recompute():
    model = lm()
    ids = torch.randint(1, 64, (2, 10))
    with torch.no_grad(), inference_routing(model, "dropless"):  # as generation routes
        full = model(ids).logits
        cache = model.new_cache(2, 10)
        h_prompt, _ = model.hidden_states(ids[:, :4], cache=cache)
        parts = [model.project(h_prompt)]
        for t in range(4, 10):
            h, _ = model.hidden_states(ids[:, t : t + 1], cache=cache)
            parts.append(model.project(h))
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        model.embed.weight.mul_(0.75)  # the few-row projection's transposed copy must follow
        torch.testing.assert_close(model.project(h), h @ model.embed.weight.t(), atol=1e-6, rtol=1e-5)


def test_few_row_output_logits_read_a_transposed_copy_that_follows_the_weight():
    weight = torch.randn(50, 8, dtype=torch.float64)
    copy = DerivedWeight(transposed_copy)
    with torch.no_grad(), DecodingScope().active():
        for rows in (1, 3, 4, 5, 9):
            x = torch.randn(rows, 8, dtype=torch.float64)
            torch.testing.assert_close(output_logits(x, weight, copy), x @ weight.t())
        assert copy._copy is not None and copy._copy.shape == (8, 50) and copy._copy.is_contiguous()
        weight.mul_(-2.0)  # in place, as an optimizer step
        torch.testing.assert_close(output_logits(x[:1], weight, copy), x[:1] @ weight.t())
        single = weight.float()  # another tensor of another dtype, as after .to()
        logits = output_logits(x[:1].float(), single, copy)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, x[:1].float() @ single.t())
    # with autograd on, the product reads the parameter itself, so its gradient arrives
    weight.requires_grad_()
    output_logits(torch.randn(1, 8, dtype=torch.float64), weight, copy).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- batching


# Batch invariance is dropless routing's promise: with a capacity, a routing group's other rows
# decide which tokens overflow, so a row's tokens may depend on its batch.


def test_t5_batched_generation_with_padding_equals_one_by_one():
    model = t5(eos_token_id=-1)  # never stop early: compare every step
    prompts = [torch.randint(2, 64, (n,)) for n in (9, 5, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    batched = model.generate(ids, mask, max_new_tokens=10, eos_token_id=None, routing="dropless")
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=10, eos_token_id=None, routing="dropless")
        assert torch.equal(batched[i], single[0])


def test_lm_batched_generation_with_left_padding_equals_one_by_one():
    model = lm()
    prompts = [torch.randint(1, 64, (n,)) for n in (6, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batched = model.generate(ids, mask, max_new_tokens=12, routing="dropless")
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=12, routing="dropless")
        assert torch.equal(batched[i, width:], single[0, len(p) :])


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = lm()
    ids = torch.randint(1, 64, (2, 4))
    free = model.generate(ids, max_new_tokens=8)
    new = free[0, 4:].tolist()
    stop = next(i for i in range(1, 8) if new[i] not in new[:i])  # a token first seen at step `stop`
    eos = new[stop]
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos)
    assert out[0, : 4 + stop + 1].tolist() == free[0, : 4 + stop + 1].tolist()
    assert (out[0, 4 + stop + 1 :] == model.config.pad_token_id).all()


def test_streaming_yields_the_same_tokens():
    model = t5()
    ids = torch.randint(2, 64, (2, 6))
    full = model.generate(ids, max_new_tokens=7, eos_token_id=None)
    streamed = torch.stack(list(stream_seq2seq(model, ids, max_new_tokens=7, eos_token_id=None)), 1)
    assert torch.equal(full[:, 1:], streamed)
    model_lm = lm()
    full = model_lm.generate(ids, max_new_tokens=5)
    streamed = torch.stack(list(stream_causal(model_lm, ids, max_new_tokens=5)), 1)
    assert torch.equal(full[:, 6:], streamed)


def test_generated_tokens_can_be_trained_on_and_streaming_keeps_the_callers_grad_mode():
    model = lm().train()
    ids = torch.randint(2, 64, (2, 6))
    out = model.generate(ids, max_new_tokens=4)
    assert model.training  # restored after generation
    model(out, labels=out).loss.backward()  # not an inference tensor: autograd accepts it
    for token in stream_causal(model, ids, max_new_tokens=3):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert not token.is_inference()
    seq2seq = t5()
    assert not seq2seq.generate(ids, max_new_tokens=3, num_beams=2).is_inference()


def test_beam_search_finds_at_least_the_greedy_score():
    model = t5(eos_token_id=-1)
    ids = torch.randint(2, 64, (2, 6))

    def score(seq):
        logits = model(ids, decoder_input_ids=seq[:, :-1]).logits.log_softmax(-1)
        return logits.gather(-1, seq[:, 1:, None]).squeeze(-1).sum(-1)

    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    beams = model.generate(ids, max_new_tokens=6, eos_token_id=None, num_beams=4)
    one_beam = model.generate(ids, max_new_tokens=6, eos_token_id=None, num_beams=1)
    assert torch.equal(one_beam, greedy)
    with torch.no_grad():
        assert (score(beams) >= score(greedy) - 1e-5).all()


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top2 = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), SamplingConfig(do_sample=True, top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    nucleus = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), SamplingConfig(do_sample=True, top_p=0.8))
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all() and probs[0] < 0.8
    penalised = process_logits(logits, torch.tensor([[0, 3]]), SamplingConfig(repetition_penalty=2.0))
    assert penalised[0].tolist() == [1.5, 2.0, 1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    model = lm()
    ids = torch.randint(1, 64, (1, 3))
    a = model.generate(
        ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5)
    )
    b = model.generate(
        ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b) and g is not None


def test_generation_routes_with_eval_capacity_by_default_and_dropless_on_request():
    model = t5(capacity_factor=0.1, eval_capacity_factor=0.1, min_capacity=0)
    ids = torch.randint(2, 64, (4, 16))
    seen = []
    for layer in model.modules():
        if layer.__class__.__name__ == "SwitchMoE":
            layer.register_forward_hook(lambda m, inp, out: seen.append(out[1].dropped_fraction))
    model.generate(ids, max_new_tokens=3, routing="dropless")
    assert seen and max(seen) == 0.0
    seen.clear()
    model.generate(ids, max_new_tokens=3)
    assert max(seen) > 0.0


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "lm"])
def test_models_learn_a_repetitive_dataset(family):
    torch.manual_seed(0)
    if family == "t5":
        model = t5(dropout_rate=0.0).train()
        src = torch.arange(2, 18).repeat(4, 1)
        tgt = torch.flip(src, [1])[:, :8]
        batch = dict(input_ids=src, labels=tgt)
    else:
        model = lm().train()
        seq = torch.arange(1, 33).repeat(4, 1)
        batch = dict(input_ids=seq, labels=seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model(**batch)
        first = first if first is not None else out.ce_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.ce_loss.item() < 0.05 < first


# ----------------------------------------------------------------------------- accounting and twins


def test_parameter_and_flop_accounting():
    sparse = lm(num_experts=8, sparse_step=1)
    dense = SwitchLM(dense_twin_config(sparse.config))
    s, d = sparse.num_parameters(), dense.num_parameters()
    per_expert = sparse.config.d_model * sparse.config.d_ff * 3  # swiglu: two input halves + output
    router = sparse.config.d_model * 8
    layers = sparse.config.num_layers
    assert s["total"] - d["total"] == layers * (7 * per_expert + router)
    assert s["active"] - d["active"] == layers * router
    assert s["flops_per_token"] - d["flops_per_token"] == layers * 2 * router
    assert not dense.config.has_sparse_layers
    t = t5()
    twin = SwitchT5(dense_twin_config(t.config))
    assert t.num_parameters()["active"] > twin.num_parameters()["active"]  # routers only
    with pytest.raises(ValueError, match="top_k"):
        dense_twin_config(SwitchLMConfig(top_k=2))


def test_losses_include_router_terms_with_coefficients():
    model = lm()
    ids = torch.randint(1, 64, (2, 12))
    out = model(ids, labels=ids)
    expected = out.ce_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert len(out.router_stats.layers) == 1  # layers 1 of 3 is sparse with step 2


def test_padding_is_excluded_from_loss_and_routing():
    model = lm()
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    routed = [int(aux.routed) for _, aux in out.router_stats.layers]
    assert routed == [int(mask.sum())]
    logits = out.logits[:, :-1].reshape(-1, 64)
    # naive: position t predicts t + 1 only when both are real tokens
    scored = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    labels = ids[:, 1:].masked_fill(~scored, -100).reshape(-1)
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert out.ce_loss.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pads", [1, 4])
def test_lm_loss_is_invariant_to_padding(side, pads):
    """Metamorphic: a row padded on either side scores exactly the tokens of the unpadded row
    (dropless routing, so padding cannot change any capacity)."""
    model = lm(capacity_factor=None, eval_capacity_factor=None)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (1, 8))
    pad = torch.zeros(1, pads, dtype=ids.dtype)
    padded = torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1)
    mask = torch.ones_like(padded)
    if side == "left":
        mask[:, :pads] = 0
    else:
        mask[:, -pads:] = 0
    with torch.no_grad():
        plain = model(ids, labels=ids)
        out = model(padded, attention_mask=mask, labels=padded)
    assert out.ce_loss.item() == pytest.approx(plain.ce_loss.item(), rel=1e-5, abs=1e-6)
    assert out.aux_loss.item() == pytest.approx(plain.aux_loss.item(), rel=1e-5, abs=1e-6)
    assert [int(a.routed) for _, a in out.router_stats.layers] == [ids.numel()]


@pytest.mark.parametrize("side", ["left", "right"])
def test_t5_loss_is_invariant_to_padding(side):
    """The same for the encoder-decoder: source padding (attention_mask) and label padding (-100)."""
    model = t5(capacity_factor=None, eval_capacity_factor=None)
    torch.manual_seed(2)
    src, tgt = torch.randint(3, 64, (1, 7)), torch.randint(3, 64, (1, 5))
    pad_src, pad_tgt = torch.zeros(1, 3, dtype=src.dtype), torch.full((1, 2), -100)
    if side == "left":
        padded_src = torch.cat([pad_src, src], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    else:
        padded_src = torch.cat([src, pad_src], 1)
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    padded_tgt = torch.cat([tgt, pad_tgt], 1)  # decoder labels are right-padded by construction
    with torch.no_grad():
        plain = model(src, labels=tgt)
        out = model(padded_src, attention_mask=mask, labels=padded_tgt)
    assert out.ce_loss.item() == pytest.approx(plain.ce_loss.item(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    model, model_lm = t5(), lm()
    with pytest.raises(ValueError, match="input_ids: token id 64 is outside the vocabulary"):
        model(torch.tensor([[1, 64]]), decoder_input_ids=torch.tensor([[0]]))
    with pytest.raises(ValueError, match="input_ids: token id -1"):
        model_lm(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model_lm(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask: shape"):
        model_lm(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels: shape"):
        model_lm(torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids: give"):
        model(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids: expected shape"):
        model_lm(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model_lm.generate(torch.ones(1, 3, dtype=torch.long), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        SwitchLMConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        SwitchT5Config(activation="tanh")
    with pytest.raises(ValueError, match="config: unknown fields"):
        SwitchT5Config.from_dict({"d_model": 8, "dmodel": 8})


def test_lm_starts_near_uniform_prediction():
    """At init the cross-entropy is close to ln(vocab): the tied head must not start with huge logits."""
    torch.manual_seed(0)
    model = SwitchLM(SwitchLMConfig(vocab_size=4096, d_model=192, num_layers=4, num_heads=4, d_ff=512))
    ids = torch.randint(0, 4096, (4, 64))
    ce = model(ids, labels=ids).ce_loss.item()
    assert abs(ce - math.log(4096)) < 0.5, ce
