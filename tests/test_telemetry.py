"""Telemetry for real: counters read back, the metrics listener on 127.0.0.1 answering plain-HTTP GETs from httpx,
and the job switch that turns it on."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from vfl_cli.errors import JobError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.telemetry import MAX_LABEL_VALUES, OTHER, Telemetry, serve_metrics, start_metrics_server

REPO = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by (name, labels); parsing it is part of the test."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def small_job(metrics: dict[str, str] | None = None) -> JobSpec:
    return parse_job(
        {
            "name": "telemetry",
            "parties": {
                "leader": {"name": "alice", "fields": ["I1"], "listen": f"127.0.0.1:{free_port()}"},
                "follower": {"name": "bob", "fields": ["I2"], "listen": f"127.0.0.1:{free_port()}"},
            },
            "metrics": {"listen": metrics or {}},
            "tls": {"enabled": False},
        }
    )


@pytest.fixture
def served() -> Iterator[tuple[Telemetry, dict[str, str], httpx.Client]]:
    """The leader's telemetry behind a real listener on 127.0.0.1, its health dict, and a client for it."""
    telemetry = Telemetry("leader")
    health = {"status": "ok", "role": "leader", "phase": "train", "step": "0"}
    server = serve_metrics(telemetry, lambda: dict(health), "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=5) as client:
            yield telemetry, health, client
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ counting


def test_counts_show_on_the_metrics_page(served: tuple[Telemetry, dict[str, str], httpx.Client]) -> None:
    telemetry, _, client = served
    telemetry.step_done(0.2, 512)
    telemetry.step_done(0.2, 512)
    telemetry.evaluated({"auc": 0.75, "log_loss": 0.5})
    telemetry.resumed(500)
    telemetry.sent("follower", "embeddings", 1000)
    telemetry.sent("follower", "embeddings", 500)
    telemetry.sent("follower", "hello", 40)
    telemetry.received("follower", "gradients", 700)
    telemetry.retried("connect")
    telemetry.retried("connect")
    telemetry.retried("http_503")
    telemetry.refused("too_large")

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    page = samples(response.text)
    leader = labels(role="leader")
    assert page[("vfl_steps_total", leader)] == 2
    assert page[("vfl_samples_total", leader)] == 1024
    assert page[("vfl_step_seconds_count", leader)] == 2
    assert page[("vfl_step_seconds_sum", leader)] == pytest.approx(0.4)
    assert page[("vfl_step_seconds_bucket", labels(role="leader", le="0.1"))] == 0
    assert page[("vfl_step_seconds_bucket", labels(role="leader", le="0.25"))] == 2
    assert page[("vfl_step_seconds_bucket", labels(role="leader", le="60.0"))] == 2
    assert page[("vfl_eval_score", labels(role="leader", metric="auc"))] == 0.75
    assert page[("vfl_eval_score", labels(role="leader", metric="log_loss"))] == 0.5
    assert page[("vfl_resumes_total", leader)] == 1
    assert page[("vfl_resume_step", leader)] == 500
    assert page[("vfl_bytes_sent_total", labels(role="leader", peer="follower", kind="embeddings"))] == 1500
    assert page[("vfl_bytes_sent_total", labels(role="leader", peer="follower", kind="hello"))] == 40
    assert page[("vfl_bytes_received_total", labels(role="leader", peer="follower", kind="gradients"))] == 700
    assert ("vfl_bytes_received_total", labels(role="leader", peer="follower", kind="embeddings")) not in page
    assert page[("vfl_retries_total", labels(role="leader", reason="connect"))] == 2
    assert page[("vfl_retries_total", labels(role="leader", reason="http_503"))] == 1
    assert page[("vfl_refusals_total", labels(role="leader", reason="too_large"))] == 1


def test_a_fresh_party_exports_zeros_and_no_auc_yet() -> None:
    page = samples(Telemetry("follower").render().decode())

    follower = labels(role="follower")
    assert page[("vfl_steps_total", follower)] == 0
    assert page[("vfl_step_seconds_count", follower)] == 0
    assert not any(name == "vfl_eval_score" for name, _ in page)  # not 0: nothing was measured


def test_value_reads_back_what_was_counted() -> None:
    telemetry = Telemetry("leader")
    telemetry.step_done(0.003, 64)
    telemetry.sent("follower", "gradients", 123)
    telemetry.refused("forbidden")
    telemetry.evaluated({"accuracy": float("nan")})

    assert telemetry.value("vfl_steps_total") == 1
    assert telemetry.value("vfl_samples_total") == 64
    assert telemetry.value("vfl_step_seconds_bucket", le="0.005") == 1
    assert telemetry.value("vfl_step_seconds_bucket", le="0.0025") == 0
    assert telemetry.value("vfl_bytes_sent_total", peer="follower", kind="gradients") == 123
    assert telemetry.value("vfl_refusals_total", reason="forbidden") == 1
    assert math.isnan(telemetry.value("vfl_eval_score", metric="accuracy"))
    assert telemetry.value("vfl_bytes_sent_total", peer="follower", kind="embeddings") == 0.0  # never counted
    assert telemetry.value("vfl_no_such_metric") == 0.0


def test_two_parties_in_one_process_count_apart() -> None:
    leader, follower = Telemetry("leader"), Telemetry("follower")
    leader.step_done(0.1, 10)
    leader.sent("follower", "embeddings", 99)
    other_leader = Telemetry("leader")  # same role, fresh instance: its own registry too

    assert leader.value("vfl_steps_total") == 1
    assert follower.value("vfl_steps_total") == 0
    assert other_leader.value("vfl_steps_total") == 0
    assert other_leader.value("vfl_bytes_sent_total", peer="follower", kind="embeddings") == 0
    follower_page = samples(follower.render().decode())
    assert all(dict(key[1]).get("role") == "follower" for key in follower_page)


def test_label_values_stay_a_small_set() -> None:
    telemetry = Telemetry("leader")
    telemetry.refused("Bad Body from {peer}")  # not a short name: never becomes a label value
    telemetry.refused("x" * 33)
    for i in range(MAX_LABEL_VALUES + 10):
        telemetry.retried(f"reason_{i}")
    telemetry.retried("reason_0")  # one already seen still counts under its own name

    assert telemetry.value("vfl_refusals_total", reason=OTHER) == 2
    assert telemetry.value("vfl_retries_total", reason="reason_0") == 2
    assert telemetry.value("vfl_retries_total", reason=f"reason_{MAX_LABEL_VALUES - 1}") == 1
    assert telemetry.value("vfl_retries_total", reason=f"reason_{MAX_LABEL_VALUES}") == 0
    assert telemetry.value("vfl_retries_total", reason=OTHER) == 10
    reasons = {dict(key[1])["reason"] for key in samples(telemetry.render().decode()) if key[0] == "vfl_retries_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1


def test_importing_telemetry_leaves_the_web_stack_out() -> None:
    code = (
        "import sys, vfl_cli.telemetry as t; t.Telemetry('leader').step_done(0.1, 1); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'httpx', 'starlette', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ listener


def test_healthz_answers_with_the_health_dict(served: tuple[Telemetry, dict[str, str], httpx.Client]) -> None:
    _, health, client = served
    assert client.get("/healthz").json() == {"status": "ok", "role": "leader", "phase": "train", "step": "0"}
    health["step"] = "120"  # asked on every request, not once at start
    assert client.get("/healthz").json()["step"] == "120"


def test_a_failing_health_check_is_a_500_without_a_traceback() -> None:
    def health() -> dict[str, str]:
        raise RuntimeError("the training loop's secret state")

    server = serve_metrics(Telemetry("leader"), health, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=5) as client:
            response = client.get("/healthz")
            assert (response.status_code, response.json()) == (500, {"status": "error"})
            assert client.get("/metrics").status_code == 200  # the listener survives it
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/", "/metric", "/v1/health", "/docs", "/redoc", "/openapi.json"])
def test_other_paths_are_not_found(served: tuple[Telemetry, dict[str, str], httpx.Client], path: str) -> None:
    _, _, client = served
    assert client.get(path).status_code == 404


def test_the_job_turns_the_listener_on_per_role() -> None:
    port = free_port()
    job = small_job({"follower": f"127.0.0.1:{port}"})
    telemetry = Telemetry("follower")
    telemetry.received("leader", "embeddings", 4096)

    assert start_metrics_server(job, "leader", Telemetry("leader"), dict) is None
    assert start_metrics_server(small_job(), "follower", telemetry, dict) is None  # off by default
    server = start_metrics_server(job, "follower", telemetry, lambda: {"status": "ok"})
    assert server is not None and server.running
    try:
        with httpx.Client(trust_env=False, timeout=5) as client:
            page = samples(client.get(f"http://127.0.0.1:{port}/metrics").text)
        assert page[("vfl_bytes_received_total", labels(role="follower", peer="leader", kind="embeddings"))] == 4096
    finally:
        server.stop()
    with httpx.Client(trust_env=False, timeout=5) as client, pytest.raises(httpx.ConnectError):
        client.get(f"http://127.0.0.1:{port}/metrics")  # stopped means the port is closed


def test_a_taken_metrics_port_names_the_job_key() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        job = small_job({"leader": f"127.0.0.1:{port}"})
        with pytest.raises(JobError, match=f"metrics.listen.leader: cannot listen on 127.0.0.1:{port}"):
            start_metrics_server(job, "leader", Telemetry("leader"), dict)


def test_a_bad_role_is_refused() -> None:
    bad: Any = "Leader {x}"
    with pytest.raises(ValueError, match="role"):
        Telemetry(bad)
