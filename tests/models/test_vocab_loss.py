"""The fused output projection + cross-entropy against the plain two-step computation."""

import pytest
import torch
import torch.nn.functional as F

from switchformer.models import vocab_loss
from switchformer.models.lm import SwitchLM, SwitchLMConfig
from switchformer.models.t5 import SwitchT5, SwitchT5Config


def reference(h, weight, labels):
    return F.cross_entropy(h @ weight.t(), labels, ignore_index=-100)


def grads(fn, h, weight, labels, scale=1.0):
    h = h.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = fn(h, weight, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("chunk_elements", [1, 50 * 37, 1 << 20])  # 16-row chunks, a ragged tail, one chunk
def test_matches_cross_entropy_with_ignored_rows(monkeypatch, chunk_elements):
    monkeypatch.setattr(vocab_loss, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(50, 12, generator=g), torch.randn(37, 12, generator=g)
    labels = torch.randint(0, 37, (50,), generator=g)
    labels[::3] = -100
    want = grads(reference, h, weight, labels, scale=2.5)  # a non-unit upstream gradient
    got = grads(vocab_loss.linear_cross_entropy, h, weight, labels, scale=2.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ignored rows contribute nothing, so their h gradient is exactly zero
    assert torch.equal(got[1][labels == -100], torch.zeros_like(got[1][labels == -100]))


@pytest.mark.parametrize("eps", [0.1, 0.5])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 20])
def test_label_smoothing_matches_cross_entropy(monkeypatch, chunk_elements, eps):
    monkeypatch.setattr(vocab_loss, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(1)
    h, weight = torch.randn(40, 8, generator=g), torch.randn(29, 8, generator=g)
    labels = torch.randint(0, 29, (40,), generator=g)
    labels[1::4] = -100

    def smoothed(h, w, y):
        return F.cross_entropy(h @ w.t(), y, ignore_index=-100, label_smoothing=eps)

    want = grads(smoothed, h, weight, labels, scale=1.7)
    got = grads(lambda a, b, c: vocab_loss.linear_cross_entropy(a, b, c, eps), h, weight, labels, scale=1.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[0] > grads(reference, h, weight, labels)[0]  # smoothing costs a confident model


def test_label_smoothing_reaches_the_models_and_is_range_checked():
    config = SwitchT5Config(vocab_size=31, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, num_experts=2)
    model = SwitchT5(config).eval()
    ids = torch.randint(2, 31, (2, 5))
    plain = model(ids, labels=ids).ce_loss
    smooth = model(ids, labels=ids, label_smoothing=0.2).ce_loss
    logits = model(ids, labels=ids).logits
    want = F.cross_entropy(logits.reshape(-1, 31), ids.reshape(-1), label_smoothing=0.2)
    torch.testing.assert_close(smooth, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, smooth)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_loss.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 1.0)


def test_no_grad_and_frozen_inputs():
    h, weight = torch.randn(9, 4), torch.randn(7, 4)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100, 2])
    with torch.no_grad():
        torch.testing.assert_close(vocab_loss.linear_cross_entropy(h, weight, labels), reference(h, weight, labels))
    w = weight.clone().requires_grad_()  # only the weight trains
    vocab_loss.linear_cross_entropy(h, w, labels).backward()
    w_ref = weight.clone().requires_grad_()
    reference(h, w_ref, labels).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_all_ignored_is_nan_like_cross_entropy():
    h, weight = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.full((3,), -100)
    assert torch.isnan(reference(h, weight, labels))
    assert torch.isnan(vocab_loss.linear_cross_entropy(h, weight, labels))


def test_shape_errors_name_the_arguments():
    with pytest.raises(ValueError, match="labels \\[rows\\]"):
        vocab_loss.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long))


def _lm():
    torch.manual_seed(0)
    return SwitchLM(SwitchLMConfig(vocab_size=53, d_model=16, num_layers=2, num_heads=2, d_ff=24, num_experts=4))


def _t5():
    torch.manual_seed(0)
    return SwitchT5(
        SwitchT5Config(vocab_size=53, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, num_experts=4)
    )


@pytest.mark.parametrize("build", [_lm, _t5])
def test_models_loss_and_gradients_equal_the_unfused_path(build):
    """The fused loss (fp32 training) against cross-entropy of the model's own logits."""
    model = build()
    ids = torch.randint(2, 53, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, -4:] = -100
    out = model(ids, labels=labels)
    fused_grads = torch.autograd.grad(out.ce_loss, list(model.parameters()), allow_unused=True, retain_graph=True)
    logits = out.logits  # computed on first access, with the graph
    if isinstance(model, SwitchLM):
        logits, want_labels = logits[:, :-1], labels[:, 1:]
    else:
        want_labels = labels
    want = F.cross_entropy(logits.reshape(-1, 53), want_labels.reshape(-1))
    torch.testing.assert_close(out.ce_loss, want, rtol=1e-5, atol=1e-6)
    plain_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for a, b in zip(fused_grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_logits_are_computed_once_and_only_on_access():
    model = _lm()
    ids = torch.randint(2, 53, (2, 7))
    out = model(ids, labels=ids)
    assert callable(out._logits)
    first = out.logits
    assert first is out.logits and first.shape == (2, 7, 53)
    torch.testing.assert_close(first, model(ids).logits)


def test_deferred_logits_keep_the_forward_grad_mode():
    model = _lm()
    ids = torch.randint(2, 53, (2, 7))
    with torch.no_grad():
        out = model(ids, labels=ids)
    logits = out.logits  # read with grad enabled, computed as in the no-grad forward
    assert not logits.requires_grad
    with torch.inference_mode():
        out = model(ids, labels=ids)
    assert not out.logits.requires_grad
