"""The few-token inference path (cached decoding) against the sorted dispatch path."""

from __future__ import annotations

import pytest
import torch

import switchformer.moe.layer as moe_module
from switchformer import SwitchMoE

CASES = [
    dict(num_experts=4),
    dict(num_experts=4, top_k=2, normalize_gates=True),
    dict(num_experts=5, top_k=2),
    dict(num_experts=4, routing="aux_loss_free"),
    dict(num_experts=3, activation="swiglu", capacity_factor=None, eval_capacity_factor=None),
    dict(num_experts=4, expert_capacity=1),  # HF mode: one slot per expert and sequence
    dict(num_experts=4, priority="router_prob"),
]


@pytest.mark.parametrize("config", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 8), (1, 2, 8), (4, 8)])
def test_few_token_path_equals_sorted_dispatch(config, shape, monkeypatch):
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, init_scale=1.0, **config).eval()
    if hasattr(layer.router, "expert_bias"):
        layer.router.expert_bias.copy_(torch.randn(layer.num_experts) * 0.1)
    x = torch.randn(*shape)
    with torch.no_grad():
        y_sorted, aux_sorted = layer(x)  # 4 tokens x top-2 = 8 assignments: sorted path
        monkeypatch.setattr(moe_module, "FEW_ASSIGNMENTS", 64)
        y_few, aux_few = layer(x)
    torch.testing.assert_close(y_few, y_sorted, atol=1e-6, rtol=1e-6)
    assert aux_few.tokens_per_expert.tolist() == aux_sorted.tokens_per_expert.tolist()
    torch.testing.assert_close(aux_few.aux_loss, aux_sorted.aux_loss)
    assert aux_few.dropped_fraction == aux_sorted.dropped_fraction


def test_few_token_path_is_taken_only_where_it_computes_the_same(monkeypatch):
    layer = SwitchMoE(8, 16, 4, expert_capacity=1).eval()
    calls = []
    real = layer._forward_few
    monkeypatch.setattr(layer, "_forward_few", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer(torch.randn(1, 1, 8))  # one decoding step
        assert calls == [1]
        layer(torch.randn(1, 3, 8))  # capacity 1 per sequence of 3 tokens could drop: sorted path
        layer(torch.randn(1, 1, 8), token_mask=torch.ones(1, 1, dtype=torch.bool))  # padding mask given
    layer(torch.randn(1, 1, 8))  # autograd on
    layer.train()
    with torch.no_grad():
        layer(torch.randn(1, 1, 8))
    assert calls == [1]


def test_empty_input_at_inference_gives_an_empty_output():
    layer = SwitchMoE(8, 16, 4).eval()
    with torch.no_grad():
        y, aux = layer(torch.randn(0, 1, 8))
    assert y.shape == (0, 1, 8)
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 0]
