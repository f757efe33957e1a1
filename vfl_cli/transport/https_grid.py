"""`HttpsGrid`: the `Grid` of a party whose peers are other processes, over mutually authenticated HTTPS.

Each party is both a server and a client: its own uvicorn server (a background thread) receives what its
peers send into an inbox (kept per sender), and one keep-alive httpx client per peer POSTs what it sends to
that peer's server. So a training step costs one POST each way per follower on an already open TLS
connection, and `receive` is a wait on the inbox. Messages carry the session id of the handshake and a
per-peer, per-kind `seq`, so that resends after lost acknowledgements apply exactly once and nothing of an
earlier process is ever applied.

Each peer's identity comes first: the client connects with that peer's party name as TLS server name and the
handshake fails unless the server's certificate (from the job's CA) carries that name, so no request body
is written to anyone else. A full inbox at the peer (503) is waited out; connection errors and other 5xx
are resent with backoff, at most `transport.retries` times.

httpx, ssl and msgpack errors are translated here into the PeerError / TlsError / ProtocolError tree.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from vfl_cli.errors import (
    PeerAborted,
    PeerError,
    PeerRefused,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    TlsError,
)
from vfl_cli.grid import Grid, leader_hello
from vfl_cli.job import PartySpec
from vfl_cli.party import PartyContext
from vfl_cli.protocol import KINDS, BatchKey, Hello, Kind, Reply, WireTensors, accepted_kinds
from vfl_cli.telemetry import Telemetry
from vfl_cli.transport.codec import (
    MAX_REASON_CHARS,
    AbortMessage,
    HelloMessage,
    TensorMessage,
    encode,
    printable,
)
from vfl_cli.transport.inbox import Inbox
from vfl_cli.transport.listener import ServerThread
from vfl_cli.transport.server import SENDER_HEADER, create_app
from vfl_cli.transport.tls import (
    CertificateSummary,
    client_ssl_context,
    describe_server_certificate,
    server_ssl_context,
)

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.05  # first pause before a resend; doubles per attempt
BACKOFF_MAX_S = 2.0
ABORT_TIMEOUT_S = 2.0  # abort is a courtesy on the way out: never hold the exit up for long
X509_V_ERR_HOSTNAME_MISMATCH = 62  # OpenSSL's verify code: a valid certificate, but for another name


class _Channel:
    """What this party holds for one peer: its spec, a keep-alive client to its server, our send sequences."""

    def __init__(self, key: str, spec: PartySpec, scheme: str, verify: ssl.SSLContext | bool, me: str,
                 read_timeout_s: float) -> None:
        self.key, self.spec, self.name = key, spec, spec.name
        self.url = f"{scheme}://{spec.connect_to}"
        self.seq: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        # The peer's server closes connections idle for read_timeout_s: let ours go well before that, so that a
        # request never races the server's close.
        self.client = peer_client(self.url, verify, me, 4, keepalive=2, keepalive_expiry_s=read_timeout_s / 2)


def peer_client(url: str, verify: ssl.SSLContext | bool, me: str, connections: int, keepalive: int | None = None,
                keepalive_expiry_s: float = 5.0) -> httpx.Client:
    """A keep-alive msgpack client to one peer's server at `url` (training's channel, serving's follower link)."""
    transport = httpx.HTTPTransport(
        verify=verify,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=keepalive or connections,
                            keepalive_expiry=keepalive_expiry_s),
        # h11 writes headers and body separately; without TCP_NODELAY, Nagle's algorithm meets the server's
        # delayed ACK and every request waits ~40 ms.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    return httpx.Client(
        base_url=url,
        transport=transport,
        # Who sends, for a server without TLS (debugging only); with TLS the certificate says it.
        headers={"content-type": "application/msgpack", SENDER_HEADER: me},
        trust_env=False,  # a proxy from the environment must never see (or break) peer traffic
    )


