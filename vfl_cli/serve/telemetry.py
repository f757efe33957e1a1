"""What the label party counts while serving, in its own registry, shown at its API's GET /metrics:

    vfl_serve_requests_total{outcome}        requests by outcome: ok, unavailable (503), timeout (503),
                                             bad_request (4xx), unauthorized (401/403)
    vfl_serve_request_seconds                histogram of a predict request's wall time at this server
    vfl_serve_batch_ids                      histogram of the ids in each micro-batch
    vfl_serve_follower_seconds{peer}         histogram of each follower's round trip per batch (peer: its key)
    vfl_serve_model_step                     the step of the model served now

Label values are our own outcome names and the job's party keys: a bounded set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
IDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTCOMES = ("ok", "unavailable", "timeout", "bad_request", "unauthorized")


class ServeTelemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vfl_serve_requests", "Predict requests by outcome", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram("vfl_serve_request_seconds", "Wall time of a predict request",
                                 buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch = Histogram("vfl_serve_batch_ids", "Ids per micro-batch", buckets=IDS_BUCKETS,
                               registry=self.registry)
        self.follower = Histogram("vfl_serve_follower_seconds", "Round trip to a follower per batch", ["peer"],
                                  buckets=SECONDS_BUCKETS, registry=self.registry)
        self.step = Gauge("vfl_serve_model_step", "The step of the model served now", registry=self.registry)

    def request(self, outcome: str, seconds: float) -> None:
        self.requests.labels(outcome if outcome in OUTCOMES else "bad_request").inc()
        self.latency.observe(seconds)

    def refused(self, code: str) -> None:
        """A refused request, by the refusal's code (`vfl_cli.transport.server.Refusal.code`)."""
        outcome = "unauthorized" if code in ("unauthorized", "forbidden") else code
        self.requests.labels(outcome if outcome in OUTCOMES else "bad_request").inc()

    def round_trip(self, peer: str, seconds: float) -> None:
        self.follower.labels(peer).observe(seconds)

    def count(self, outcome: str) -> float:
        value = self.registry.get_sample_value("vfl_serve_requests_total", {"outcome": outcome})
        return value or 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
