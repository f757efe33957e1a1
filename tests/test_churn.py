"""Connection churn against a real party server on 127.0.0.1 with mutual TLS: while thousands of bare TCP
connections come and go, or dozens of connections send garbage at once (random bytes, or a TLS record
header that never completes), every new connection of the real peer (the follower's certificate, a fresh
TLS handshake per request) gets its request answered; and a client that is silent for a while is still
served, or closed when the server stops.

Before the gate ranked connections by their first bytes, it dropped simply the oldest pending handshake to
make room, and a burst of connections accepted at once pushed the peer's handshake out (ConnectError, or a
RemoteProtocolError once TLS 1.3 had let the client send its request)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_connections import authenticated, bare, closed_within
from tests.test_transport import (  # noqa: F401 - certs is a fixture
    LEADER_ENV,
    LEADER_PASSWORD,
    build_job,
    certs,
    cut,
    follower_client,
    party_server,
    tensor_body,
)
from vfl_cli.job import JobSpec
from vfl_cli.protocol import BatchKey
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.inbox import Inbox

# The start of a 512-byte handshake record holding a ClientHello: what follows is 300 bytes, so it stalls.
TLS_RECORD_START = bytes.fromhex("160301 0200 01 0001fc")
CAP = 4  # transport.max_unauthenticated: small, so that a burst of arrivals exceeds it many times over
GARBAGE_CONNECTIONS = 50
MAX_REQUESTS = 400  # the peer's loop is bounded even if a flood were never to end

Server = tuple[JobSpec, Inbox, Telemetry]


@pytest.fixture
def server(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:  # noqa: F811
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs, read_timeout_s=5, max_unauthenticated=CAP, max_pending=MAX_REQUESTS)
    telemetry = Telemetry("leader")
    with party_server(job, "leader", telemetry) as inbox:
        yield job, inbox, telemetry


def churn(port: int, count: int, stop: threading.Event) -> None:
    """`count` bare TCP connections, each closed as soon as it is open (a refused or timed-out one counts too)."""
    for _ in range(count):
        if stop.is_set():
            return
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            continue


def garbage(port: int, prefix: bytes, stop: threading.Event) -> None:
    """One garbage connection at a time until `stop`: `prefix` and random bytes, wait up to 1 s for the server
    to hang up, again."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(prefix + os.urandom(300))
                sock.settimeout(1)
                sock.recv(100)
        except OSError:
            continue


def peer_requests(job: JobSpec, inbox: Inbox, going_on: Callable[[], bool], at_least: int) -> tuple[int, Counter[str]]:
    """The real peer's requests, each on a new TLS connection, while `going_on()` (and at least `at_least`);
    returns (requests made, failures by exception name)."""
    failures: Counter[str] = Counter()
    made = seq = 0
    while made < MAX_REQUESTS and (made < at_least or going_on()):
        made += 1
        body = tensor_body(job, seq=seq + 1, key=BatchKey("eval", 0, seq + 1), tensors=cut(4))
        try:
            with follower_client(job) as client:
                response = client.post("/v1/tensors", content=body)
        except Exception as exc:  # every way a request can fail is counted, none ends the loop
            failures[type(exc).__name__] += 1
            continue
        if response.status_code != 200:
            failures[f"HTTP {response.status_code}"] += 1
            continue
        seq += 1
        assert inbox.next_tensors("bob", "embeddings", 0) is not None
    return made, failures


def run_churn(server: Server, flood: int) -> tuple[int, Counter[str]]:
    """`flood` bare connections from two threads while the peer keeps making requests."""
    job, inbox, _ = server
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(job.leader.port, flood // 2, stop)) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        return peer_requests(job, inbox, lambda: any(t.is_alive() for t in threads), at_least=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def test_peer_connects_through_a_churn_of_3000_bare_connections(server: Server) -> None:
    made, failures = run_churn(server, 3_000)
    assert not failures, f"{sum(failures.values())} of {made} requests failed: {dict(failures)}"
    assert server[2].value("vfl_refusals_total", reason="hung_up") > 0  # the flood did reach the gate


@pytest.mark.slow
def test_peer_connects_through_a_churn_of_10000_bare_connections(server: Server) -> None:
    made, failures = run_churn(server, 10_000)
    assert not failures, f"{sum(failures.values())} of {made} requests failed: {dict(failures)}"


@pytest.mark.parametrize("prefix", [b"", TLS_RECORD_START], ids=["random", "stalled-client-hello"])
def test_garbage_on_50_connections_at_once_fails_none_of_the_peers_requests(server: Server, prefix: bytes) -> None:
    job, inbox, telemetry = server
    stop = threading.Event()
    threads = [threading.Thread(target=garbage, args=(job.leader.port, prefix, stop))
               for _ in range(GARBAGE_CONNECTIONS)]
    for thread in threads:
        thread.start()
    try:
        made, failures = peer_requests(job, inbox, lambda: False, at_least=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, f"{sum(failures.values())} of {made} requests failed: {dict(failures)}"
    # The garbage did reach the gate: refused at once, or (a record start that may be TLS) dropped for room.
    assert telemetry.value("vfl_refusals_total", reason="not_tls" if not prefix else "connection_cap") > CAP


def test_client_silent_for_a_while_is_served_once_it_speaks(server: Server) -> None:
    job, _, _ = server
    with bare(job) as sock:
        time.sleep(0.3)  # the gate watches it meanwhile: no TLS yet, nothing read
        with authenticated(job, sock) as tls:
            tls.sendall(f"GET /v1/health HTTP/1.1\r\nhost: {job.leader.name}\r\n\r\n".encode())
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")


def test_silent_connections_are_closed_when_the_server_stops(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv(LEADER_ENV, LEADER_PASSWORD)
    job = build_job(certs, read_timeout_s=30)
    with party_server(job, "leader"):
        sockets = [bare(job) for _ in range(3)]
        time.sleep(0.3)  # accepted and watched
    try:  # the duplicate descriptors the gate watched must not keep them open
        assert all(closed_within(sock, 3) is not None for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
