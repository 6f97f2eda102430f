"""Prometheus metrics of one serving replica, on their own registry and side HTTP port.

Names are fixed by DESIGN.md §3 (dashboards and the outside checks rely on them):
tandem_ttft_seconds, tandem_tpot_seconds, tandem_e2e_seconds (histograms),
tandem_queue_depth, tandem_active_slots (running sequences), tandem_kv_cache_usage_ratio
(gauges), tandem_generated_tokens_total, tandem_requests_total{status} (status is a gRPC
status code name such as "OK"), tandem_prefix_cache_queries_total and
tandem_prefix_cache_hits_total (prompt tokens looked up in the prefix cache, and found),
tandem_preemptions_total (counters).
TPOT follows vLLM: (e2e - ttft) / (output tokens - 1), observed only when > 1 token.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class ServeMetrics:
    """All serving metrics; a fresh registry per instance so several servers can share a
    process (tests) without colliding in prometheus_client's global registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "tandem_ttft_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "tandem_tpot_seconds",
            "Time per output token after the first: (e2e - ttft) / (tokens - 1).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_e2e_seconds",
            "Request latency from admission to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tandem_queue_depth", "Requests waiting to start.", registry=r)
        self.active_slots = Gauge(
            "tandem_active_slots",
            "Running sequences (requests holding KV-cache pages).",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "tandem_kv_cache_usage_ratio",
            "Fraction of the KV-cache pages that running sequences hold.",
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "tandem_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (new requests, not resumed ones).",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "tandem_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed again).",
            registry=r,
        )
        self.preemptions = Counter(
            "tandem_preemptions",
            "Running sequences preempted for KV-cache pages (recomputed later).",
            registry=r,
        )
        self.generated_tokens = Counter(
            "tandem_generated_tokens", "Tokens generated (all requests).", registry=r
        )
        self.requests = Counter(
            "tandem_requests", "Finished requests by gRPC status.", ["status"], registry=r
        )

    def observe_finished(self, *, ttft: float | None, e2e: float, tokens: int) -> None:
        self.e2e.observe(e2e)
        if ttft is not None and tokens > 1:
            self.tpot.observe((e2e - ttft) / (tokens - 1))

    def count_request(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = server.server_address[1]
        self._http_server = server
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
