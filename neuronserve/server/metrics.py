"""Prometheus metrics under the ``neuronserve:`` prefix, named as vLLM names them (``vllm:...``).

Latency histograms and token counters are fed as requests finish; gauges and the scheduler's own
counters (prefix cache, preemptions) are read from the scheduler at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from neuronserve.engine.outputs import RequestOutput

PREFIX = "neuronserve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _SchedulerCollector:
    def __init__(self, get_engine: Callable) -> None:
        self.get_engine = get_engine

    def collect(self):
        engine = self.get_engine()
        if engine is None:
            return
        s = engine.scheduler.stats()
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for family, name, doc, value in (
            (gauge, "num_requests_running", "Requests in the running batch.", s.num_running),
            (gauge, "num_requests_waiting", "Requests waiting for admission.", s.num_waiting),
            (gauge, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", s.kv_cache_usage),
            (
                counter,
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            (
                counter,
                "num_preemptions",
                "Requests preempted (KV freed, recomputed later).",
                s.num_preemptions,
            ),
        ):
            metric = family(PREFIX + name, doc)
            metric.add_metric([], value)
            yield metric
        speculator = getattr(engine, "speculator", None)
        if speculator is not None:
            yield from _spec_decode_metrics(speculator.stats)


def _spec_decode_metrics(stats):
    """vLLM's speculative-decoding counters: drafts, draft tokens, accepted tokens (in total and
    by draft position; accepted-per-position / drafts is the acceptance rate at that position)."""
    for name, doc, value in (
        ("spec_decode_num_drafts", "Verifications of at least one draft token.", stats.num_drafts),
        ("spec_decode_num_draft_tokens", "Draft tokens verified.", stats.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.num_accepted_tokens),
    ):
        metric = CounterMetricFamily(PREFIX + name, doc)
        metric.add_metric([], value)
        yield metric
    per_position = CounterMetricFamily(
        PREFIX + "spec_decode_num_accepted_tokens_per_pos",
        "Draft tokens accepted, by position.",
        labels=["position"],
    )
    for position, value in enumerate(stats.accepted_per_position):
        per_position.add_metric([str(position)], value)
    yield per_position


class ServerMetrics:
    def __init__(self, get_engine: Callable) -> None:
        """``get_engine`` returns the ``Engine`` once it is loaded (``None`` before)."""
        self.registry = registry = CollectorRegistry()

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Seconds from arrival to the first generated token."
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Seconds between consecutive tokens.", ITL_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Seconds from arrival to finish.")
        self.queue = histogram("request_queue_time_seconds", "Seconds from arrival to first scheduled.")
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=registry)
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=registry,
        )
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Generation requests refused: 429 (queue full) or 503 (model loading).",
            ["status"],
            registry=registry,
        )
        registry.register(_SchedulerCollector(get_engine))

    def observe(self, out: RequestOutput) -> None:
        """Record a request that ended (finished, aborted or disconnected), from its last output."""
        m, completion = out.metrics, out.outputs[0]
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(completion.token_ids))
        self.request_success.labels(completion.finish_reason or "abort").inc()
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.queue_time is not None:
            self.queue.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
