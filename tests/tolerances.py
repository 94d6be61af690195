"""Tolerances derived from the computation, and comparisons whose failures show the size of a difference.

Two runs that compute the same thing in another float order (other processes, other threads, another
CPU's kernels) agree to rounding in their losses and gradients. An optimizer can amplify that: Adam's step
``m_hat / (sqrt(v_hat) + eps)`` is a normalised quantity, so for an element whose gradient is near zero
its direction is set by the rounding, and the two runs' weights may differ there by up to about two
learning rates a step. :class:`AdamDrift` bounds, element by element, how far two AdamW runs can drift
apart when every gradient of one is within the gradient check's tolerance of the other's; weights are
then compared against that bound (tight where the gradient is well above the rounding, loose only
where Adam amplifies it).
"""

from __future__ import annotations

import math

import torch


def assert_close(actual, expected, what: str, **tolerances) -> None:
    """``torch.testing.assert_close`` whose message keeps torch's account of the difference (greatest
    absolute and relative difference, how many elements) and prefixes ``what``: a ``msg=`` string
    would replace that account."""
    torch.testing.assert_close(actual, expected, msg=lambda message: f"{what}: {message}", **tolerances)


def adam_normalised_step_bound(step: int, beta1: float, beta2: float) -> float:
    """K_t: the largest ``|m_hat| / sqrt(v_hat)`` Adam can produce at ``step`` (Cauchy-Schwarz over the
    moments' weights ``a_s = (1-b1) b1^(t-s)`` and ``b_s = (1-b2) b2^(t-s)``):
    ``K_t^2 = (1-b2^t) / (1-b1^t)^2 * sum_s a_s^2 / b_s``. About 1 in the first steps."""
    weights = [((1 - beta1) * beta1 ** (step - s), (1 - beta2) * beta2 ** (step - s)) for s in range(1, step + 1)]
    total = sum(a * a / b for a, b in weights)
    return math.sqrt((1 - beta2**step) / (1 - beta1**step) ** 2 * total)


class AdamDrift:
    """Per-element bound on ``|w - w_ref|`` for two AdamW runs whose gradients agree within
    ``atol + rtol * |g_ref|`` at every step (the gradient check's own tolerance, asserted by the test).

    With ``D`` the largest gradient tolerance so far (it bounds the moments' differences:
    ``|m_hat - m_hat'| <= D`` and ``|sqrt(v_hat) - sqrt(v_hat')| <= D``) and ``s = sqrt(v_hat)`` of the
    reference, one step's normalised updates differ by at most
    ``min(D / (max(s - D, 0) + eps) * (1 + K_t), 2 K_t)``; decoupled weight decay only shrinks a
    difference, so the weights differ by at most ``lr`` times the sum of those over the steps.

    Call :meth:`gradients` after the gradient check (before ``optimizer.step()``) and :meth:`stepped`
    after the reference optimizer's step; :meth:`check` compares the weights at the end."""

    def __init__(self, optimizer: torch.optim.Optimizer, atol: float, rtol: float):
        (group,) = optimizer.param_groups
        self.optimizer, self.atol, self.rtol = optimizer, atol, rtol
        self.lr, (self.beta1, self.beta2), self.eps = group["lr"], group["betas"], group["eps"]
        self.params = list(group["params"])
        self.largest = [torch.zeros_like(p) for p in self.params]  # D: the largest gradient tolerance so far
        self.drift = [torch.zeros_like(p) for p in self.params]

    def gradients(self) -> None:
        for largest, p in zip(self.largest, self.params):
            torch.maximum(largest, self.atol + self.rtol * p.grad.detach().abs(), out=largest)

    def stepped(self) -> None:
        for largest, drift, p in zip(self.largest, self.drift, self.params):
            state = self.optimizer.state[p]
            step = int(state["step"])
            k = adam_normalised_step_bound(step, self.beta1, self.beta2)
            s = (state["exp_avg_sq"] / (1 - self.beta2**step)).sqrt()
            sensitivity = largest / ((s - largest).clamp(min=0) + self.eps) * (1 + k)
            drift.add_(self.lr * sensitivity.clamp(max=2 * k))

    def bound(self, param: torch.Tensor) -> torch.Tensor:
        for p, drift in zip(self.params, self.drift):
            if p is param:
                return drift
        raise KeyError("not a parameter of the reference optimizer")

    def check(self, weight: torch.Tensor, reference: torch.Tensor, what: str, atol: float = 1e-5,
              rtol: float = 1e-5, rows: slice | None = None) -> None:  # fmt: skip
        """``weight`` within rounding plus Adam's drift of ``reference`` (a parameter of the reference
        optimizer; ``rows``: the slice of it ``weight`` holds, for a shard). The message names the
        element furthest outside, its difference, its allowance and how many elements are outside."""
        drift = self.bound(reference)
        ref = reference.detach()
        if rows is not None:
            ref, drift = ref[rows], drift[rows]
        difference = (weight.detach() - ref).abs()
        allowed = atol + rtol * ref.abs() + drift
        outside = difference > allowed
        if outside.any():
            worst = int((difference - allowed).flatten().argmax())
            raise AssertionError(
                f"{what}: {int(outside.sum())} of {difference.numel()} elements differ by more than rounding plus "
                f"Adam's drift; the worst, at flat index {worst}, by {float(difference.flatten()[worst]):.3g} "
                f"(allowed {float(allowed.flatten()[worst]):.3g}, of which drift {float(drift.flatten()[worst]):.3g}); "
                f"largest difference anywhere {float(difference.max()):.3g}"
            )
