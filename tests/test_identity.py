"""Identity before payload: a server that holds a certificate from the job's CA, valid for the peer's host,
but not for the peer's party name, receives nothing at all: no request line, no header, no tensor byte."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import write_job, write_planted_data
from tests.test_transport import LEADER_ENV, LEADER_PASSWORD, build_job, certs, cut, hello  # noqa: F401
from tests.test_two_party import VFL, environment, tls_job
from vfl_cli.errors import TlsError
from vfl_cli.job import JobSpec
from vfl_cli.party import PartyContext
from vfl_cli.protocol import BatchKey
from vfl_cli.transport.https_grid import HttpsGrid
from vfl_cli.transport.inbox import Inbox
from vfl_cli.transport.listener import ServerThread
from vfl_cli.transport.server import create_app
from vfl_cli.transport.tls import server_ssl_context


class AccessLog:
    """ASGI middleware that records every request that reaches the app: the impostor's access log."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def start_impostor(job: JobSpec) -> tuple[ServerThread, Inbox, AccessLog]:
    """A real vfl server on the leader's port, holding the follower's certificate (same CA, SAN 127.0.0.1)."""
    inbox = Inbox()
    access = AccessLog(create_app(inbox, PartyContext.of(job, "leader")))
    server = ServerThread(access, "127.0.0.1", job.leader.port, server_ssl_context(job, "follower"))  # type: ignore[arg-type]
    server.start()
    return server, inbox, access


@pytest.fixture
def impostor(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JobSpec, Inbox, AccessLog]]:  # noqa: F811
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs)
    server, inbox, access = start_impostor(job)
    try:
        yield job, inbox, access
    finally:
        server.stop()


def test_impostor_with_a_same_ca_certificate_receives_nothing(impostor: tuple[JobSpec, Inbox, AccessLog]) -> None:
    job, inbox, access = impostor
    with HttpsGrid(PartyContext.of(job, "follower")) as follower:
        with pytest.raises(TlsError, match=r"is not the job's peer 'alice': it presented certificate CN 'bob'"):
            follower.handshake(hello(job, "follower"), lambda theirs: hello(job, "follower"))
        with pytest.raises(TlsError, match="nothing was sent to it"):
            follower.send("leader", "embeddings", BatchKey("train", 0, 0), cut(4, fill=7.0))
    assert access.requests == []
    assert inbox.bytes_received == 0 and inbox.wait_hello("bob", 0) is None


def test_raw_impostor_reads_no_application_byte(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Below HTTP: a bare TLS server with the wrong party's certificate records every byte it can decrypt."""
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs)
    context = server_ssl_context(job, "follower")
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", job.leader.port))
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():  # the client's attempt, then its second look at the certificate
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            with raw:
                raw.settimeout(5)
                try:
                    with context.wrap_socket(raw, server_side=True) as secured:
                        while chunk := secured.recv(65536):
                            received.append(chunk)
                except (OSError, ssl.SSLError):
                    pass  # the client aborts the handshake: exactly what should happen

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with HttpsGrid(PartyContext.of(job, "follower")) as follower, pytest.raises(TlsError, match="CN 'bob'"):
            follower.send("leader", "embeddings", BatchKey("train", 0, 0), {"wide": torch.full((4, 1), 7.0),
                                                                   "deep": torch.full((4, 1), 7.0)})
    finally:
        done.set()
        thread.join(10)
        listener.close()
    assert received == []


def test_cli_against_an_impostor_exits_7_with_one_line(tmp_path: Path) -> None:
    spec = tls_job(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]), rows=300)
    job_path = write_job(tmp_path, spec)
    made = subprocess.run([*VFL, "certs", "--job", str(job_path)], capture_output=True, env=environment())
    assert made.returncode == 0
    # The impostor: a leader server that holds the follower's certificate.
    from vfl_cli.job import load_job

    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment().items():
            patch.setenv(name, value)
        server, inbox, access = start_impostor(load_job(job_path))
    try:
        result = subprocess.run([*VFL, "train", "--role", "follower", "--job", str(job_path)], capture_output=True,
                                text=True, env=environment(), timeout=120)
    finally:
        server.stop()
    assert result.returncode == 7, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "certificate CN 'follower'" in errors[0] and "not the job's peer 'leader'" in errors[0]
    assert access.requests == [] and inbox.bytes_received == 0
