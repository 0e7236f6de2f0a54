"""The server's Prometheus metrics, in a registry of their own (one per application)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and CPU seconds
        self.requests = Counter("fila_requests", "Requests by HTTP status", ["status"], registry=r)
        self.queue = Gauge("fila_queue_length", "Requests waiting for the worker", registry=r)
        self.ttft = Histogram(
            "fila_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "fila_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("fila_generated_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter(
            "fila_cancelled_requests", "Requests whose client left before the answer", registry=r
        )
        self.cached = Counter(
            "fila_reused_prompt_positions",
            "Prompt positions taken from a cached prefix",
            registry=r,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
