"""Connections: how a party's server accepts them, proves who is on the other end, and drops the ones that
waste it. The app behind (routes, messages) lives in `server.py`; this module never looks at a body.

    TCP accept ──> GatedConnection: admitted by `gate.py` (dropped at once if it hung up or opens with
                   no TLS record; at most max_unauthenticated pending, a flood's connections are
                   dropped first to make room), then its TLS handshake within read_timeout_s
               ──> PartyH11Protocol (uvicorn's h11): the client certificate in the ASGI scope; each
                   request's headers and body must arrive within read_timeout_s, and a connection idle
                   for longer is closed

uvicorn gets a plain TCP socket and `GatedConnection` as its protocol class; the TLS handshake is ours
(`loop.start_tls`), because uvicorn gives neither a handshake timeout nor a cap on pending handshakes.
Refused and dropped connections are logged one line each at most, rate-limited, never a traceback.

uvicorn is pinned to a tested minor in pyproject.toml: `PartyH11Protocol` reads its private fields
(`cycle`, `loop`, `transport`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from vfl_cli.errors import PeerError
from vfl_cli.transport.gate import ConnectionGate, OnRefusal, address

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class GatedConnection(asyncio.Protocol):
    """One accepted TCP connection until its TLS handshake is done; then it hands over to `PartyH11Protocol`.

    Data that arrives between the end of the handshake and the handover (TLS 1.3 lets a client send its
    request right behind its Finished message) is buffered and passed on, so nothing is lost or reordered.
    """

    def __init__(self, gate: ConnectionGate, **h11_arguments: Any) -> None:
        self._gate = gate
        self._h11_arguments = h11_arguments
        self._buffer: list[bytes] = []
        self._lost: tuple[Exception | None] | None = None
        self._http: PartyH11Protocol | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # raw TCP
        gate = self._gate
        if gate.ssl_context is None:
            self._hand_over(transport)
            return
        loop = asyncio.get_running_loop()
        # Our own deadline rather than asyncio's (which stays as a backstop): it counts the refusal before it
        # closes the connection, so whoever sees the close also sees the count. It runs from the accept on.
        self._deadline = loop.call_later(
            gate.read_timeout_s, gate.handshake_too_slow, transport, transport.get_extra_info("peername")
        )
        gate.admit(transport, lambda: self._begin_tls(transport))

    def _begin_tls(self, raw: asyncio.Transport) -> None:
        self._handshake = asyncio.get_running_loop().create_task(self._start_tls(raw))

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        gate = self._gate
        assert gate.ssl_context is not None
        peer = raw.get_extra_info("peername")
        try:
            secured = await asyncio.get_running_loop().start_tls(
                raw, self, gate.ssl_context, server_side=True, ssl_handshake_timeout=gate.read_timeout_s + 5
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            if raw in gate.pending:  # else dropped by the cap or the deadline, and counted there
                gate.refuse("tls_handshake", "refused a connection from %s: TLS handshake failed: %s",
                            address(peer), _one_line(exc))
            raw.abort()
            return
        except asyncio.CancelledError:  # the server is shutting down
            raw.abort()
            raise
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            gate.release(raw)
        if secured is None:  # the peer went away as the handshake finished
            return
        self._hand_over(secured)

    def _hand_over(self, transport: asyncio.Transport) -> None:
        http = PartyH11Protocol(self._gate, **self._h11_arguments)
        self._http = http
        http.connection_made(transport)
        transport.set_protocol(http)
        for data in self._buffer:
            http.data_received(data)
        self._buffer.clear()
        if self._lost is not None:
            http.connection_lost(self._lost[0])

    # Between the end of the handshake and the handover, the TLS layer talks to us:
    def data_received(self, data: bytes) -> None:
        if self._http is not None:
            self._http.data_received(data)
        else:
            self._buffer.append(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._http is not None:
            self._http.connection_lost(exc)
        else:
            self._lost = (exc,)
            if self._deadline is not None:  # dropped before its handshake began: the deadline has no work
                self._deadline.cancel()


class PartyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the client certificate in every request's scope (the ASGI TLS extension,
    which uvicorn does not fill in) and a read deadline per request."""

    def __init__(self, gate: ConnectionGate, **arguments: Any) -> None:
        super().__init__(**arguments)
        self._gate = gate
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_deadline()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        der = ssl_object.getpeercert(binary_form=True)
        tls = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": None,
            "cipher_suite": None,
        }
        inner: ASGIApp = self.app

        async def app_with_tls(scope: Scope, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = tls
            await inner(scope, receive, send)

        self.app = app_with_tls

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_read_deadline()  # the next request's clock starts now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
        self._read_deadline = self.loop.call_later(self._gate.read_timeout_s, self._read_deadline_passed)

    def _read_deadline_passed(self) -> None:
        request_read = self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body
        if request_read or self.transport.is_closing():
            return  # the app is working on a complete request: its answer re-arms the deadline
        self._gate.refuse("read_timeout", "closed a connection from %s: no complete request within "
                          "transport.read_timeout_s = %g s", address(self.client), self._gate.read_timeout_s)
        self.transport.abort()

    def shutdown(self) -> None:
        # An idle keep-alive connection belongs to the peer's client, which is not reading: a TLS close
        # would wait for its close_notify until the graceful-shutdown timeout. Drop it at once instead.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            super().shutdown()


class _Server(uvicorn.Server):
    """uvicorn's server with one-line, rate-limited reports of event-loop errors (an accept loop out of file
    descriptors would otherwise print a traceback per attempt)."""

    def __init__(self, config: uvicorn.Config, gate: ConnectionGate) -> None:
        super().__init__(config)
        self._gate = gate

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        try:
            await super().serve(sockets)
        finally:
            self._gate.abort_pending()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        detail = _one_line(exception) if exception is not None else ""
        self._gate.refused.warning("loop", "server: %s%s", context.get("message", "error"),
                                   f": {detail}" if detail else "")


class ServerThread:
    """A uvicorn server on a background thread of this process: `start()` returns once it accepts connections,
    `stop()` once it has shut down."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        read_timeout_s: float = 30.0,
        max_unauthenticated: int = 32,
        on_refusal: OnRefusal | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.gate = ConnectionGate(ssl_context, read_timeout_s, max_unauthenticated, on_refusal)
        config = uvicorn.Config(
            app,
            http=lambda **arguments: GatedConnection(self.gate, **arguments),  # type: ignore[arg-type]
            loop="asyncio",
            lifespan="off",
            log_config=None,  # leave logging to the CLI's configuration
            access_log=False,
            server_header=False,
            # Our read deadline closes idle connections; uvicorn's keep-alive timer is only a backstop.
            timeout_keep_alive=math.ceil(read_timeout_s) + 1,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config, self.gate)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        # Binding here, not in uvicorn, turns a taken port into an error in the caller's thread
        # (uvicorn would sys.exit inside its own).
        try:
            self._socket = _listening_socket(self.host, self.port)
        except OSError as exc:
            raise PeerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"vfl-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"the server on {self.host}:{self.port} did not start: {self._error or 'timeout'}"
                )
            time.sleep(0.01)

    def _run(self) -> None:
        assert self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # noqa: B036 - uvicorn reports startup failures with SystemExit
            self._error = exc
            log.error("server thread failed: %r", exc)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._server.started


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # Nagle's algorithm meets the client's delayed ACK and every response waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
