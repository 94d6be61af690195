"""RMSNorm's hand-written backward against autograd and finite differences."""

import torch

from switchformer.models.layers import RMSNorm, _RMSNormFunction


def plain(x, weight, eps):
    return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))


def test_backward_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    weight = (torch.rand(7, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(_RMSNormFunction.apply, (x, weight, 1e-6))


def test_training_path_equals_the_plain_arithmetic():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, 16, requires_grad=True)
    y = norm(x)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    want = plain(x_ref, w_ref, norm.eps)
    assert torch.equal(y, want)  # same forward arithmetic, bit for bit
    upstream = torch.randn_like(y)
    y.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference calls F.rms_norm: the same values, bit for bit
        assert torch.equal(norm(x), want)
