"""SwitchMoE against the per-token reference, forward and backward, for every router and backend."""

from __future__ import annotations

import pytest
import torch
from reference_moe import reference_forward

from switchformer import SwitchMoE
from switchformer.moe.dispatch import grouped_mm_available

BACKENDS = ["loop", "padded"] + (["grouped_mm"] if grouped_mm_available("cpu", torch.float32) else [])

CONFIGS = {
    "switch_drops": dict(num_experts=4, capacity_factor=0.5, min_capacity=1),
    "switch_default": dict(num_experts=4),
    "switch_dropless": dict(num_experts=4, capacity_factor=None),
    "top2_normalized": dict(num_experts=4, top_k=2, normalize_gates=True, capacity_factor=0.6, min_capacity=1),
    "top2_raw": dict(num_experts=5, top_k=2, capacity_factor=None),
    "batch_prioritized": dict(num_experts=4, capacity_factor=0.5, min_capacity=1, priority="router_prob"),
    "groups": dict(num_experts=4, capacity_factor=0.75, min_capacity=1, group_size=6),
    "hf_expert_capacity": dict(num_experts=4, expert_capacity=2),
    "expert_choice": dict(num_experts=4, routing="expert_choice", capacity_factor=1.0, min_capacity=1),
    "aux_loss_free": dict(num_experts=4, routing="aux_loss_free", capacity_factor=0.75, min_capacity=1),
    "gated_gelu": dict(num_experts=3, activation="gated-gelu", capacity_factor=None),
    "swiglu_drops": dict(num_experts=3, activation="swiglu", capacity_factor=0.5, min_capacity=1),
    "gelu_new": dict(num_experts=2, activation="gelu_new"),
}


def make_layer(config: dict, backend: str, seed: int = 0) -> SwitchMoE:
    torch.manual_seed(seed)
    layer = SwitchMoE(8, 16, backend=backend, init_scale=1.0, **config)
    if isinstance(getattr(layer.router, "expert_bias", None), torch.Tensor):
        layer.router.expert_bias.copy_(torch.randn(layer.num_experts) * 0.1)
    return layer


def grads(layer, x):
    return [x.grad, layer.router.weight.grad, layer.experts.w_in.grad, layer.experts.w_out.grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_backward_match_reference(name, backend):
    layer = make_layer(CONFIGS[name], backend).eval()  # eval: the aux-loss-free bias stays put
    layer.capacity_factor = layer.eval_capacity_factor = CONFIGS[name].get("capacity_factor", 1.25)
    x = torch.randn(2, 6, 8, requires_grad=True)
    upstream = torch.randn(2, 6, 8)

    y, aux = layer(x)
    (y * upstream).sum().backward()
    got = [g.clone() for g in grads(layer, x)]
    layer.zero_grad()
    x.grad = None

    y_ref, counts, demand = reference_forward(layer, x)
    (y_ref * upstream).sum().backward()
    want = grads(layer, x)

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert aux.tokens_per_expert.tolist() == counts
    assert aux.demand_per_expert.tolist() == demand
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_mask_matches_reference_and_is_zero(backend):
    layer = make_layer(dict(num_experts=4, capacity_factor=0.75, min_capacity=1), backend)
    x = torch.randn(2, 7, 8)
    mask = torch.rand(2, 7) > 0.3
    y, aux = layer(x, token_mask=mask)
    y_ref, counts, demand = reference_forward(layer, x, mask)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(y[~mask] == 0)
    assert aux.routed.item() == int(mask.sum())
    assert aux.demand_per_expert.tolist() == demand


def test_dropped_tokens_are_exactly_zero_and_counted():
    layer = make_layer(dict(num_experts=2, capacity_factor=0.25, min_capacity=1), "loop")
    x = torch.randn(1, 16, 8)
    y, aux = layer(x)
    zero_rows = int((y.reshape(-1, 8) == 0).all(-1).sum())
    assert aux.capacity == 2
    assert zero_rows == 16 - 4  # two experts, two slots each
    assert aux.dropped_fraction == pytest.approx(12 / 16)
    assert aux.tokens_per_expert.sum().item() == 4


def test_priority_is_position_order_within_group():
    """With every token forced to expert 0 and capacity 3, the first three positions win."""
    layer = make_layer(dict(num_experts=2, expert_capacity=3), "loop")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(2, 5, 8)
    x[..., 0] = x[..., 0].abs() + 1
    y, _ = layer(x)
    processed = (y != 0).any(-1)
    assert processed.tolist() == [[True, True, True, False, False]] * 2  # per sequence, like HF


def test_jitter_is_not_seen_by_experts_and_input_is_untouched():
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 1, jitter_eps=0.5, capacity_factor=None).train()
    x = torch.randn(3, 8)
    before = x.clone()
    y, _ = layer(x)
    h = torch.relu(x @ layer.experts.w_in[0]) @ layer.experts.w_out[0]
    torch.testing.assert_close(y, h)  # one expert: gate 1, output of the clean input
    assert torch.equal(x, before)


