"""Experts loaded for inference: int8 quantisation against its formula, the LRU cache against a naive
reference, and StoredExperts against the Experts they replace."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switchformer.moe.dispatch import DispatchPlan
from switchformer.moe.experts import Experts, apply_activation
from switchformer.moe.offload import ExpertCache, ExpertWeights, StoredExperts, expert_bytes, prepare_expert
from switchformer.moe.quantize import INT8_MAX, int8_matmul, quantize_int8


def test_int8_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 24) * torch.logspace(-3, 1, 24)  # channels of very different scales
    w[:, 5] = 0.0  # an all-zero channel
    m = quantize_int8(w)
    assert m.qweight.dtype == torch.int8 and m.qweight.shape == (24, 48) and m.scale.shape == (24,)
    assert int(m.qweight.abs().max()) == INT8_MAX  # each non-zero channel uses the whole range
    expected_scale = w.abs().amax(dim=0) / INT8_MAX
    expected_scale[5] = 1.0
    torch.testing.assert_close(m.scale, expected_scale, rtol=0, atol=0)
    error = (m.dequantize() - w).abs()
    assert bool((error <= m.scale[None, :] / 2 * (1 + 1e-6)).all()), "an error beyond half a quantisation step"
    assert bool((m.dequantize()[:, 5] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantising_leaves_the_weight_alone_and_rounds_as_the_formula(dtype):
    # quantisation works in place on its own copy: never on the caller's weight (a float32 weight's
    # .to(float32) would be the weight itself)
    torch.manual_seed(2)
    w = (torch.randn(96, 40) * 3).to(dtype)
    before = w.clone()
    m = quantize_int8(w)
    assert torch.equal(w, before)
    scale = w.float().abs().amax(dim=0) / INT8_MAX
    naive = torch.round(w.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).t()
    assert torch.equal(m.qweight, naive) and torch.equal(m.scale, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_is_the_dequantised_matmul(dtype):
    torch.manual_seed(1)
    w, x = torch.randn(64, 40), torch.randn(7, 64).to(dtype)
    m = quantize_int8(w)
    naive = (x.float() @ m.dequantize()).to(dtype)
    got = int8_matmul(x, m)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), naive.float(), rtol=tol, atol=tol * float(naive.abs().max()))


def _weights(nbytes: int) -> ExpertWeights:
    n = nbytes // 8  # two float32 tensors of n elements: 8 n bytes
    return ExpertWeights(torch.zeros(n), torch.zeros(n))


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(64, 400),
    accesses=st.lists(st.tuples(st.integers(0, 9), st.sampled_from([16, 24, 40, 64])), max_size=60),
)
def test_cache_is_lru_and_never_exceeds_its_budget(budget, accesses):
    sizes = {}  # each key keeps its first size, as an expert does
    cache, naive = ExpertCache(budget), OrderedDict()
    hits = misses = 0
    for key, size in accesses:
        size = sizes.setdefault(key, size)
        if size > budget:
            with pytest.raises(ValueError, match="more than the cache's budget"):
                cache.get(key, lambda size=size: (_weights(size), size))
            naive.pop(key, None)  # the naive reference evicts nothing for it either
            misses += 1
            continue
        if key in naive:
            naive.move_to_end(key)
            hits += 1
        else:
            misses += 1
            while sum(naive.values()) + size > budget:
                naive.popitem(last=False)
            naive[key] = size
        cache.get(key, lambda size=size: (_weights(size), size))
        assert cache.used_bytes <= budget and cache.peak_bytes <= budget
        assert list(cache._entries) == list(naive), "not least-recently-used order"
    assert (cache.hits, cache.misses) == (hits, misses)
    assert cache.used_bytes == sum(naive.values())


def _plan(counts: list[int]) -> DispatchPlan:
    return DispatchPlan.for_counts(torch.tensor(counts))


@pytest.mark.parametrize("activation", ["relu", "gated-gelu"])
def test_stored_experts_compute_what_experts_compute(activation):
    torch.manual_seed(2)
    experts = Experts(5, 16, 24, activation=activation).eval()
    source = lambda e: (experts.w_in[e].detach(), experts.w_out[e].detach())  # noqa: E731
    counts = [3, 0, 2, 4, 1]
    x = torch.randn(sum(counts), 16)
    with torch.no_grad():
        want = experts(x, _plan(counts))
        one = experts.forward_one(3, x[:2])
    bytes_one = expert_bytes(16, experts.w_in.shape[2], 24, torch.float32, quantize=False)
    for cache in (None, ExpertCache(2 * bytes_one)):  # all resident; and a cache of two of the five
        stored = StoredExperts(5, 16, 24, activation, source, dtype=torch.float32, cache=cache, key="layer")
        torch.testing.assert_close(stored(x, _plan(counts)), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stored.forward_one(3, x[:2]), one, rtol=1e-6, atol=1e-6)
        assert stored.params_per_expert == experts.params_per_expert
    # the forward fetched experts 0, 2, 3, 4 (two held at a time: 3 and 4 stay), forward_one(3) hit
    assert (cache.misses, cache.hits, len(cache)) == (4, 1, 2)
    assert cache.peak_bytes == 2 * bytes_one == prepare_expert(*source(0), torch.float32, False).nbytes * 2


def test_stored_experts_refuse_training():
    experts = Experts(2, 8, 16)
    stored = StoredExperts(2, 8, 16, "relu", lambda e: (experts.w_in[e], experts.w_out[e]), dtype=torch.float32)
    stored.eval()(torch.randn(3, 8), _plan([1, 2]))  # inference runs
    with pytest.raises(RuntimeError, match="cannot be trained"):
        stored.train()(torch.randn(3, 8), _plan([1, 2]))


def test_int8_experts_within_the_bound_of_their_weights():
    torch.manual_seed(3)
    experts = Experts(3, 32, 48).eval()
    source = lambda e: (experts.w_in[e].detach(), experts.w_out[e].detach())  # noqa: E731
    stored = StoredExperts(3, 32, 48, "relu", source, dtype=torch.float32, quantize=True)
    x = torch.randn(6, 32)
    counts = [2, 3, 1]
    with torch.no_grad():
        exact = experts(x, _plan(counts))
    got = stored(x, _plan(counts))
    # the same computation with the dequantised weights, by hand
    start, naive = 0, []
    for e, n in enumerate(counts):
        w = stored.weights(e)
        h = apply_activation(x[start : start + n] @ w.w_in.dequantize(), "relu")
        naive.append(h @ w.w_out.dequantize())
        start += n
    torch.testing.assert_close(got, torch.cat(naive), rtol=1e-4, atol=1e-5)
    relative = float((got - exact).norm() / exact.norm())
    assert 0 < relative < 0.02, relative  # int8 of a Gaussian matrix: about 0.5% of the output's norm
    assert stored.weights(0).nbytes == expert_bytes(32, 48, 48, torch.float32, quantize=True)


FRAGMENTS = """
import sys, torch
from switchformer.moe.quantize import quantize_int8
from switchformer.runtime import return_freed_memory
if sys.argv[1] == "returned":
    assert return_freed_memory()
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
source = torch.randn(768, 3072).bfloat16()
before = anon()
kept = [quantize_int8(source) for _ in range(120)]  # each frees a float32 copy between the int8 ones kept
print((anon() - before) / sum(m.nbytes for m in kept))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_freed_float_copies_do_not_stay_resident_between_kept_experts():
    import subprocess

    ratio = {}
    for mode in ("default", "returned"):
        out = subprocess.run([sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        ratio[mode] = float(out.stdout)
    assert ratio["returned"] < 1.15, ratio  # resident growth is what is kept, not what was freed
    assert ratio["default"] > ratio["returned"], ratio
