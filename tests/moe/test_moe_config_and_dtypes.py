"""Bad configuration errors, float32 routing under bf16, Hugging Face layer parity, torch.compile."""

from __future__ import annotations

import pytest
import torch

from switchformer import SwitchMoE
from switchformer.moe.dispatch import grouped_mm_available


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, top_k=0), "top_k"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor"),
        (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=4, eval_capacity_factor=0.0), "eval_capacity_factor"),
        (dict(num_experts=4, activation="tanh"), "activation"),
        (dict(num_experts=4, d_model=0), "d_model"),
        (dict(num_experts=4, d_ff=-3), "d_ff"),
        (dict(num_experts=4, routing="expert_choice", causal=True), "routing"),
        (dict(num_experts=4, routing="expert_choice", capacity_factor=None), "capacity_factor"),
        (dict(num_experts=4, routing="hash"), "routing"),
        (dict(num_experts=4, backend="cuda_magic"), "backend"),
        (dict(num_experts=4, expert_capacity=0), "expert_capacity"),
        (dict(num_experts=4, group_size=0), "group_size"),
        (dict(num_experts=4, jitter_eps=1.5), "jitter_eps"),
        (dict(num_experts=4, expert_dropout=1.0), "expert_dropout"),
        (dict(num_experts=4, priority="router_prob", causal=True), "priority"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, field):
    args = dict(d_model=8, d_ff=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SwitchMoE(**args)


def test_bad_inputs_are_refused():
    layer = SwitchMoE(8, 16, 4, group_size=5)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="group_size"):
        layer(torch.randn(12, 8))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(10, 8), token_mask=torch.ones(9, dtype=torch.bool))


def test_router_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = SwitchMoE(16, 32, 4, capacity_factor=None)
    x = torch.randn(2, 8, 16)
    seen = {}
    layer.router.register_forward_hook(lambda m, inp, out: seen.update(logits=out.logits.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert seen["logits"] == torch.float32
    assert y.dtype == torch.bfloat16
    assert aux.z_loss.dtype == torch.float32
    y32, aux32 = layer(x)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    assert torch.equal(aux.tokens_per_expert, aux32.tokens_per_expert)  # same routing decisions
    y.float().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "backend", ["loop", "padded"] + (["grouped_mm"] if grouped_mm_available("cpu", torch.bfloat16) else [])
)
def test_bf16_weights_route_in_float32(backend):
    torch.manual_seed(0)
    layer = SwitchMoE(16, 32, 4, capacity_factor=None, backend=backend)
    x = torch.randn(24, 16)
    y32, aux32 = layer(x)
    layer_bf16 = layer.to(torch.bfloat16)
    routed = {}
    layer_bf16.router.register_forward_hook(lambda m, inp, out: routed.update(dtype=out.probs.dtype))
    y16, _ = layer_bf16(x.to(torch.bfloat16))
    assert routed["dtype"] == torch.float32 and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    y16.float().sum().backward()
    assert layer_bf16.experts.w_out.grad.dtype == torch.bfloat16


def test_matches_hugging_face_sparse_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    torch.manual_seed(0)
    d, f, n, capacity = 16, 32, 4, 3
    config = transformers.SwitchTransformersConfig(
        d_model=d, d_ff=f, num_experts=n, expert_capacity=capacity, router_jitter_noise=0.0, dropout_rate=0.0
    )
    hf = SwitchTransformersSparseMLP(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ours = SwitchMoE(d, f, n, expert_capacity=capacity).eval()
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.classifier.weight)
        for e in range(n):
            expert = hf.experts[f"expert_{e}"]
            ours.experts.w_in[e].copy_(expert.wi.weight.t())
            ours.experts.w_out[e].copy_(expert.wo.weight.t())
    x = torch.randn(3, 10, d)
    want = hf(x)
    got, aux = ours(x)
    assert aux.dropped_fraction > 0  # the per-sequence capacity really drops tokens here
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    layer = SwitchMoE(16, 32, 4, capacity_factor=1.0, backend="padded")
    x = torch.randn(32, 16, requires_grad=True)
    y, aux = layer(x)
    compiled = torch.compile(layer, backend="aot_eager")
    yc, auxc = compiled(x)
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(auxc.aux_loss, aux.aux_loss)
    (yc.sum() + auxc.aux_loss).backward()
    assert layer.experts.w_in.grad is not None
