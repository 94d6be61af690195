"""Every degenerate size has a defined result or a ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import switchformer as sf
from switchformer import SwitchMoE
from switchformer.data.objectives import (
    noise_span_counts,
    pack_causal,
    random_spans,
    span_corruption,
    span_corruption_lengths,
)

SENTINELS = list(range(1000, 1100))


def uncorrupt(source: list[int], target: list[int]) -> list[int]:
    """Put each sentinel's tokens back where the sentinel stands: the original document."""
    spans, current = {}, None
    for token in target[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in source[:-1]:
        out.extend(spans[token] if token in SENTINELS else [token])
    return out


@pytest.mark.parametrize("noise_density", [0.05, 0.15, 0.5, 0.9])
@pytest.mark.parametrize("mean_span", [1.0, 3.0, 7.5])
def test_span_corruption_lengths_are_exact_for_every_length(noise_density, mean_span):
    g = torch.Generator().manual_seed(0)
    for length in range(0, 90):
        tokens = list(range(10, 10 + length))
        source, target = span_corruption(tokens, SENTINELS, 1, g, noise_density, mean_span)
        assert (len(source), len(target)) == span_corruption_lengths(length, noise_density, mean_span), length
        assert uncorrupt(source, target) == tokens, length  # nothing lost, nothing invented
        noise, spans = noise_span_counts(length, noise_density, mean_span)
        mask = random_spans(length, noise_density, mean_span, g)
        assert mask.shape == (length,) and int(mask.sum()) == noise
        starts = int((mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).sum()) if length else 0
        assert starts == spans
        if length >= 2:  # both noise and kept tokens
            assert 1 <= noise <= length - 1 and spans >= 1


def test_the_issue_case_length_two():
    assert span_corruption_lengths(2, 0.15, 3.0) == (3, 3)  # was predicted (4, 2), produced (3, 3)


@pytest.mark.parametrize("length", [0, 1])
def test_documents_too_short_for_noise_keep_every_token(length):
    tokens = list(range(10, 10 + length))
    source, target = span_corruption(tokens, SENTINELS, 1, torch.Generator().manual_seed(0))
    assert source == tokens + [1] and target == [1]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(length=-1), "length"),
        (dict(length=10, noise_density=0.0), "noise_density"),
        (dict(length=10, noise_density=1.0), "noise_density"),
        (dict(length=10, mean_span=0.0), "mean_span"),
    ],
)
def test_span_arguments_out_of_range_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        noise_span_counts(**kwargs)


def test_pack_causal_refuses_empty_rows():
    with pytest.raises(ValueError, match="^seq_len: must be >= 1"):
        pack_causal([[1, 2, 3]], 0, 0)
    with pytest.raises(ValueError, match="^seq_len:"):
        pack_causal([], 4, 0)


# ----------------------------------------------------------------------------- the Switch layer


LAYERS = [
    dict(),
    dict(top_k=2),
    dict(capacity_factor=None, eval_capacity_factor=None),
    dict(routing="expert_choice"),
    dict(routing="aux_loss_free"),
]


@pytest.mark.parametrize("kwargs", LAYERS)
@pytest.mark.parametrize("shape", [(0, 8), (1, 0, 8), (0, 5, 8), (3, 0, 8)])
@pytest.mark.parametrize("training", [True, False])
def test_no_tokens_report_what_all_masked_tokens_report(kwargs, shape, training):
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 4, **kwargs).train(training)
    x = torch.randn(*shape, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == x.shape
    masked_x = torch.randn(2, 5, 8)
    _, masked = layer(masked_x, token_mask=torch.zeros(2, 5, dtype=torch.bool))
    for name in ("aux_loss", "z_loss", "router_entropy", "router_confidence"):
        value = getattr(aux, name)
        assert torch.isfinite(value), name
        assert value.item() == getattr(masked, name).item() == 0.0, name
    assert aux.dropped_fraction == masked.dropped_fraction == 0.0
    assert int(aux.tokens_per_expert.sum()) == 0
    if training:
        (y.sum() + aux.aux_loss + aux.z_loss).backward()  # a zero-token micro-batch can be trained on
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("kwargs", [k for k in LAYERS if k.get("routing") != "expert_choice"])
@pytest.mark.parametrize("shape", [(0, 8), (0, 1, 8), (3, 0, 8)])
def test_the_static_path_takes_no_tokens_too(kwargs, shape):
    # a static step of no rows (a server with no request running never steps, but the layer's
    # contract holds): an empty output of the input's shape, nothing counted
    layer = SwitchMoE(8, 16, 4, **kwargs).eval()
    with torch.inference_mode():
        y, counts = layer.forward_static(torch.randn(*shape))
    assert y.shape == shape and counts.tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- models and generation


def lm():
    torch.manual_seed(0)
    config = sf.SwitchLMConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=2, d_ff=24, num_experts=4)
    return sf.SwitchLM(config).eval()


def t5():
    torch.manual_seed(0)
    config = sf.SwitchT5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, num_experts=4)
    return sf.SwitchT5(config).eval()


EMPTY = [torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)]


@pytest.mark.parametrize("ids", EMPTY, ids=["no-token", "no-row", "nothing"])
def test_empty_inputs_are_refused_by_name(ids):
    with pytest.raises(ValueError, match="^input_ids: shape .* holds no token"):
        lm()(ids)
    with pytest.raises(ValueError, match="^input_ids: shape .* holds no token"):
        lm().generate(ids, max_new_tokens=2)  # was: an error inside max()
    with pytest.raises(ValueError, match="^input_ids: shape .* holds no token"):
        t5().generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="^labels:"):
        t5()(torch.ones(1, 3, dtype=torch.long), labels=ids)


@pytest.mark.parametrize("do_sample", [False, True])
def test_zero_new_tokens_return_the_prompt_or_the_start_token(do_sample):
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    out = lm().generate(ids, max_new_tokens=0, do_sample=do_sample)
    assert torch.equal(out, ids)
    out = t5().generate(ids, max_new_tokens=0, do_sample=do_sample)
    assert torch.equal(out, torch.zeros(2, 1, dtype=torch.long))  # decoder_start_token_id alone


def test_negative_new_tokens_are_refused_by_name():
    with pytest.raises(ValueError, match="^max_new_tokens:"):
        lm().generate(torch.tensor([[3]]), max_new_tokens=-1)
