"""`vfl serve`, every party its own process over mutual TLS: POST /v1/predict gives exactly `vfl infer`'s scores
(binary with three parties, multiclass with two), says which party lacks an unknown customer, and refuses
callers without a token or a named client certificate before reading their bodies."""

from __future__ import annotations

import csv
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import Served, api_client, client_certificate, infer_scores, trained_job, wait_healthy
from vfl_cli.job import JobSpec


def serving(job: JobSpec, job_path: Path, *leader_args: str) -> Iterator[dict[str, Served]]:
    """Every party's `vfl serve` process, until the loop over this ends; each must then exit 0 on SIGTERM."""
    processes = {key: Served(job_path, key) for key in job.followers}
    processes[job.label_party] = Served(job_path, job.label_party, *leader_args)
    try:
        for process in processes.values():
            process.wait_serving()
        wait_healthy(job)
        yield processes
    finally:
        codes = {key: process.stop() for key, process in processes.items()}
    assert codes == dict.fromkeys(processes, 0)


def predict(job: JobSpec, ids: list[str], rows: list[dict] | None = None) -> dict:
    with api_client(job) as client:
        response = client.post("/v1/predict", json={"ids": ids, **({"rows": rows} if rows else {})})
    assert response.status_code == 200, response.text
    return response.json()


def test_three_parties_serve_what_infer_scores(tmp_path: Path) -> None:
    job, job_path = trained_job(tmp_path, ("leader", "follower1", "follower2"), "binary")
    expected = infer_scores(job, tmp_path)
    rng = np.random.default_rng(0)
    ids = [str(i) for i in rng.choice(sorted(expected), size=60, replace=False)]
    for _ in serving(job, job_path):
        answer = predict(job, [*ids, "nobody"])
        got = answer["predictions"]
        assert [entry["id"] for entry in got] == [*ids, "nobody"]
        worst = max(abs(entry["probability"] - expected[cid][0]) for cid, entry in zip(ids, got, strict=False))
        assert worst <= 1e-6
        assert got[-1] == {"id": "nobody", "error": "unknown customer",
                           "missing_at": ["leader", "follower1", "follower2"]}
        assert answer["model"]["step"] > 0
        one = predict(job, [ids[3]])["predictions"][0]  # alone in its batch: the same score
        assert abs(one["probability"] - expected[ids[3]][0]) <= 1e-6
        check_given_rows(job, tmp_path, ids[:10], expected)
        check_refusals(job, tmp_path)


def check_given_rows(job: JobSpec, tmp_path: Path, ids: list[str], expected: dict[str, list[float]]) -> None:
    """The label party's own columns in the request, as its table has them: the same scores; changed: others."""
    with (tmp_path / "leader.csv").open() as file:
        table = {row["id"]: row for row in csv.DictReader(file)}
    rows = [{"a0": float(table[cid]["a0"]), "a1": table[cid]["a1"]} for cid in ids]
    got = predict(job, ids, rows)["predictions"]
    assert max(abs(entry["probability"] - expected[cid][0]) for cid, entry in zip(ids, got, strict=True)) <= 1e-6
    changed = predict(job, ids, [{"a0": None, "a1": "never-seen"} for _ in ids])["predictions"]
    assert all(abs(a["probability"] - b["probability"]) > 1e-7 for a, b in zip(got, changed, strict=True))
    with api_client(job) as client:
        wrong = client.post("/v1/predict", json={"ids": ids[:1], "rows": [{"a0": "high"}]})
        assert wrong.status_code == 400 and wrong.json()["error"] == "rows[0].a0: a number or null, got str"
        unknown = client.post("/v1/predict", json={"ids": ids[:1], "rows": [{"zz": 1}]})
        assert unknown.status_code == 400 and "unknown column 'zz'" in unknown.json()["error"]

def check_refusals(job: JobSpec, tmp_path: Path) -> None:
    with api_client(job, token="wrong-token-0123456789") as client:
        refused = client.post("/v1/predict", json={"ids": ["c00001"]})
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
        assert client.get("/healthz").status_code == 200  # no token needed
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert unauthenticated_answer_before_body(job).startswith(b"HTTP/1.1 401")
    app = client_certificate(job, "app", tmp_path)  # named in serve.clients
    with api_client(job, cert=app, token=None) as client:
        assert client.post("/v1/predict", json={"ids": ["c00001"]}).status_code == 200
    intruder = client_certificate(job, "intruder", tmp_path)  # from the job's CA, but not named
    with api_client(job, cert=intruder, token=None) as client:
        assert client.post("/v1/predict", json={"ids": ["c00001"]}).status_code == 401
    # A follower answers the label party alone: follower2's certificate is refused at follower1 (403), and a
    # caller without a certificate is dropped in the TLS handshake (with TLS 1.3 the client sees the hang-up).
    assert follower_status(job, "follower1", ("follower2",)) == 403
    with pytest.raises((ssl.SSLError, httpx.TransportError)):
        follower_status(job, "follower1", None)


def unauthenticated_answer_before_body(job: JobSpec) -> bytes:
    """Headers that promise a 1 MB body, and none of it sent: the answer must come anyway."""
    host, port = job.serve.listen.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(job.tls.ca))
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=job.leader.name) as tls:
        tls.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 1000000\r\n\r\n")
        return tls.recv(4096)


def follower_status(job: JobSpec, follower: str, as_party: tuple[str] | None) -> int:
    context = ssl.create_default_context(cafile=str(job.tls.ca))
    if as_party is not None:
        spec = job.parties[as_party[0]]
        context.load_cert_chain(str(spec.cert), str(spec.key))
    with httpx.Client(verify=context, trust_env=False, timeout=5) as client:
        response = client.post(f"https://{job.parties[follower].listen}/v1/serve/cut", content=b"\x80",
                               extensions={"sni_hostname": follower})
    return response.status_code


def test_a_multiclass_job_serves_each_class_probability(tmp_path: Path) -> None:
    job, job_path = trained_job(tmp_path, ("leader", "follower1"), "multiclass")
    expected = infer_scores(job, tmp_path)
    ids = sorted(expected)[:50]
    for _ in serving(job, job_path):
        got = predict(job, ids)["predictions"]
    worst = max(np.abs(np.array(entry["probabilities"]) - expected[cid]).max() for cid, entry in zip(ids, got,
                                                                                                   strict=True))
    assert worst <= 1e-6 and all(len(entry["probabilities"]) == 3 for entry in got)
