"""Each party's HTTPS app: the FastAPI routes that check every message and hand it to the inbox. How
connections are accepted, authenticated and timed out is `listener.py`'s business.

Routes (all under /v1, all answered with JSON; refusals are `{"error": reason}` and apply nothing):
    POST /v1/hello     the peer's Hello: opens a new session (the current Hello again is acknowledged; one
                       of an earlier session is refused with 409: a session is never re-opened)
    POST /v1/tensors   one message of the current session, of a kind this party receives, checked by
                       `vfl_cli.protocol.check_message` (the leader takes "embeddings", a follower
                       "gradients", "selection" and "psi_common", both the PSI kinds); 503 + Retry-After while
                       the inbox is full
    POST /v1/abort     the peer stopped, with a reason
    GET  /v1/health    liveness

Who may call: with TLS on, the listener requires a client certificate from the job's CA during the TLS
handshake, and every request must come from a certificate whose CN is one of this party's peers' names (the
leader's peers are the followers, a follower's the leader alone; else 403, with a reason that names no
party: any holder of a certificate from the CA could read it). That CN is the sender: its messages go to
its own place in the inbox and can never be taken as another peer's. Without TLS (debugging only) the
`x-vfl-party` header names the sender.
The listener puts that certificate into the request scope as the ASGI TLS extension
(`scope["extensions"]["tls"]["client_cert_chain"]`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any

from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vfl_cli.errors import ProtocolError
from vfl_cli.party import PartyContext
from vfl_cli.protocol import check_message
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.codec import AbortMessage, HelloMessage, Message, TensorMessage, decode
from vfl_cli.transport.inbox import Inbox, InboxFull, ReplayedHello, SeqConflict, WrongSession
from vfl_cli.transport.tls import peer_common_name

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 asks the sender to wait at most; it backs off from much shorter pauses
FORBIDDEN = "the client certificate is not the job's peer's"  # the whole 403 answer: it names nobody
SENDER_HEADER = "x-vfl-party"  # the sender's name, read only without TLS (with TLS its certificate says it)

Scope = MutableMapping[str, Any]


class Refusal(Exception):
    """A request we do not apply: answered with `status` and `{"error": reason}`; `code` is the short
    machine reason that the refusal counter is labelled with; `detail`, if any, goes to our log only."""

    def __init__(self, status: int, reason: str, code: str = "bad_message", detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code
        self.detail = detail


# -------------------------------------------------------------------------------------------------- the app


def create_app(inbox: Inbox, ctx: PartyContext, telemetry: Telemetry | None = None) -> FastAPI:
    """The FastAPI app of party `ctx.role`: every accepted message goes to `inbox`, nothing else changes state."""
    job, role = ctx.job, ctx.role
    telemetry = telemetry or Telemetry(role)
    fingerprint = job.fingerprint()
    limit = job.transport.max_body_bytes
    sender = peer_sender(ctx)

    async def read_message(request: Request) -> tuple[str, Message, int]:
        body = await read_body(request, limit)
        try:
            job_of_message, message = decode(body)
        except ProtocolError as exc:
            raise Refusal(400, str(exc)) from exc
        return job_of_message, message, len(body)

    router = APIRouter(prefix="/v1")
    # As a default, not an Annotated alias: with postponed annotations FastAPI resolves names in the module's
    # globals, where a local alias is not found.
    from_peer = Depends(sender)

    @router.post("/hello")
    async def hello(request: Request, name: str = from_peer) -> dict[str, str]:
        """A peer announces itself; the job fingerprint is compared by the handshake, not here."""
        _, message, size = await read_message(request)
        if not isinstance(message, HelloMessage):
            raise Refusal(400, f"expected a hello message, got {type(message).__name__}")
        key = ctx.peer_key(name)
        if message.hello.role != key or message.hello.name != name:
            raise Refusal(400, f"hello from {message.hello.role[:40]!r} {message.hello.name[:40]!r}: this {role} "
                          f"expects the {key} {name!r} on this certificate")
        try:
            inbox.put_hello(name, message.hello, size)
        except ReplayedHello as exc:
            raise Refusal(409, str(exc), "replayed_hello") from exc
        telemetry.received(str(key), "hello", size)
        return {"status": "ok"}

    @router.post("/tensors")
    async def tensors(request: Request, name: str = from_peer) -> dict[str, str]:
        """One batch of cut-layer tensors, applied exactly once per kind and seq."""
        job_of_message, message, size = await read_message(request)
        if not isinstance(message, TensorMessage):
            raise Refusal(400, f"expected a tensors message, got {type(message).__name__}")
        if job_of_message != fingerprint:
            raise Refusal(409, f"job fingerprint {job_of_message[:40]} differs from this side's {fingerprint}",
                          "wrong_job")
        try:
            check_message(ctx, message.kind, message.tensors)  # the kind's checks: `vfl_cli.protocol`
            status = inbox.offer(name, message, size)
        except ProtocolError as exc:
            raise Refusal(400, str(exc)) from exc
        except WrongSession as exc:
            raise Refusal(409, str(exc), "wrong_session") from exc
        except SeqConflict as exc:
            raise Refusal(409, str(exc), "sequence") from exc
        except InboxFull as exc:
            raise Refusal(503, str(exc), "busy") from exc
        telemetry.received(str(ctx.peer_key(name)), message.kind, size)
        return {"status": status}

    @router.post("/abort")
    async def abort(request: Request, name: str = from_peer) -> dict[str, str]:
        """The peer stopped; any waiting receive wakes up with its reason."""
        # The session is checked, the job fingerprint is not: a peer whose job differs from ours (the
        # handshake found it) must still be able to say that it stopped.
        _, message, size = await read_message(request)
        if not isinstance(message, AbortMessage):
            raise Refusal(400, f"expected an abort message, got {type(message).__name__}")
        try:
            inbox.put_abort(name, message, size)
        except WrongSession as exc:
            raise Refusal(409, str(exc), "wrong_session") from exc
        log.warning("%s aborted: %s", name, message.reason)
        return {"status": "ok"}

    @router.get("/health")
    async def health(name: str = from_peer) -> dict[str, str]:
        """Liveness, and who answers."""
        return {"status": "ok", "role": role, "name": ctx.name}

    app = FastAPI(title=f"vfl {role}", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    answer_refusals(app, telemetry.refused)
    return app


def peer_sender(ctx: PartyContext) -> Callable[[Request], Awaitable[str]]:
    """A FastAPI dependency: the name of the peer that sent this request, from its client certificate's CN (or,
    without TLS, the `x-vfl-party` header or the only peer); Refusal 403 for anyone who is not one of my peers."""
    only_peer = next(iter(ctx.peers.values())).name if len(ctx.peers) == 1 else None

    async def sender(request: Request) -> str:
        if ctx.job.tls.enabled:
            name = client_common_name(request.scope)
        else:  # nobody can tell who sends: the header says, or the only peer
            name = request.headers.get(SENDER_HEADER) or only_peer
        if name is None or ctx.peer_key(name) is None:
            # Any holder of a certificate from the job's CA gets this far: the answer names no party, our log does.
            seen = "no client certificate" if name is None else f"certificate CN {name[:64]!r}"
            names = [repr(peer.name) for peer in ctx.peers.values()]
            expected = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
            raise Refusal(403, FORBIDDEN, "forbidden", f"{seen}, expected {expected}")
        return name

    return sender


def answer_refusals(app: FastAPI, count: Callable[[str], None]) -> None:
    """Answer a Refusal with its status and `{"error": reason}` (counted by its code), any other HTTP error as
    JSON, and an internal error as a 500 that says only to look at the log."""

    async def refusal_response(request: Request, exc: Refusal) -> JSONResponse:
        count(exc.code)
        return _refusal_response(request, exc)

    app.add_exception_handler(Refusal, refusal_response)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error_response)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refusal(400, "malformed Content-Length")
        if int(declared) > limit:
            raise Refusal(413, f"body of {int(declared)} bytes exceeds transport.max_body_bytes = {limit}",
                          "too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():  # counted as it streams: chunked bodies declare no length
            body += chunk
            if len(body) > limit:
                raise Refusal(413, f"body exceeds transport.max_body_bytes = {limit}", "too_large")
    except ClientDisconnect as exc:  # the peer died mid-upload: drop the half message, no traceback
        raise Refusal(400, "the peer disconnected before the body was complete", "cut_body") from exc
    return bytes(body)


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


def _refusal_response(request: Request, exc: Refusal) -> JSONResponse:
    log.info("refused %s %s: %s %s%s", request.method, request.url.path, exc.status, exc.reason,
             f" ({exc.detail})" if exc.detail else "")
    # The body may be unread (413, 403): closing the connection keeps the next request's framing sane.
    headers = {"connection": "close"} if exc.status in (401, 403, 413) else {}
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if exc.status == 503:
        headers["retry-after"] = str(RETRY_AFTER_S)
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers or None)


async def _http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


async def _internal_error_response(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error (see the party's log)"}, status_code=500)
