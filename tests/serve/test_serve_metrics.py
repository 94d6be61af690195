"""The server's gauges and counters are exact at any rate: synthetic rates far above what any
engine reaches today (the CPU engine makes about 5,000 tokens/s) read back exactly, and time to first
token is counted once per request however rarely ``/metrics`` is scraped."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("prometheus_client")

from switchformer.serve.engine import EngineStats  # noqa: E402


def _run(stats: EngineStats, rate: float, steps_per_second: int, seconds: float, start: float = 0.0) -> float:
    """Generate at ``rate`` tokens/s in ``steps_per_second`` scheduler iterations; returns the end time."""
    per_step, now = rate / steps_per_second, start
    for k in range(int(seconds * steps_per_second)):
        now = start + (k + 1) / steps_per_second
        stats.generation_tokens += int(per_step)
        stats.record_total(now)
    return now


@pytest.mark.parametrize("rate", [20_000, 100_000, 10_000_000])
def test_the_rate_reads_what_was_generated_at_any_rate(rate):
    stats = EngineStats()
    now = _run(stats, rate, steps_per_second=100, seconds=25)
    assert stats.tokens_per_second(now) == pytest.approx(rate, rel=1e-9)
    assert len(stats.totals) <= 100 * stats.window + 2  # memory bounded by iterations in the window, not tokens


def test_the_rate_follows_changes_and_falls_to_zero_when_idle():
    stats = EngineStats()
    now = _run(stats, 50_000, 50, seconds=12)
    now = _run(stats, 2_000, 50, seconds=5, start=now) + 0.001  # between samples: no boundary to round
    # the last 10 s: 5 s at 50k, 5 s at 2k
    assert stats.tokens_per_second(now) == pytest.approx((5 * 50_000 + 5 * 2_000) / 10)
    assert stats.tokens_per_second(now + 4) == pytest.approx((1 * 50_000 + 5 * 2_000) / 10)
    assert stats.tokens_per_second(now + 10) == 0.0  # idle: nothing in the window
    assert EngineStats().tokens_per_second(5.0) == 0.0


def test_time_to_first_token_is_observed_once_per_request_without_a_scrape():
    from prometheus_client import generate_latest

    from switchformer.serve.metrics import ServerMetrics

    class Engine:  # what the collector reads
        stats = EngineStats()

        def queue_length(self):
            return 0

        def running(self):
            return 0

    engine = Engine()
    metrics = ServerMetrics(engine)
    for i in range(100_000):  # far more than any cap a buffer could have
        engine.stats.first_token_observer(0.001 * (i % 7))
    text = metrics.render().decode()
    assert "switchformer_time_to_first_token_seconds_count 100000.0" in text
    assert generate_latest(metrics.registry).decode() == text  # a scrape changes nothing


def test_the_expert_cache_is_exported_when_experts_are_offloaded():
    from switchformer.moe.offload import ExpertCache, ExpertWeights
    from switchformer.serve.metrics import ServerMetrics

    cache = ExpertCache(100)
    for key in (1, 2, 1, 3, 1):  # 3 misses of 32 bytes read each, 2 hits
        cache.get(key, lambda: (ExpertWeights(torch.zeros(4), torch.zeros(4)), 32))

    class Model:
        expert_cache = cache

    class Engine:
        stats = EngineStats()
        model = Model()

        def queue_length(self):
            return 0

        def running(self):
            return 0

    text = ServerMetrics(Engine()).render().decode()
    assert "switchformer_expert_cache_hits_total 2.0" in text
    assert "switchformer_expert_cache_misses_total 3.0" in text
    assert "switchformer_expert_cache_read_bytes_total 96.0" in text
    assert f"switchformer_expert_cache_bytes {float(cache.used_bytes)}" in text
    Model.expert_cache = None  # everything resident: no cache series at all
    assert "expert_cache" not in ServerMetrics(Engine()).render().decode()
