"""`HttpsPeer`: the `Peer` of a party whose partner is another process, over mutually authenticated HTTPS.

Each side is both a server and a client: its own uvicorn server (a background thread) receives what the
peer sends into an inbox, and a keep-alive httpx client POSTs what it sends to the peer's server. So a
training step costs one POST each way on an already open TLS connection, and `receive` is a wait on the
inbox. Messages carry a per-kind `seq` so that resends after lost acknowledgements apply exactly once.

httpx, ssl and msgpack errors are translated here into the PeerError / TlsError / ProtocolError tree.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

import httpx
import torch

from vfl_cli.errors import (
    PeerAborted,
    PeerError,
    PeerRefused,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    TlsError,
)
from vfl_cli.job import JobSpec, Role
from vfl_cli.peer import KINDS, BatchKey, Hello, Kind, Peer
from vfl_cli.transport.codec import (
    MAX_REASON_CHARS,
    AbortMessage,
    HelloMessage,
    TensorMessage,
    encode,
    printable,
)
from vfl_cli.transport.inbox import Inbox
from vfl_cli.transport.server import RECEIVES, ServerThread, create_app
from vfl_cli.transport.tls import client_ssl_context, common_name_of_der, server_ssl_context

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.05  # first pause before a resend; doubles per attempt
BACKOFF_MAX_S = 2.0
ABORT_TIMEOUT_S = 2.0  # abort is a courtesy on the way out: never hold the exit up for long


class HttpsPeer(Peer):
    """The other party across the network. Starts this party's server at once; `close()` stops it."""

    def __init__(self, job: JobSpec, role: Role) -> None:
        self._job = job
        self._role = role
        self._peer = job.party(job.peer_role(role))
        self._fingerprint = job.fingerprint()
        self._seq: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._inbox = Inbox()
        self.bytes_sent = 0  # request body bytes of every delivered message

        me = job.party(role)
        if job.tls.enabled:
            server_context: ssl.SSLContext | None = server_ssl_context(job, role)
            client_context: ssl.SSLContext | bool = client_ssl_context(job, role)
            scheme = "https"
        else:
            log.warning("tls.enabled is false: tensors travel unencrypted and unauthenticated (plain HTTP)")
            server_context, client_context, scheme = None, False, "http"
        self.url = f"{scheme}://{self._peer.listen}"

        # Idle connections must outlive the longest wait between two steps, or every step reconnects.
        keep_alive_s = max(60.0, 2 * job.transport.timeout_s)
        self._server = ServerThread(
            create_app(self._inbox, job, role),
            me.host,
            me.port,
            server_context,
            keep_alive_s=keep_alive_s + 30,
        )
        self._server.start()
        transport = httpx.HTTPTransport(
            verify=client_context,
            limits=httpx.Limits(
                max_connections=4, max_keepalive_connections=2, keepalive_expiry=keep_alive_s
            ),
            # h11 writes headers and body separately; without TCP_NODELAY, Nagle's algorithm meets the
            # server's delayed ACK and every request waits ~40 ms.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        self._client = httpx.Client(
            base_url=self.url,
            transport=transport,
            headers={"content-type": "application/msgpack"},
            trust_env=False,  # a proxy from the environment must never see (or break) peer traffic
        )
        log.info("%s %s listening on %s, peer %s at %s", role, me.name, me.listen, self._peer.name, self.url)

    # --------------------------------------------------------------------------------------------- Peer API

    def handshake(self, mine: Hello) -> Hello:
        """POST our Hello until the peer's server answers, then wait for the peer's Hello; each wait is
        bounded by `transport.connect_timeout_s`."""
        wait_s = self._job.transport.connect_timeout_s
        body = encode(HelloMessage(mine), self._fingerprint)
        self._post("/v1/hello", body, "our hello", time.monotonic() + wait_s, retries=None)
        self.bytes_sent += len(body)
        theirs = self._inbox.wait_hello(wait_s)
        if theirs is None:
            raise PeerTimeout(f"{self._peer.name} at {self.url} is up but sent no hello within {wait_s:g} s")
        if theirs.name != self._peer.name:
            raise ProtocolError(f"hello from {theirs.name!r}, but the job's peer is {self._peer.name!r}")
        return theirs

    def send(self, kind: Kind, key: BatchKey, tensors: dict[str, torch.Tensor]) -> None:
        if kind == RECEIVES[self._role]:
            raise ValueError(f"the {self._role} receives {kind}, it does not send them")
        if self._inbox.aborted is not None:  # the peer is gone: say why, rather than "unreachable" later
            raise PeerAborted(f"the peer stopped: {self._inbox.aborted}")
        self._seq[kind] += 1
        body = encode(TensorMessage(kind, key, self._seq[kind], tensors), self._fingerprint)
        deadline = time.monotonic() + self._job.transport.timeout_s
        try:
            self._post(
                "/v1/tensors", body, f"{kind} for {key}", deadline, retries=self._job.transport.retries
            )
        except PeerRefused:
            self._seq[kind] -= 1  # refused means not applied: the next message may use this seq
            raise
        # After other failures the seq stays used: the message may have arrived, and reusing its seq
        # would make the peer drop the next message as a duplicate.
        self.bytes_sent += len(body)

    def receive(self, kind: Kind, key: BatchKey) -> dict[str, torch.Tensor]:
        if kind != RECEIVES[self._role]:
            raise ValueError(f"the {self._role} never receives {kind}")
        timeout_s = self._job.transport.timeout_s
        message = self._inbox.next_tensors(kind, timeout_s)
        if message is None:
            raise PeerTimeout(
                f"no {kind} for {key} from {self._peer.name} within {timeout_s:g} s; "
                "is the peer still running?"
            )
        if message.key != key:
            raise ProtocolError(f"expected {kind} for {key}, got {kind} for {message.key}")
        return message.tensors

    def abort(self, reason: str) -> None:
        try:
            body = encode(AbortMessage(printable(reason)[:MAX_REASON_CHARS]), self._fingerprint)
            self._client.post("/v1/abort", content=body, timeout=ABORT_TIMEOUT_S)
        except Exception as exc:  # best effort by contract: we are already failing
            log.info("could not tell %s that we stopped: %s", self._peer.name, exc)

    def close(self) -> None:
        self._client.close()
        self._server.stop()

    @property
    def bytes_received(self) -> int:
        """Request body bytes of every message the peer delivered to us."""
        return self._inbox.bytes_received

    # ------------------------------------------------------------------------------------------------- HTTP

    def _post(
        self, path: str, body: bytes, what: str, deadline: float, retries: int | None
    ) -> httpx.Response:
        """POST with resends on connection errors and 5xx (at most `retries`, None = until `deadline`)."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            failure: Exception | None = None
            try:
                response = self._client.post(
                    path, content=body, timeout=max(deadline - time.monotonic(), 0.1)
                )
            except httpx.TransportError as exc:
                _raise_if_tls_failure(exc, self.url)
                failure, problem = exc, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code < 400:
                    self._check_server_name(response)
                    return response
                reason = _reason(response)
                if response.status_code < 500:
                    raise PeerRefused(
                        f"{self._peer.name} refused {what}: {reason} (HTTP {response.status_code})"
                    )
                problem = f"HTTP {response.status_code}: {reason}"
            pause = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
            if (retries is not None and attempt > retries) or time.monotonic() + pause >= deadline:
                elapsed = time.monotonic() - started
                message = (
                    f"cannot deliver {what} to {self._peer.name} at {self.url} "
                    f"({attempt} attempts in {elapsed:.1f} s): {problem}"
                )
                if failure is None:
                    raise PeerError(message)
                if isinstance(failure, httpx.RemoteProtocolError) and self._job.tls.enabled:
                    # With TLS 1.3 a server that rejects our certificate just hangs up after the handshake.
                    message += " (if the peer is running, does it trust our certificate's CA?)"
                raise PeerUnreachable(message) from failure
            log.debug("resending %s to %s in %.2f s: %s", what, self.url, pause, problem)
            time.sleep(pause)

    def _check_server_name(self, response: httpx.Response) -> None:
        """The server's certificate must name the peer party, not just come from the job's CA."""
        if not self._job.tls.enabled:
            return
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        # Positional True: httpcore may hand us an _ssl._SSLSocket, whose getpeercert takes no keywords.
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        name = common_name_of_der(der) if der else None
        if name != self._peer.name:
            raise TlsError(f"the server at {self.url} is {name!r}, not the job's peer {self._peer.name!r}")


def _reason(response: httpx.Response) -> str:
    """The `{"error": reason}` of a refusal, made safe for a terminal."""
    try:
        reason = response.json().get("error")
    except (ValueError, AttributeError):
        reason = None
    return printable(str(reason or response.text[:200] or response.reason_phrase))[:MAX_REASON_CHARS]


def _raise_if_tls_failure(exc: httpx.TransportError, url: str) -> None:
    """Certificate problems do not heal with retries: stop at once with a TlsError."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise TlsError(
                f"the server at {url} failed certificate verification: {cause.verify_message}"
            ) from exc
        if isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or "").upper():
            raise TlsError(f"the server at {url} refused our certificate: {cause.reason}") from exc
        cause = cause.__cause__ or cause.__context__
