"""Each party's HTTPS server: the FastAPI app that checks every message and hands it to the inbox, and the
background thread that runs it under uvicorn inside the party's process.

Routes (all under /v1, all answered with JSON; refusals are `{"error": reason}` and apply nothing):
    POST /v1/hello     the peer's Hello
    POST /v1/tensors   one batch of cut-layer tensors: the leader takes "embeddings", the follower "gradients"
    POST /v1/abort     the peer stopped, with a reason
    GET  /v1/health    liveness

Who may call: with TLS on, uvicorn requires a client certificate from the job's CA during the handshake,
and every request must come from a certificate whose CN is the peer party's name (else 403). uvicorn does
not show the client certificate to the app, so `TlsScopeH11Protocol` puts it into the request scope as the
ASGI TLS extension (`scope["extensions"]["tls"]["client_cert_chain"]`) once per connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any

import torch
import uvicorn
from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from vfl_cli.errors import PeerError, ProtocolError
from vfl_cli.job import JobSpec, Role
from vfl_cli.peer import CUT_TENSORS, Kind
from vfl_cli.transport.codec import AbortMessage, HelloMessage, Message, TensorMessage, decode
from vfl_cli.transport.inbox import Inbox, SeqConflict
from vfl_cli.transport.tls import peer_common_name

log = logging.getLogger(__name__)

RECEIVES: dict[Role, Kind] = {"leader": "embeddings", "follower": "gradients"}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Refusal(Exception):
    """A request we do not apply: answered with `status` and `{"error": reason}`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -------------------------------------------------------------------------------------------------- the app


