"""``GET /metrics`` in Prometheus' text format (``prometheus_client``, a registry per server).

HTTP requests by endpoint and status, time to first token and request duration (histograms) are
observed by the server; the scheduler's figures are read from the engine at each scrape: queue
length, running batch size, prompt and generated tokens, tokens/s over the last 10 seconds (exact at any
rate: a difference of totals), and
for each Switch layer the tokens each expert received (``switchformer_expert_tokens_total``) and
its share of the layer's tokens (``switchformer_expert_token_share``); with experts offloaded
(``--max-memory``), the expert cache's hits, misses, bytes read and bytes held.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("switchformer_queue_length", "Requests waiting for a slot", engine.queue_length())
        yield GaugeMetricFamily("switchformer_running_requests", "Requests in the running batch", engine.running())
        yield CounterMetricFamily("switchformer_prompt_tokens", "Prompt tokens prefilled", stats.prompt_tokens)
        yield CounterMetricFamily("switchformer_generation_tokens", "Tokens generated", stats.generation_tokens)
        yield CounterMetricFamily("switchformer_scheduler_steps", "Batched decoding steps", stats.steps)
        yield GaugeMetricFamily(
            "switchformer_generation_tokens_per_second", "Tokens generated per second, last 10 s",
            stats.tokens_per_second(),
        )  # fmt: skip
        finished = CounterMetricFamily(
            "switchformer_requests_finished", "Requests ended, by finish reason", labels=["reason"]
        )
        for reason, count in sorted(stats.requests_finished.items()):
            finished.add_metric([reason], count)
        yield finished
        tokens = CounterMetricFamily(
            "switchformer_expert_tokens", "Tokens each expert of each Switch layer received", labels=["layer", "expert"]
        )
        share = GaugeMetricFamily(
            "switchformer_expert_token_share", "Each expert's share of its layer's tokens", labels=["layer", "expert"]
        )
        for layer, counts in sorted(dict(stats.expert_tokens).items()):
            values = counts.tolist()
            total = sum(values)
            for expert, value in enumerate(values):
                tokens.add_metric([layer, str(expert)], value)
                share.add_metric([layer, str(expert)], value / total if total else 0.0)
        yield tokens
        yield share
        cache = getattr(getattr(engine, "model", None), "expert_cache", None)
        if cache is not None:  # experts offloaded (--max-memory): what the cache saved and what it read
            yield CounterMetricFamily("switchformer_expert_cache_hits", "Expert fetches the cache served", cache.hits)
            yield CounterMetricFamily(
                "switchformer_expert_cache_misses", "Expert fetches read from the checkpoint's files", cache.misses
            )
            yield CounterMetricFamily(
                "switchformer_expert_cache_read_bytes", "Bytes of experts read from the checkpoint's files",
                cache.bytes_read,
            )  # fmt: skip
            yield GaugeMetricFamily("switchformer_expert_cache_bytes", "Bytes the expert cache holds", cache.used_bytes)


class ServerMetrics:
    """The server's Prometheus registry; ``render()`` is the ``/metrics`` body."""

    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "switchformer_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "switchformer_time_to_first_token_seconds", "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "switchformer_request_duration_seconds", "From arrival to the last token",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_EngineCollector(engine))
        engine.stats.first_token_observer = self.time_to_first_token.observe  # thread-safe, as every metric

    def render(self) -> bytes:
        return generate_latest(self.registry)
