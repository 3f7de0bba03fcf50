"""The server's Prometheus metrics, in a registry of its own (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("islands_serve_queue_depth", "Requests waiting for a slot",
                                 registry=r)
        self.inflight = Gauge("islands_serve_inflight_requests", "Requests being stepped",
                              registry=r)
        self.call_rows = Histogram("islands_serve_expert_call_rows", "Rows in one expert call",
                                   ["expert"], buckets=ROWS, registry=r)
        self.step_seconds = Histogram("islands_serve_step_seconds",
                                      "One step of every request in flight", buckets=SECONDS,
                                      registry=r)
        self.router_seconds = Histogram("islands_serve_router_seconds",
                                        "One router call on a step's batch", buckets=SECONDS,
                                        registry=r)
        self.requests = Counter("islands_serve_requests", "Requests answered, by status",
                                ["endpoint", "status"], registry=r)
        self.expert_up = Gauge("islands_serve_expert_up", "1 when the expert answers",
                               ["expert"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