def create_app(inbox: Inbox, job: JobSpec, role: Role) -> FastAPI:
    """The FastAPI app of party `role`: every accepted message goes to `inbox`, nothing else changes state."""
    peer_role = job.peer_role(role)
    peer_name = job.party(peer_role).name
    fingerprint = job.fingerprint()
    accepts = RECEIVES[role]
    limit = job.transport.max_body_bytes

    async def authenticate(request: Request) -> None:
        if not job.tls.enabled:
            return
        name = client_common_name(request.scope)
        if name != peer_name:
            seen = "no client certificate" if name is None else f"certificate CN {name!r}"
            raise Refusal(403, f"{seen}; this {role} only talks to {peer_name!r}")

    async def read_message(request: Request) -> tuple[str, Message, int]:
        body = await read_body(request, limit)
        try:
            job_of_message, message = decode(body)
        except ProtocolError as exc:
            raise Refusal(400, str(exc)) from exc
        return job_of_message, message, len(body)

    router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @router.post("/hello")
    async def hello(request: Request) -> dict[str, str]:
        """The peer announces itself; the job fingerprint is compared by the handshake, not here."""
        _, message, size = await read_message(request)
        if not isinstance(message, HelloMessage):
            raise Refusal(400, f"expected a hello message, got {type(message).__name__}")
        if message.hello.role != peer_role:
            raise Refusal(400, f"hello from a {message.hello.role!r}: this {role} expects a {peer_role}")
        inbox.put_hello(message.hello, size)
        return {"status": "ok"}

    @router.post("/tensors")
    async def tensors(request: Request) -> dict[str, str]:
        """One batch of cut-layer tensors, applied exactly once per kind and seq."""
        job_of_message, message, size = await read_message(request)
        if not isinstance(message, TensorMessage):
            raise Refusal(400, f"expected a tensors message, got {type(message).__name__}")
        if job_of_message != fingerprint:
            raise Refusal(409, f"job fingerprint {job_of_message} differs from this side's {fingerprint}")
        if message.kind != accepts:
            raise Refusal(400, f"this {role} receives {accepts}, not {message.kind}")
        try:
            check_cut_tensors(message.tensors, job.train.batch_size)
            status = inbox.offer(message, size)
        except ProtocolError as exc:
            raise Refusal(400, str(exc)) from exc
        except SeqConflict as exc:
            raise Refusal(409, str(exc)) from exc
        return {"status": status}

    @router.post("/abort")
    async def abort(request: Request) -> dict[str, str]:
        """The peer stopped; any waiting receive wakes up with its reason."""
        _, message, size = await read_message(request)
        if not isinstance(message, AbortMessage):
            raise Refusal(400, f"expected an abort message, got {type(message).__name__}")
        log.warning("%s aborted: %s", peer_name, message.reason)
        inbox.put_abort(message.reason, size)
        return {"status": "ok"}

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness, and who answers."""
        return {"status": "ok", "role": role, "name": job.party(role).name}

    app = FastAPI(title=f"vfl {role}", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    app.add_exception_handler(Refusal, _refusal_response)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error_response)
    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refusal(400, "malformed Content-Length")
        if int(declared) > limit:
            raise Refusal(413, f"body of {int(declared)} bytes exceeds transport.max_body_bytes = {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():  # counted as it streams: chunked bodies declare no length
            body += chunk
            if len(body) > limit:
                raise Refusal(413, f"body exceeds transport.max_body_bytes = {limit}")
    except ClientDisconnect as exc:  # the peer died mid-upload: drop the half message, no traceback
        raise Refusal(400, "the peer disconnected before the body was complete") from exc
    return bytes(body)


def check_cut_tensors(tensors: dict[str, torch.Tensor], max_batch: int) -> None:
    """Exactly the cut-layer tensors, each float32 [B, 1] with the same 1 <= B <= batch size (finiteness is
    checked by the codec)."""
    if set(tensors) != set(CUT_TENSORS):
        got = ", ".join(sorted(name[:40] for name in tensors)) or "none"
        raise ProtocolError(f"tensors: expected exactly {', '.join(CUT_TENSORS)}; got {got}")
    batch = None
    for name in CUT_TENSORS:
        tensor = tensors[name]
        if tensor.dtype != torch.float32:
            raise ProtocolError(
                f"tensors.{name}: dtype {str(tensor.dtype).removeprefix('torch.')}, expected float32"
            )
        if tensor.dim() != 2 or tensor.shape[1] != 1:
            raise ProtocolError(f"tensors.{name}: shape {list(tensor.shape)}, expected [B, 1]")
        if not 1 <= tensor.shape[0] <= max_batch:
            raise ProtocolError(f"tensors.{name}: batch of {tensor.shape[0]}, expected 1..{max_batch}")
        if batch is not None and tensor.shape[0] != batch:
            raise ProtocolError(f"tensors: batch sizes differ ({batch} and {tensor.shape[0]})")
        batch = tensor.shape[0]


def client_common_name(scope: Scope) -> str | None:
    """CN of the client certificate that `TlsScopeH11Protocol` put into the scope, or None."""
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return _common_name_of_pem(chain[0]) if chain else None


@lru_cache(maxsize=64)
def _common_name_of_pem(pem: str) -> str | None:
    try:
        return peer_common_name(x509.load_pem_x509_certificate(pem.encode()))
    except ValueError:
        return None


async def _refusal_response(request: Request, exc: Refusal) -> JSONResponse:
    log.info("refused %s %s: %s %s", request.method, request.url.path, exc.status, exc.reason)
    # The body may be unread (413, 403): closing the connection keeps the next request's framing sane.
    headers = {"connection": "close"} if exc.status in (403, 413) else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def _http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


async def _internal_error_response(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error (see the party's log)"}, status_code=500)


# -------------------------------------------------------------------------------------------------- uvicorn


class TlsScopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the ASGI TLS extension in every request's scope.

    The TLS handshake (with the client certificate verified against the CA) is complete when asyncio calls
    `connection_made`, so the certificate is read once per connection and every request on it carries it.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
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

    def shutdown(self) -> None:
        # An idle keep-alive connection belongs to the peer's client, which is not reading: a TLS close
        # would wait for its close_notify until the graceful-shutdown timeout. Drop it at once instead.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            super().shutdown()


class ServerThread:
    """A uvicorn server on a background thread of this process: `start()` returns once it accepts connections,
    `stop()` once it has shut down."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        keep_alive_s: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app,
            http=TlsScopeH11Protocol,
            loop="asyncio",
            lifespan="off",
            log_config=None,  # leave logging to the CLI's configuration
            access_log=False,
            server_header=False,
            # uvicorn's default 5 s would drop the connection between slow training steps.
            timeout_keep_alive=int(keep_alive_s),
            timeout_graceful_shutdown=2,
            ssl_context_factory=(lambda _config, _default: ssl_context) if ssl_context is not None else None,
        )
        self._server = uvicorn.Server(self._config)
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
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
