"""What a party counts about itself, and the plain-HTTP listener that shows it to Prometheus.

`Telemetry` owns one party's counters, gauges and histogram in its own `CollectorRegistry` (never the global
default registry: tests run every party in one process, and each must count only for itself). Every sample
carries the label `role` = the party's key in the job ("leader", "follower", "follower2", ...), so one
Prometheus can scrape every party and keep them apart. The metrics:

    vfl_steps_total                   training steps done
    vfl_samples_total                 training samples seen
    vfl_step_seconds                  histogram of one step's wall time, buckets from 1 ms to 60 s
    vfl_eval_score{metric}            each metric of the task at the last evaluation of an epoch, e.g.
                                      metric="auc", "log_loss", "ks" (binary), "accuracy" (multiclass),
                                      "rmse" (regression); the leader's only (the follower has no labels)
    vfl_resumes_total                 runs resumed from a checkpoint
    vfl_resume_step                   the step the last resume started from
    vfl_bytes_sent_total{peer,kind}   request bodies sent, by peer (its key in the job) and message kind
    vfl_bytes_received_total{peer,kind}  request bodies accepted, by peer and message kind
    vfl_retries_total{reason}         resends, e.g. reason="connect", "timeout", "http_503", "http_5xx"
    vfl_refusals_total{reason}        requests this party refused, e.g. reason="bad_body", "too_large", "busy"

Label values are short names chosen by our own code or the job's party keys, never strings a peer sent: a peer
that could pick label values could grow the registry without bound. As a second guard, a value that is not
`[a-z0-9_]{1,32}`, or
that would be a metric's 33rd distinct value, is counted as "other".

`create_metrics_app` serves GET /metrics (Prometheus text format) and GET /healthz (a small JSON dict from the
caller); `start_metrics_server` runs it on `job.metrics.listen[role]`, and does nothing when the job names no
listener for the role (the default). The listener is plain HTTP: no TLS, no client certificates, anyone who can
reach the port can read it. It shows only these counters and the health dict, never tensors, labels, data or
secrets; still, bind it to 127.0.0.1 and let a local Prometheus or agent scrape it.

This module imports only `prometheus_client` at the top, so the training loop can create a `Telemetry` without
pulling in fastapi, uvicorn or httpx; the server half imports them when it is used.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vfl_cli.errors import JobError, PeerError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vfl_cli.job import JobSpec
    from vfl_cli.transport.listener import ServerThread

log = logging.getLogger(__name__)

# Wall time of one training step: ~1 ms (tiny test jobs) to a minute (a 16k batch on a slow CPU or link).
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_LABEL_VALUES = 32  # distinct values per labelled metric; more are folded into OTHER
OTHER = "other"
_LABEL_VALUE = re.compile(r"[a-z0-9_]{1,32}")
_PARTY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the job's party keys (`vfl_cli.job.PARTY_KEY`)

Health = Callable[[], dict[str, str]]


class Telemetry:
    """One party's counters. Cheap to create; every method is thread-safe (prometheus_client metrics are)."""

    def __init__(self, role: str) -> None:
        if not _PARTY_KEY.fullmatch(role):
            raise ValueError(f"role {role!r} is not a party key")
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()  # guards _seen; the metrics have their own locks
        self._seen: dict[str, set[str]] = {}

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["role", *labels], registry=self.registry)

        # Unlabelled-but-for-role children are bound once, so they are exported as 0 before the first event.
        self._steps = counter("vfl_steps", "Training steps done.").labels(role=role)
        self._samples = counter("vfl_samples", "Training samples seen.").labels(role=role)
        self._step_seconds = Histogram(
            "vfl_step_seconds", "Wall time of one training step.", ["role"],
            buckets=STEP_SECONDS_BUCKETS, registry=self.registry,
        ).labels(role=role)
        self._eval_score = Gauge("vfl_eval_score", "Each metric of the task at the last epoch's evaluation.",
                                 ["role", "metric"], registry=self.registry)
        self._resumes = counter("vfl_resumes", "Runs resumed from a checkpoint.").labels(role=role)
        self._resume_step = Gauge(
            "vfl_resume_step", "Step the last resume started from.", ["role"], registry=self.registry
        ).labels(role=role)
        self._bytes_sent = counter("vfl_bytes_sent", "Request body bytes sent to a peer.", "peer", "kind")
        self._bytes_received = counter("vfl_bytes_received", "Request body bytes accepted from a peer.", "peer", "kind")
        self._retries = counter("vfl_retries", "Requests resent to the peer.", "reason")
        self._refusals = counter("vfl_refusals", "Requests from the peer this party refused.", "reason")

    # ------------------------------------------------------------------------------------- training loop

    def step_done(self, seconds: float, samples: int) -> None:
        """One training step of `samples` samples took `seconds` of wall time."""
        self._steps.inc()
        self._samples.inc(samples)
        self._step_seconds.observe(seconds)

    def evaluated(self, scores: dict[str, float]) -> None:
        """The latest evaluation's metrics by name (NaN where undefined, e.g. AUC on a split of one class); the
        names are the task's own (`vfl_cli.task`), a bounded set."""
        for name, value in scores.items():
            self._eval_score.labels(role=self.role, metric=self._label("metric", name)).set(value)

    def resumed(self, step: int) -> None:
        """Training resumed from a checkpoint at `step`."""
        self._resumes.inc()
        self._resume_step.set(step)

    # ----------------------------------------------------------------------------------------- transport

    def sent(self, peer: str, kind: str, nbytes: int) -> None:
        """A message of `kind` ("hello", "embeddings", "gradients", "abort") with a body of `nbytes` went out to
        `peer` (its key in the job: our code's choice, a bounded set)."""
        self._bytes_sent.labels(role=self.role, peer=self._label("peer", peer, _PARTY_KEY),
                                kind=self._label("kind", kind)).inc(nbytes)

    def received(self, peer: str, kind: str, nbytes: int) -> None:
        """A message of `kind` with a body of `nbytes` was accepted from `peer` (its key in the job)."""
        self._bytes_received.labels(role=self.role, peer=self._label("peer", peer, _PARTY_KEY),
                                    kind=self._label("kind", kind)).inc(nbytes)

    def bytes_total(self, direction: str) -> int:
        """Every body byte "sent" or "received", over all peers and kinds."""
        total = 0.0
        for metric in self.registry.collect():
            if metric.name == f"vfl_bytes_{direction}":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return int(total)

    def retried(self, reason: str) -> None:
        """A request is sent again: "connect", "timeout", "http_503", "http_5xx", ..."""
        self._retries.labels(role=self.role, reason=self._label("retry", reason)).inc()

    def refused(self, reason: str) -> None:
        """A request or connection was refused: "bad_body", "wrong_session", "sequence", "too_large", ..."""
        self._refusals.labels(role=self.role, reason=self._label("refusal", reason)).inc()

    # -------------------------------------------------------------------------------------------- reading

    def render(self) -> bytes:
        """All metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample by its exported name, e.g. `value("vfl_bytes_sent_total", kind="embeddings")` or
        `value("vfl_step_seconds_count")`; the role label is added. 0.0 if there is no such sample."""
        sample = self.registry.get_sample_value(name, {"role": self.role, **labels})
        return 0.0 if sample is None else sample

    def _label(self, metric: str, value: str, pattern: re.Pattern[str] = _LABEL_VALUE) -> str:
        """`value` if it is a short name and the metric has room for it, else OTHER: label sets stay bounded."""
        if not pattern.fullmatch(value):
            return OTHER
        with self._lock:
            seen = self._seen.setdefault(metric, set())
            if value in seen:
                return value
            if len(seen) >= MAX_LABEL_VALUES:
                return OTHER
            seen.add(value)
            return value


