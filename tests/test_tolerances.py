"""The test helpers' own tolerances: Adam's drift bound allows what Adam can make of rounding and no more."""

from __future__ import annotations

import pytest
import torch
from tolerances import AdamDrift, adam_normalised_step_bound, assert_close


def _adam_run(gradients, lr=1e-2):
    weight = torch.nn.Parameter(torch.zeros(len(gradients[0])))
    optimizer = torch.optim.AdamW([weight], lr=lr)
    return weight, optimizer


def test_normalised_step_bound_holds_for_any_gradients():
    torch.manual_seed(0)
    for _ in range(200):
        weight, optimizer = _adam_run([[0.0]])
        for step in range(1, 6):
            weight.grad = torch.randn(1) * 10.0 ** float(torch.randint(-6, 3, ()))
            optimizer.step()
            state = optimizer.state[weight]
            m_hat = state["exp_avg"] / (1 - 0.9**step)
            s = (state["exp_avg_sq"] / (1 - 0.999**step)).sqrt()
            assert float(m_hat.abs() / s) <= adam_normalised_step_bound(step, 0.9, 0.999) + 1e-6


def test_drift_allows_a_flipped_near_zero_gradient_and_nothing_else():
    """Two runs whose gradients differ by rounding: where the gradient is near zero the weights
    part by about lr a step (allowed); a well-conditioned element moved the same way is refused."""
    reference_grads = [torch.tensor([1.0, 1e-7]), torch.tensor([0.5, -1e-7]), torch.tensor([0.8, 2e-7])]
    other_grads = [g + torch.tensor([1e-6, -3e-7]) for g in reference_grads]  # within atol 1e-6
    ref, opt_ref = _adam_run(reference_grads)
    other, opt = _adam_run(other_grads)
    drift = AdamDrift(opt_ref, atol=1e-6, rtol=0.0)
    for g_ref, g in zip(reference_grads, other_grads):
        ref.grad, other.grad = g_ref.clone(), g.clone()
        drift.gradients()
        opt_ref.step()
        opt.step()
        drift.stepped()
    assert float((other - ref).detach().abs()[1]) > 1e-2  # Adam amplified the rounding in the near-zero element
    drift.check(other, ref, "weights", atol=1e-7, rtol=0.0)
    moved = other.detach().clone()
    moved[0] += 1e-3
    with pytest.raises(AssertionError, match=r"1 of 2 elements .* flat index 0"):
        drift.check(moved, ref, "weights", atol=1e-7, rtol=0.0)


def test_assert_close_keeps_the_size_of_the_difference():
    with pytest.raises(AssertionError, match=r"(?s)weight w: .*Greatest absolute difference: 0\.5"):
        assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), "weight w")