class HttpsGrid(Grid):
    """This party's peers across the network. Starts this party's server at once; `close()` stops it."""

    def __init__(self, ctx: PartyContext, telemetry: Telemetry | None = None) -> None:
        job, role, me = ctx.job, ctx.role, ctx.spec
        self._ctx = ctx
        self._job = job
        self._role = role
        self.peers, self.is_leader = tuple(ctx.peers), ctx.is_leader
        self._fingerprint = job.fingerprint()
        self._session = ""  # known once the handshake is done
        self._inbox = Inbox(job.transport.max_pending)
        self._senders: ThreadPoolExecutor | None = None  # for sending to several peers at once
        self.telemetry = telemetry or Telemetry(role)

        if job.tls.enabled:
            server_context: ssl.SSLContext | None = server_ssl_context(job, role)
            client_context: ssl.SSLContext | bool = client_ssl_context(job, role)
            scheme = "https"
        else:
            log.warning("tls.enabled is false: tensors travel unencrypted and unauthenticated (plain HTTP)")
            server_context, client_context, scheme = None, False, "http"
        self._channels = {key: _Channel(key, spec, scheme, client_context, me.name, job.transport.read_timeout_s)
                          for key, spec in ctx.peers.items()}

        self._server = ServerThread(
            create_app(self._inbox, ctx, self.telemetry),
            me.host,
            me.port,
            server_context,
            read_timeout_s=job.transport.read_timeout_s,
            max_unauthenticated=job.transport.max_unauthenticated,
            on_refusal=self.telemetry.refused,
        )
        self._server.start()
        log.info("%s %s listening on %s, peers %s", role, me.name, me.listen,
                 ", ".join(f"{c.name} at {c.url}" for c in self._channels.values()))

    # --------------------------------------------------------------------------------------------- Grid API

    def handshake(self, mine: Hello, reply: Reply) -> dict[str, Hello]:
        """A follower POSTs its Hello until the leader's server answers, then waits for the leader's; the leader
        waits for every follower's, then POSTs its answer to each. Each wait is bounded by
        `transport.connect_timeout_s`. The Hellos make the session id."""
        wait_s = self._job.transport.connect_timeout_s
        deadline = time.monotonic() + wait_s
        if self.is_leader:
            theirs = {key: self._wait_hello(key, deadline) for key in self.peers}
            answer = leader_hello(reply, theirs, self.peers)
            self._inbox.expect(answer)
            self.send_hellos(answer, deadline)
        else:
            (leader,) = self.peers
            self._inbox.expect(mine)
            self._post_hello(leader, mine, deadline)
            theirs = {leader: self._wait_hello(leader, deadline)}
            if mine.nonce not in theirs[leader].group:
                raise ProtocolError(f"the {leader}'s hello answers another hello than this party's; rerun this party")
        self._session = self._inbox.session(self._channels[self.peers[0]].name) or ""
        for channel in self._channels.values():
            channel.seq = dict.fromkeys(KINDS, 0)
        return theirs

    def send_hellos(self, answer: Hello, deadline: float) -> None:
        self._at_once([(self._post_hello, (key, answer, deadline)) for key in self.peers])

    def send_each(self, kind: Kind, key: BatchKey, by_peer: dict[str, WireTensors]) -> None:
        """Each follower's message at once, one thread per peer: a slow follower does not hold up the others."""
        self._at_once([(self.send, (dst, kind, key, tensors)) for dst, tensors in by_peer.items()])

    def _at_once(self, calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        """Run the calls concurrently (in this thread when there is one); raise the first failure after all end."""
        if len(calls) == 1:
            function, args = calls[0]
            function(*args)
            return
        if self._senders is None:
            self._senders = ThreadPoolExecutor(len(self.peers), thread_name_prefix="vfl-send")
        futures = [self._senders.submit(function, *args) for function, args in calls]
        for future in futures:
            future.result()

    def _post_hello(self, key: str, hello: Hello, deadline: float) -> None:
        body = encode(HelloMessage(hello), self._fingerprint)
        self._post(self._channels[key], "/v1/hello", body, "our hello", deadline, retries=None)
        self.telemetry.sent(key, "hello", len(body))

    def _wait_hello(self, key: str, deadline: float) -> Hello:
        channel = self._channels[key]
        waited = max(deadline - time.monotonic(), 0.0)
        theirs = self._inbox.wait_hello(channel.name, waited)
        if theirs is None:
            raise PeerTimeout(f"no hello from the {key} {channel.name!r} ({channel.url}) within "
                              f"{self._job.transport.connect_timeout_s:g} s; is it running?")
        return theirs

    def send(self, dst: str, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        if kind == self._ctx.receives:
            raise ValueError(f"the {self._role} receives {kind}, it does not send them")  # PSI kinds go both ways
        channel = self._channels[dst]
        aborted = self._inbox.aborted(channel.name)
        if aborted is not None:  # the peer is gone: say why, rather than "unreachable" later
            raise PeerAborted(f"the {dst} stopped: {aborted}")
        channel.seq[kind] += 1
        body = encode(TensorMessage(self._session, kind, key, channel.seq[kind], tensors), self._fingerprint)
        deadline = time.monotonic() + self._job.transport.timeout_s
        try:
            self._post(channel, "/v1/tensors", body, f"{kind} for {key}", deadline, retries=self._job.transport.retries)
        except PeerRefused:
            channel.seq[kind] -= 1  # refused means not applied: the next message may use this seq
            raise
        # After other failures the seq stays used: the message may have arrived, and reusing its seq
        # would make the peer drop the next message as a duplicate.
        self.telemetry.sent(dst, kind, len(body))

    def receive(self, src: str, kind: Kind, key: BatchKey) -> WireTensors:
        if kind not in accepted_kinds(self._ctx.side):
            raise ValueError(f"the {self._role} never receives {kind}")
        channel = self._channels[src]
        timeout_s = self._job.transport.timeout_s
        message = self._inbox.next_tensors(channel.name, kind, timeout_s)
        if message is None:
            raise PeerTimeout(
                f"no {kind} for {key} from the {src} {channel.name!r} within {timeout_s:g} s; is it still running?"
            )
        if message.key != key:
            raise ProtocolError(f"expected {kind} for {key} from the {src}, got {kind} for {message.key}")
        return message.tensors

    def abort(self, reason: str) -> None:
        message = AbortMessage(self._session, printable(reason)[:MAX_REASON_CHARS])
        body = encode(message, self._fingerprint)
        for channel in self._channels.values():
            try:
                channel.client.post("/v1/abort", content=body, timeout=ABORT_TIMEOUT_S,
                                    extensions={"sni_hostname": channel.name})
            except Exception as exc:  # best effort by contract: we are already failing
                log.info("could not tell %s that we stopped: %s", channel.name, exc)

    def close(self) -> None:
        if self._senders is not None:
            self._senders.shutdown(wait=False)
        for channel in self._channels.values():
            channel.client.close()
        self._server.stop()

    @property
    def bytes_sent(self) -> int:
        """Request body bytes of every message we delivered (hello and tensors), as counted for /metrics."""
        return self.telemetry.bytes_total("sent")

    @property
    def bytes_received(self) -> int:
        """Request body bytes of every message our peers delivered to us."""
        return self._inbox.bytes_received

    # ------------------------------------------------------------------------------------------------- HTTP

    def _post(
        self, channel: _Channel, path: str, body: bytes, what: str, deadline: float, retries: int | None
    ) -> httpx.Response:
        """POST with resends on connection errors and 5xx (at most `retries`, None = until `deadline`); a busy
        peer (503) is waited out until `deadline` without using up retries."""
        started = time.monotonic()
        attempt = failures = 0
        while True:
            attempt += 1
            failure: Exception | None = None
            busy = False
            try:
                response = channel.client.post(
                    path,
                    content=body,
                    timeout=max(deadline - time.monotonic(), 0.1),
                    # The name the server's certificate must carry, checked in the TLS handshake.
                    extensions={"sni_hostname": channel.name},
                )
            except httpx.TransportError as exc:
                self._raise_if_tls_failure(channel, exc)
                failure, problem = exc, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.telemetry.retried("timeout" if isinstance(exc, httpx.TimeoutException) else "connect")
            else:
                if response.status_code < 400:
                    return response
                reason = refusal_reason(response)
                if response.status_code < 500:
                    raise PeerRefused(
                        f"{channel.name} refused {what}: {reason} (HTTP {response.status_code})"
                    )
                busy = response.status_code == 503
                problem = f"HTTP {response.status_code}: {reason}"
                self.telemetry.retried("http_503" if busy else "http_5xx")
            failures += 0 if busy else 1
            pause = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
            if busy:
                pause = min(pause, _retry_after(response))
            if (retries is not None and failures > retries) or time.monotonic() + pause >= deadline:
                elapsed = time.monotonic() - started
                message = (
                    f"cannot deliver {what} to {channel.name} at {channel.url} "
                    f"({attempt} attempts in {elapsed:.1f} s): {problem}"
                )
                if failure is None:
                    raise PeerError(message)
                if isinstance(failure, httpx.RemoteProtocolError) and self._job.tls.enabled:
                    # With TLS 1.3 a server that rejects our certificate just hangs up after the handshake.
                    message += " (if the peer is running, does it trust our certificate's CA?)"
                raise PeerUnreachable(message) from failure
            log.debug("resending %s to %s in %.2f s: %s", what, channel.url, pause, problem)
            time.sleep(pause)

    def _raise_if_tls_failure(self, channel: _Channel, exc: httpx.TransportError) -> None:
        """Certificate problems do not heal with retries: stop at once with a TlsError."""
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError):
                if cause.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
                    host, port = channel.spec.connect_to.rsplit(":", 1)
                    met = describe_server_certificate(host.strip("[]"), int(port), self._job, self._role)
                    hint = ""
                    if isinstance(met, CertificateSummary) and met.common_name == channel.name:
                        hint = f" (it does not list {channel.name!r} as a DNS name: make it again with `vfl certs`)"
                    raise TlsError(
                        f"the server at {channel.url} is not the job's peer {channel.name!r}: it presented {met}"
                        f"{hint}; nothing was sent to it"
                    ) from exc
                raise TlsError(
                    f"the server at {channel.url} failed certificate verification: {cause.verify_message}"
                ) from exc
            if isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or "").upper():
                raise TlsError(f"the server at {channel.url} refused our certificate: {cause.reason}") from exc
            cause = cause.__cause__ or cause.__context__


def _retry_after(response: httpx.Response) -> float:
    """The pause a 503 asks for, in seconds (Retry-After as a number; anything else counts as 1 s)."""
    try:
        return max(float(response.headers.get("retry-after", "1")), 0.0)
    except ValueError:
        return 1.0


def refusal_reason(response: httpx.Response) -> str:
    """The `{"error": reason}` of a refusal, made safe for a terminal."""
    try:
        reason = response.json().get("error")
    except (ValueError, AttributeError):
        reason = None
    return printable(str(reason or response.text[:200] or response.reason_phrase))[:MAX_REASON_CHARS]