# ---------------------------------------------------------------------------------------------- listener


def create_metrics_app(telemetry: Telemetry, health: Health) -> FastAPI:
    """GET /metrics and GET /healthz; every other path is 404, and there are no docs or openapi routes."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST

    app = FastAPI(title=f"vfl {telemetry.role} metrics", docs_url=None, redoc_url=None, openapi_url=None)

    # Plain `def`: FastAPI runs these in a worker thread, so a `health` that waits on the training loop's lock
    # does not stall the event loop, and /metrics keeps answering.
    @app.get("/metrics")
    def metrics() -> Response:
        """The party's counters in the Prometheus text format."""
        return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=None)
    def healthz() -> dict[str, str] | JSONResponse:
        """Liveness and progress, e.g. {"status": "ok", "role": "leader", "phase": "train", "step": "120"}."""
        try:
            return health()
        except Exception as exc:  # a probe gets an answer, the log one line per failure, never a traceback
            log.warning("metrics: /healthz failed: %r", exc)
            return JSONResponse({"status": "error"}, status_code=500)

    return app


def serve_metrics(telemetry: Telemetry, health: Health, host: str, port: int) -> ServerThread:
    """Start the metrics app on host:port (port 0 = any free port, see `.port`), plain HTTP; stop() it when done."""
    from vfl_cli.transport.listener import ServerThread

    if not _is_loopback(host):
        log.warning("the metrics listener on %s:%s is plain HTTP and reachable from other hosts", host, port)
    server = ServerThread(create_metrics_app(telemetry, health), host, port)  # no ssl_context: plain HTTP
    server.start()
    log.info("metrics of the %s on http://%s:%s/metrics", telemetry.role, host, server.port)
    return server


def start_metrics_server(job: JobSpec, role: str, telemetry: Telemetry, health: Health) -> ServerThread | None:
    """The metrics listener of `role` at `job.metrics.listen[role]`, started; None when the job names none."""
    listen = job.metrics.listen.get(role)
    if listen is None:
        return None
    host, port = listen.rsplit(":", 1)
    try:
        return serve_metrics(telemetry, health, host.strip("[]"), int(port))
    except PeerError as exc:  # a taken port is a fix in the job file, so say which key
        raise JobError(f"metrics.listen.{role}: {exc}") from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
