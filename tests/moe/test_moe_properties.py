"""Invariants of routing and dispatch over random configurations (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchformer import SwitchMoE
from switchformer.moe.dispatch import grouped_mm_available

BACKENDS = ["loop", "padded"] + (["grouped_mm"] if grouped_mm_available("cpu", torch.float32) else [])


@st.composite
def moe_cases(draw):
    num_experts = draw(st.integers(1, 8))
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice", "aux_loss_free"]))
    top_k = 1 if routing == "expert_choice" else draw(st.integers(1, min(3, num_experts)))
    dropless = routing != "expert_choice" and draw(st.booleans())
    capacity_factor = None if dropless else draw(st.floats(0.1, 3.0))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    return dict(
        config=dict(
            num_experts=num_experts,
            top_k=top_k,
            routing=routing,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=draw(st.integers(0, 3)),
            normalize_gates=draw(st.booleans()),
        ),
        shape=(batch, seq),
        seed=draw(st.integers(0, 2**16)),
        masked=draw(st.booleans()),
    )


def run(case, backend="loop"):
    torch.manual_seed(case["seed"])
    layer = SwitchMoE(8, 12, backend=backend, init_scale=1.0, **case["config"]).eval()
    x = torch.randn(*case["shape"], 8)
    mask = torch.rand(case["shape"]) > 0.25 if case["masked"] else None
    routing_groups, group_len = layer.routing_groups(x)
    capacity = layer.capacity(group_len)
    routing = layer.router(
        x.reshape(routing_groups, group_len, 8),
        None if mask is None else mask.reshape(routing_groups, group_len),
        capacity,
    )
    y, aux = layer(x, token_mask=mask)
    layer.group_len = group_len
    return layer, x, mask, routing, capacity, y, aux


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moe_cases())
def test_routing_invariants(case):
    layer, x, mask, routing, capacity, y, aux = run(case)
    n_tokens = x.numel() // 8
    n = layer.num_experts
    valid = routing.expert < n

    # a token goes to at most k experts (expert choice: at most N), never twice to the same one
    per_token = torch.bincount(routing.token[valid], minlength=n_tokens)
    limit = n if layer.routing == "expert_choice" else layer.top_k
    assert per_token.max().item() <= limit
    pairs = routing.token[valid] * n + routing.expert[valid]
    assert pairs.unique().numel() == pairs.numel()

    # gates are probabilities of chosen experts
    assert (routing.gate[valid] > 0).all() and (routing.gate[valid] <= 1 + 1e-6).all()

    # no expert exceeds its capacity, and the counts add up
    if capacity is not None and layer.routing != "expert_choice":
        assert aux.tokens_per_expert.max().item() <= capacity
    if capacity is None:
        assert aux.dropped_fraction == 0.0
        assert torch.equal(aux.tokens_per_expert, aux.demand_per_expert)
    assert aux.tokens_per_expert.sum().item() == aux.routed.item() - aux.dropped.item()
    assert aux.demand_per_expert.sum().item() == aux.routed.item()
    assert 0.0 <= aux.dropped_fraction <= 1.0
    expected_routed = int(valid.sum())
    assert aux.routed.item() == expected_routed

    # tokens no expert processed (dropped, or padding) have exactly zero output
    flat_y = y.reshape(n_tokens, 8)
    nonzero = (flat_y != 0).any(-1)
    assert not nonzero[~processed_tokens(layer, routing, capacity, n_tokens)].any()
    if mask is not None:
        assert (flat_y[~mask.reshape(-1)] == 0).all()


def processed_tokens(layer, routing, capacity, n_tokens):
    """Which tokens at least one expert kept, recounted with plain per-(group, expert) counters."""
    processed = torch.zeros(n_tokens, dtype=torch.bool)
    used = {}
    for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
        if e == layer.num_experts:
            continue
        key = (t // layer.group_len, e)
        used[key] = used.get(key, 0) + 1
        if layer.routing == "expert_choice" or capacity is None or used[key] <= capacity:
            processed[t] = True
    return processed


@settings(max_examples=25, deadline=None)
@given(moe_cases())
def test_backends_agree(case):
    outs = []
    for backend in BACKENDS:
        *_, y, aux = run(case, backend)
        outs.append((y, aux.tokens_per_expert))
    for y, counts in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(counts, outs[0][1])


@settings(max_examples=25, deadline=None)
@given(moe_cases())
def test_dropless_drops_nothing(case):
    case["config"].update(capacity_factor=None, eval_capacity_factor=None, routing="token_choice")
    *_, y, aux = run(case)
    assert aux.dropped.item() == 0
    assert aux.tokens_per_expert.sum().item() == aux.routed.item()


@settings(max_examples=60, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    num_groups=st.integers(1, 3),
    tokens_per_group=st.integers(1, 20),
    top_k=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_sync_free_dropless_plan_equals_the_masked_plan(num_experts, num_groups, tokens_per_group, top_k, seed):
    """``all_routed=True`` skips the boolean mask (a host sync on GPUs); with every assignment routed
    it must give the very same plan, field by field."""
    from switchformer.moe.dispatch import plan_dispatch

    g = torch.Generator().manual_seed(seed)
    tokens = num_groups * tokens_per_group
    token = torch.arange(tokens).repeat_interleave(top_k)
    expert = torch.randint(0, num_experts, (tokens * top_k,), generator=g)
    gate = torch.rand(tokens * top_k, generator=g)
    kwargs = dict(num_experts=num_experts, num_groups=num_groups, tokens_per_group=tokens_per_group, capacity=None)
    masked = plan_dispatch(token, expert, gate, **kwargs)
    sync_free = plan_dispatch(token, expert, gate, all_routed=True, **kwargs)
    for name in ("assignment", "token", "gate", "tokens_per_expert", "demand_per_expert", "routed"):
        assert torch.equal(getattr(masked, name), getattr(sync_free, name)), name
    # and against a naive count per expert
    assert sync_free.tokens_per_expert.tolist() == [int((expert == e).sum()) for e in range(num_experts)]
    # the plan lists each expert's assignments contiguously, in priority order within a group
    assert torch.equal(expert[sync_free.assignment], torch.sort(expert, stable=True).values)


@settings(max_examples=40, deadline=None)
@given(moe_cases(), st.sampled_from(["position", "router_prob"]))
def test_gather_and_scatter_combines_agree_forward_and_backward(case, priority):
    """Dispatch and combine by gathers in both directions (``dispatch.token_slots``) against the
    scatters (``index_select`` + ``index_add_``): the same output, input and weight gradients."""
    if case["config"]["routing"] == "expert_choice":
        priority = "position"  # expert choice keeps the scatters (its assignments are no token layout)
    results = []
    for gather in (True, False):
        torch.manual_seed(case["seed"])
        layer = SwitchMoE(8, 12, init_scale=1.0, priority=priority, **case["config"]).train()
        layer.gather_combine = gather
        torch.manual_seed(case["seed"] + 1)
        x = torch.randn(*case["shape"], 8, requires_grad=True)
        mask = torch.rand(case["shape"]) > 0.25 if case["masked"] else None
        y, aux = layer(x, token_mask=mask)
        (y.square().sum() + aux.aux_loss).backward()
        results.append((y.detach(), x.grad, layer.experts.w_in.grad, layer.router.weight.grad))
    for name, a, b in zip(("output", "input gradient", "expert gradient", "router gradient"), *results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
