"""The fault proxy over real sockets on 127.0.0.1: relays faithfully, and drops, delays and cuts as configured."""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import DROP_WITHIN_BYTES, FaultProxy, main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5.0  # any socket wait; a hang fails the test instead of stalling the suite


class _Backend(socketserver.ThreadingTCPServer):
    """A real server on 127.0.0.1:0 that echoes (or only swallows) what it reads and records it per connection."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.lock = threading.Lock()
        self.received: list[bytes] = []  # what each finished connection delivered, in finishing order
        super().__init__(("127.0.0.1", 0), _BackendHandler)

    @property
    def target(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.server_address[1])

    def finished(self) -> list[bytes]:
        with self.lock:
            return list(self.received)


class _BackendHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Backend)
        self.request.settimeout(TIMEOUT_S)
        got = bytearray()
        with contextlib.suppress(OSError):  # the proxy resets connections on purpose
            while chunk := self.request.recv(65536):
                got += chunk
                if server.echo:
                    self.request.sendall(chunk)
        with server.lock:
            server.received.append(bytes(got))


@contextlib.contextmanager
def _serving(backend: _Backend) -> Iterator[_Backend]:
    thread = threading.Thread(target=backend.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        backend.shutdown()
        backend.server_close()  # joins the handler threads
        thread.join(TIMEOUT_S)


@pytest.fixture
def echo() -> Iterator[_Backend]:
    with _serving(_Backend(echo=True)) as backend:
        yield backend


@pytest.fixture
def sink() -> Iterator[_Backend]:
    with _serving(_Backend(echo=False)) as backend:
        yield backend


@pytest.fixture(autouse=True)
def no_asyncio_complaints(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Leaked tasks and transports are logged by asyncio, not warned, so filterwarnings=error would miss them."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    gc.collect()
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]  # .records: this phase
    assert [r.getMessage() for r in records if r.name == "asyncio"] == []


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)


def _recv_up_to(sock: socket.socket, n: int) -> bytes:
    """Read until n bytes, EOF or a reset; fewer than n bytes means the connection ended first."""
    got = bytearray()
    with contextlib.suppress(ConnectionError):
        while len(got) < n:
            chunk = sock.recv(n - len(got))
            if not chunk:
                break
            got += chunk
    return bytes(got)


def _exchange(port: int, payload: bytes) -> bytes:
    """Send payload on a fresh connection and read back as much of its echo as arrives (b"" if refused)."""
    try:
        sock = _connect(port)  # a drop at accept can reset us before connect() even returns
    except ConnectionError:
        return b""
    with sock:
        with contextlib.suppress(ConnectionError):  # a drop may reset us while still sending
            sock.sendall(payload)
        return _recv_up_to(sock, len(payload))


def _eventually(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_relays_bytes_unchanged_both_ways(echo: _Backend) -> None:
    payload = random.Random(1).randbytes(64 * 1024)
    with FaultProxy(echo.target) as proxy, _connect(proxy.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the half-close travels through the proxy; the echo server then closes
        assert _recv_up_to(sock, len(payload) + 1) == payload
        stats = proxy.stats()
    assert (stats.accepted, stats.dropped, stats.cut) == (1, 0, 0)
    assert stats.bytes_to_server == stats.bytes_to_client == len(payload)


def test_delay_applies_in_each_direction_and_keeps_order(echo: _Backend) -> None:
    with FaultProxy(echo.target, delay_s=0.05) as proxy, _connect(proxy.port) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert _recv_up_to(sock, 4) == b"ping"
        assert time.monotonic() - start >= 0.095  # 50 ms there, 50 ms back; lower bound only

        messages = [f"<{i}>".encode() for i in range(30)]
        for message in messages:
            sock.sendall(message)
        expected = b"".join(messages)
        assert _recv_up_to(sock, len(expected)) == expected


def test_drop_rate_one_closes_every_connection(echo: _Backend) -> None:
    payload = b"x" * (4 * DROP_WITHIN_BYTES)  # more than any mid-stream drop lets through
    with FaultProxy(echo.target, drop_rate=1.0, seed=0) as proxy:
        for _ in range(12):
            assert len(_exchange(proxy.port, payload)) < len(payload)
        _eventually(lambda: proxy.stats().dropped == 12)
        stats = proxy.stats()
    assert stats.accepted == 12
    assert stats.dropped_at_accept > 0 and stats.dropped_mid_stream > 0  # both kinds, fixed by the seed
    # A drop at accept never dials the target: only the mid-stream drops reached the server.
    _eventually(lambda: len(echo.finished()) == stats.dropped_mid_stream)
    assert stats.bytes_to_server < len(payload) * stats.dropped_mid_stream


def test_cut_rate_one_delivers_a_strict_prefix_then_closes(sink: _Backend) -> None:
    rng = random.Random(2)
    with FaultProxy(sink.target, cut_rate=1.0, seed=0) as proxy:
        for i in range(5):
            payload = rng.randbytes(32 * 1024)
            with _connect(proxy.port) as sock:
                sock.sendall(payload)
                assert _recv_up_to(sock, 1) == b""  # closed by the proxy (EOF or reset), not left hanging
            _eventually(lambda n=i + 1: len(sink.finished()) == n)  # type: ignore[misc]
            delivered = sink.finished()[i]
            assert len(delivered) < len(payload)
            assert delivered == payload[: len(delivered)]
        stats = proxy.stats()
    assert stats.cut == 5 and stats.dropped == 0
    assert stats.bytes_to_server == sum(len(d) for d in sink.finished())


def test_partial_drop_rate_lets_some_through(echo: _Backend) -> None:
    payload = b"y" * 1024
    with FaultProxy(echo.target, drop_rate=0.3, seed=7) as proxy:
        through = sum(_exchange(proxy.port, payload) == payload for _ in range(50))
        _eventually(lambda: proxy.stats().accepted == 50)
        stats = proxy.stats()
    assert 0 < through < 50
    assert stats.dropped == 50 - through


@pytest.mark.parametrize(
    ("target", "listen_host"),
    [
        (("10.0.0.1", 8701), "127.0.0.1"),
        (("0.0.0.0", 8701), "127.0.0.1"),
        (("localhost", 8701), "127.0.0.1"),  # names are refused too: they could resolve anywhere
        (("127.0.0.1", 8701), "0.0.0.0"),
    ],
)
def test_non_loopback_addresses_are_refused(target: tuple[str, int], listen_host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(target, listen_host=listen_host)


@pytest.mark.parametrize("kwargs", [{"drop_rate": 1.5}, {"cut_rate": -0.1}, {"delay_s": -1.0}, {"max_lifetime_s": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultProxy(("127.0.0.1", 8701), **kwargs)


def test_stop_is_idempotent_closes_connections_and_port(echo: _Backend) -> None:
    FaultProxy(echo.target).stop()  # never started: nothing to do
    proxy = FaultProxy(echo.target).start()
    port = proxy.port
    with _connect(port) as sock:
        sock.sendall(b"hello")
        assert _recv_up_to(sock, 5) == b"hello"
        proxy.stop()
        assert _recv_up_to(sock, 1) == b""  # the live connection was closed too
    proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        _connect(port).close()


def test_max_lifetime_stops_a_forgotten_proxy(echo: _Backend) -> None:
    proxy = FaultProxy(echo.target, max_lifetime_s=0.2).start()

    def refused() -> bool:
        try:
            _connect(proxy.port).close()
        except ConnectionRefusedError:
            return True
        return False

    _eventually(refused)
    proxy.stop()


def test_module_runs_by_hand_and_stops_after_seconds(echo: _Backend) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [sys.executable, "-m", "tests.faultproxy", "--listen", f"127.0.0.1:{port}",
               "--target", f"127.0.0.1:{echo.target[1]}", "--delay", "0.01", "--seconds", "1.5"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        _eventually(lambda: _exchange(port, b"over the wire") == b"over the wire")  # b"" until it listens
        out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "accepted=1 " in out and "dropped=0" in out


def test_module_refuses_a_non_loopback_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "192.0.2.1:8701", "--seconds", "1"])
    assert exit_info.value.code == 2
    assert "loopback" in capsys.readouterr().err
