"""Router losses against the paper's formulas, and the mistakes others made (docs/layer.md)."""

from __future__ import annotations

import math

import pytest
import torch
from reference_moe import reference_load_balancing_loss

from switchformer import SwitchMoE, load_balancing_loss, router_z_loss
from switchformer.moe.routing import expert_capacity


@pytest.mark.parametrize("shape", [(32, 4), (3, 16, 8), (2, 2, 10, 5)])
def test_load_balancing_loss_matches_formula_top1(shape):
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(*shape), -1)
    index = torch.randint(0, shape[-1], shape[:-1])
    got = load_balancing_loss(probs, index)
    assert got.item() == pytest.approx(reference_load_balancing_loss(probs, index), rel=1e-5)


def test_load_balancing_loss_top2_counts_each_choice():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(2, 12, 6), -1)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(24)]).view(2, 12, 2)
    got = load_balancing_loss(probs, index)
    assert got.item() == pytest.approx(reference_load_balancing_loss(probs, index), rel=1e-5)


def test_load_balancing_loss_is_one_when_uniform_and_n_when_collapsed():
    n = 8
    uniform = torch.full((64, n), 1 / n)
    balanced_choice = torch.arange(64) % n
    assert load_balancing_loss(uniform, balanced_choice).item() == pytest.approx(1.0)
    collapsed = torch.zeros(64, n)
    collapsed[:, 3] = 1.0
    assert load_balancing_loss(collapsed, torch.full((64,), 3)).item() == pytest.approx(n)


def test_load_balancing_loss_is_per_group_so_imbalances_do_not_cancel():
    """Two groups collapsed onto different experts: per group the loss is N; pooled it would be ~1."""
    n = 2
    probs = torch.zeros(2, 10, n)
    probs[0, :, 0] = 1
    probs[1, :, 1] = 1
    index = probs.argmax(-1)
    assert load_balancing_loss(probs, index).item() == pytest.approx(2.0)
    assert load_balancing_loss(probs.reshape(20, n), index.reshape(20)).item() == pytest.approx(1.0)


def test_load_balancing_loss_does_not_renormalise_probs():
    probs = torch.full((4, 2), 0.25)  # sums to 0.5: must be used as given
    assert load_balancing_loss(probs, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(0.5)


def test_load_balancing_loss_gradient_flows_to_probs_only():
    probs = torch.softmax(torch.randn(16, 4), -1).requires_grad_()
    index = probs.argmax(-1)
    load_balancing_loss(probs, index).backward()
    counts = torch.bincount(index, minlength=4).float() / 16
    torch.testing.assert_close(probs.grad, (4 * counts / 16).expand(16, 4))


def test_load_balancing_loss_masks_padding():
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(2, 9, 4), -1)
    index = probs.argmax(-1)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    got = load_balancing_loss(probs, index, mask)
    want = (
        reference_load_balancing_loss(probs[0:1, :6], index[0:1, :6])
        + reference_load_balancing_loss(probs[1:], index[1:])
    ) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_router_z_loss_is_on_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 5) * 3
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.reshape(-1, 5).tolist()) / 21
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-5)
    # shifting logits changes the z-loss though it leaves the probabilities alone
    assert router_z_loss(logits + 5).item() > router_z_loss(logits).item() + 1


def test_layer_aux_loss_counts_choices_before_capacity_drops():
    torch.manual_seed(4)
    layer = SwitchMoE(8, 16, 4, capacity_factor=0.25, min_capacity=1, init_scale=1.0).train()
    x = torch.randn(32, 8)
    _, aux = layer(x)
    assert aux.dropped_fraction > 0.3
    logits = x @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    want = reference_load_balancing_loss(probs.unsqueeze(0), probs.argmax(-1).unsqueeze(0))
    assert aux.aux_loss.item() == pytest.approx(want, rel=1e-5)
    assert aux.z_loss.item() == pytest.approx(router_z_loss(logits).item(), rel=1e-5)


def test_layer_losses_are_differentiable_wrt_router():
    layer = SwitchMoE(8, 16, 4)
    _, aux = layer(torch.randn(20, 8))
    (aux.aux_loss + aux.z_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_capacity_formula():
    assert expert_capacity(1024, 8, 1.25) == 160
    assert expert_capacity(100, 8, 1.0) == 13  # ceil(12.5)
    assert expert_capacity(10, 8, 1.0) == 4  # min capacity (T5X)
    assert expert_capacity(3, 8, 1.0) == 3  # never more than the group holds
    assert expert_capacity(1024, 8, 1.25, top_k=2) == 320
    layer = SwitchMoE(8, 16, 8)
    assert layer.train().capacity(1024) == 160
    assert layer.eval().capacity(1024) == 256  # eval capacity factor 2.0


def test_router_entropy_and_confidence():
    layer = SwitchMoE(8, 16, 4)
    with torch.no_grad():
        layer.router.weight.zero_()
    _, aux = layer(torch.randn(10, 8))
    assert aux.router_entropy.item() == pytest.approx(math.log(4), rel=1e-5)
    assert aux.router_confidence.item() == pytest.approx(0.25)
