"""Prometheus metrics of the server, in a registry of its own (a second server in one process, or the training
exporter, cannot collide with it: prometheus_client raises "Duplicated timeseries" when one registry gets a metric
twice)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("dsrun_serve_queue_depth", "Requests accepted, waiting for their first token",
                                 registry=r)
        self.running = Gauge("dsrun_serve_running_requests", "Requests generating tokens", registry=r)
        self.ttft = Histogram("dsrun_serve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.decode_rate = Histogram("dsrun_serve_decode_tokens_per_second",
                                     "Per request: tokens after the first over the time after the first",
                                     buckets=RATE_BUCKETS, registry=r)
        self.tokens = Counter("dsrun_serve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("dsrun_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.requests = Counter("dsrun_serve_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram("dsrun_serve_batch_size",
                                    "Sequences that got a token in one forward pass (the engine's own record)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.max_batch = Gauge("dsrun_serve_max_batch_size", "Largest batch decoded together so far", registry=r)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)
        if size > self.max_batch._value.get():
            self.max_batch.set(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
