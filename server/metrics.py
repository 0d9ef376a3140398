"""Prometheus metrics on a registry owned by one server (never the process-global default registry), named
like vLLM's with a `hotcold:` prefix so existing dashboards map over. Gauges come from engine.stats() after
each step; latencies are measured where the client sees them, on the event loop."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"hotcold:{name}", doc, list(labels), registry=r).labels(**labels)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences queued for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache memory in use (0..1).")
        self.sparsity = gauge("ffn_sparsity", "FFN activation sparsity of the last step (NaN when dense).")
        self.hot_share = gauge("ffn_hot_share", "Share of active FFN neurons computed hot (GPU) last step.")
        self.cold_share = gauge("ffn_cold_share", "Share of active FFN neurons computed cold (CPU), last step.")
        self.prompt_tokens = Counter("hotcold:prompt_tokens", "Prefilled prompt tokens.", list(labels),
                                     registry=r).labels(**labels)
        self.generation_tokens = Counter("hotcold:generation_tokens", "Generated tokens.", list(labels),
                                         registry=r).labels(**labels)
        self._success = Counter("hotcold:request_success", "Finished requests by finish reason.",
                                [*labels, "finished_reason"], registry=r)
        self.aborted = Counter("hotcold:request_aborted", "Requests cancelled before they finished "
                               "(client gone, or shutdown).", list(labels), registry=r).labels(**labels)
        self.rejected = Counter("hotcold:request_rejected", "Requests refused (queue full or draining).",
                                list(labels), registry=r).labels(**labels)
        self.ttft = Histogram("hotcold:time_to_first_token_seconds", "Time to first token.", list(labels),
                              buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("hotcold:inter_token_latency_seconds", "Time between output tokens.",
                             list(labels), buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("hotcold:e2e_request_latency_seconds", "Arrival to last token.", list(labels),
                             buckets=E2E_BUCKETS, registry=r).labels(**labels)
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache "
                                     "since start (0..1).")
        self.prefix_queries = Counter("hotcold:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache.", list(labels), registry=r).labels(**labels)
        self.prefix_hits = Counter("hotcold:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   list(labels), registry=r).labels(**labels)
        self._prefix_seen = (0, 0)
        self.step_time = Histogram("hotcold:engine_step_seconds", "Duration of one engine step.",
                                   list(labels), buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self._labels = labels
        for g in (self.sparsity, self.hot_share, self.cold_share):
            g.set(math.nan)

    # called from the engine thread (prometheus-client metrics are thread-safe)
    def set_engine_stats(self, stats: Any) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.sparsity.set(math.nan if stats.ffn_sparsity is None else float(stats.ffn_sparsity))
        hot = stats.hot_share
        self.hot_share.set(math.nan if hot is None else float(hot))
        self.cold_share.set(math.nan if hot is None else 1.0 - float(hot))
        extra = getattr(stats, "extra", {}) or {}
        if "prefix_cache_queried_tokens" in extra:
            queried, hits = int(extra["prefix_cache_queried_tokens"]), int(extra["prefix_cache_hit_tokens"])
            self.prefix_queries.inc(max(0, queried - self._prefix_seen[0]))
            self.prefix_hits.inc(max(0, hits - self._prefix_seen[1]))
            self._prefix_seen = (queried, hits)
            self.prefix_hit_rate.set(float(extra.get("prefix_cache_hit_rate", 0.0)))

    def observe_step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    # called from the event loop
    def observe_first_token(self, seconds: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(num_prompt_tokens)

    def observe_inter_token(self, seconds: float, count: int) -> None:
        for _ in range(count):
            self.itl.observe(seconds)

    def add_generation_tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def observe_finished(self, seconds: float, finish_reason: str | None) -> None:
        self.e2e.observe(seconds)
        self._success.labels(**self._labels, finished_reason=finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