def test_jitter_changes_routing_only_in_training():
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 8, jitter_eps=0.3, capacity_factor=None, init_scale=1.0)
    x = torch.randn(64, 8)
    layer.eval()
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert torch.equal(y1, y2)
    layer.train()
    outs = [layer(x)[0] for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_aux_loss_free_bias_moves_towards_balance():
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 4, routing="aux_loss_free", bias_update_rate=0.01, capacity_factor=None).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 5.0  # expert 2 attracts most tokens
    x = torch.randn(256, 8).abs()
    _, aux = layer(x)
    demand = aux.demand_per_expert.float()
    bias = layer.router.expert_bias
    assert bias[2] < 0 and bias[demand < demand.mean()].gt(0).all()
    # the gates are not biased: they are the plain router probabilities
    layer.eval()
    routing = layer.router(x.view(1, 256, 8), None, None)
    torch.testing.assert_close(routing.gate, routing.probs.view(256, 4).gather(1, routing.expert.view(256, 1)).view(-1))


def test_recycled_gradient_buffers_never_alias_live_gradients():
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 4, backend="loop", capacity_factor=None)
    x = torch.randn(20, 8)
    layer(x)[0].sum().backward()
    kept = layer.experts.w_in.grad
    kept_copy = kept.clone()
    layer.zero_grad(set_to_none=True)
    layer(2 * x)[0].sum().backward()
    assert torch.equal(kept, kept_copy)  # a gradient the caller holds is never overwritten
    assert kept.data_ptr() != layer.experts.w_in.grad.data_ptr()
    del kept
    layer.zero_grad(set_to_none=True)
    buffer_ptr = layer.experts.w_in._switchformer_grad_buffer.data_ptr()
    layer(x)[0].sum().backward()
    assert layer.experts.w_in.grad.data_ptr() == buffer_ptr  # reused once nothing else holds it
    torch.testing.assert_close(layer.experts.w_in.grad, kept_copy)
    layer(x)[0].sum().backward()  # accumulation into a live .grad stays correct
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * kept_copy)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_expert_without_tokens_gets_exactly_zero_gradient_from_a_recycled_buffer(activation):
    torch.manual_seed(0)
    layer = SwitchMoE(8, 16, 3, backend="loop", capacity_factor=None, activation=activation)
    x = torch.randn(30, 8)
    layer(x)[0].square().sum().backward()  # fills the recycled buffers with non-zero gradients
    assert layer.experts.w_in.grad[0].abs().sum() > 0
    layer.zero_grad(set_to_none=True)
    with torch.no_grad():
        layer.router.weight[0] = -100 * layer.router.weight[1:].abs().sum(0)  # expert 0 never wins
        x = x.abs()
    y, aux = layer(x)
    assert aux.tokens_per_expert[0] == 0
    y.square().sum().backward()
    assert torch.count_nonzero(layer.experts.w_in.grad[0]) == 0
    assert torch.count_nonzero(layer.experts.w_out.grad[0]) == 0
    assert torch.count_nonzero(layer.experts.w_in.grad[1:]) > 0


def test_expert_dropout_runs_unfused_and_drops_hidden_units():
    torch.manual_seed(0)
    layer = SwitchMoE(8, 64, 2, backend="loop", capacity_factor=None, expert_dropout=0.5).train()
    x = torch.randn(40, 8)
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert not torch.allclose(y1, y2)  # a fresh dropout mask each call
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
