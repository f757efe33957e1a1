"""The gate in front of a party's TLS handshakes: which accepted connections may shake hands, and which are
dropped to keep the real peer's way in open. `listener.py` calls it for every connection it accepts.

    accepted ──> hung up already                      dropped at once, counted ("hung_up"), not logged
             ──> first bytes are not a TLS record     refused at once ("not_tls"), before any TLS work
             ──> the rest                             pending until their TLS handshake ends; beyond
                                                      max_unauthenticated, one is dropped ("connection_cap")

Which one goes to make room: each connection is ranked by its first bytes, looked at without reading them
(MSG_PEEK) when they arrive: a first TLS record that is not whole < nothing yet (silent) < a whole TLS
record; the lowest rank goes first, the oldest first within a rank. Until a silent connection speaks, it
costs no TLS state: its reading is paused and the loop watches a duplicate of its descriptor. The real
peer's ClientHello arrives whole right behind its TCP handshake, so neither idle connections, nor churn of
short-lived ones, nor garbage can push its handshake out. (The cap is enforced as connections arrive,
which under a flood is hundreds at once: dropping simply the oldest, as before, dropped the peer's
handshake for connections that had already hung up.) What no ranking can stop is more than
max_unauthenticated connections at once that each send a whole ClientHello and then stall: oldest first
among them, the peer must finish its handshake before that many newer ones arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# The listener's logger: every line about a refused or dropped connection comes from one place.
log = logging.getLogger("vfl_cli.transport.listener")

OnRefusal = Callable[[str], None]  # called with a short machine reason, e.g. "tls_handshake"
TLS_HANDSHAKE = 0x16  # the content type of a TLS client's first record, which carries its ClientHello
CLIENT_HELLO = b"\x01"  # the handshake message type that must open that record
MAX_RECORD = 2**14  # the most plaintext a TLS record may carry (RFC 8446 5.1), a ClientHello's included
# The ranks, the lowest dropped first. A real client's ClientHello arrives whole right behind its TCP handshake
# (so it is silent only briefly); a first record that stops half-way is a flood's way of holding a slot.
ARRIVING, SILENT, WHOLE = 0, 1, 2


class RateLimitedLog:
    """At most one line per `interval_s` for each kind of event; the next one says how many were dropped."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last.get(kind, -math.inf) < self._interval_s:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        suffix = f" (and {dropped} more like it)" if dropped else ""
        self._logger.warning(message + suffix, *args)


@dataclass
class _Pending:
    rank: int
    watch: int | None = None  # a duplicate of the socket's descriptor, watched until a silent client speaks


class ConnectionGate:
    """What the connections of one server share: the TLS context, the limits, and the pending handshakes."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        read_timeout_s: float,
        max_unauthenticated: int,
        on_refusal: OnRefusal | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.read_timeout_s = read_timeout_s
        self.max_unauthenticated = max_unauthenticated
        self.on_refusal = on_refusal or (lambda reason: None)
        self.pending: OrderedDict[asyncio.Transport, _Pending] = OrderedDict()  # in arrival order
        self.refused = RateLimitedLog(log)

    def admit(self, transport: asyncio.Transport, start: Callable[[], None]) -> None:
        """Take a new connection, not read from yet, for its TLS handshake (making room beyond the cap): calls
        `start()` now if its first bytes are there, once they arrive if not, never if it is dropped."""
        rank = self._rank(transport)
        if rank is None:
            return
        if len(self.pending) >= self.max_unauthenticated:
            self._make_room()
        entry = self.pending[transport] = _Pending(rank)
        self._start_or_watch(transport, entry, start)

    def _start_or_watch(self, transport: asyncio.Transport, entry: _Pending, start: Callable[[], None]) -> None:
        if entry.rank != SILENT or not self._watch(transport, entry, start):
            start()

    def _rank(self, transport: asyncio.Transport) -> int | None:
        """The rank of what waits on a connection not read from yet; None when it is dropped (gone, not TLS)."""
        waiting = waiting_bytes(transport, 5 + MAX_RECORD)  # the first record, whole if it is there
        if waiting == b"":
            self._gone(transport)
            return None
        rank = SILENT if waiting is None else _rank_of_first_record(waiting)
        if rank is None:
            self.refuse("not_tls", "refused a connection from %s: its first bytes are not a TLS handshake",
                        address(transport.get_extra_info("peername")))
            transport.abort()
        return rank

    def _watch(self, transport: asyncio.Transport, entry: _Pending, start: Callable[[], None]) -> bool:
        # Until a client speaks it costs no TLS state and nothing is read, so its first bytes are still there
        # to rank. asyncio lets nobody else watch a transport's own descriptor: the loop watches a duplicate.
        try:
            entry.watch = os.dup(transport.get_extra_info("socket").fileno())
            asyncio.get_running_loop().add_reader(entry.watch, self._spoke, transport, start)
        except (OSError, NotImplementedError):  # out of descriptors, or a loop without readers: start now
            self._unwatch(entry)
            return False
        transport.pause_reading()  # loop.start_tls resumes it
        return True

    def _spoke(self, transport: asyncio.Transport, start: Callable[[], None]) -> None:
        entry = self.pending.get(transport)
        if entry is None:
            return
        self._unwatch(entry)
        rank = self._rank(transport)
        if rank is None:
            del self.pending[transport]
            return
        entry.rank = rank
        self._start_or_watch(transport, entry, start)  # silent still after a wake-up that brought nothing

    def _unwatch(self, entry: _Pending | None) -> None:
        # Before the connection is closed: an open duplicate would keep the client's TCP connection open.
        if entry is not None and entry.watch is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already: nothing watches any more
                asyncio.get_running_loop().remove_reader(entry.watch)
            os.close(entry.watch)
            entry.watch = None

    def _make_room(self) -> None:
        while len(self.pending) >= self.max_unauthenticated:
            lowest = min(entry.rank for entry in self.pending.values())
            victim = next(t for t, entry in self.pending.items() if entry.rank == lowest)  # the oldest of that rank
            self._unwatch(self.pending.pop(victim))
            self.refuse("connection_cap", "dropped a connection still in its TLS handshake: more than "
                        "transport.max_unauthenticated = %d at once", self.max_unauthenticated)
            victim.abort()

    def _gone(self, transport: asyncio.Transport) -> None:
        """A client that hung up before its TLS handshake: counted, not logged (a TCP health probe does it)."""
        self.on_refusal("hung_up")
        transport.abort()

    def handshake_too_slow(self, transport: asyncio.Transport, peer: object) -> None:
        if transport not in self.pending:
            return
        self.release(transport)
        self.refuse("read_timeout", "closed a connection from %s: no TLS handshake within "
                    "transport.read_timeout_s = %g s", address(peer), self.read_timeout_s)
        transport.abort()

    def release(self, transport: asyncio.Transport) -> None:
        self._unwatch(self.pending.pop(transport, None))

    def refuse(self, reason: str, message: str, *args: object) -> None:
        self.on_refusal(reason)
        self.refused.warning(reason, message, *args)

    def abort_pending(self) -> None:
        for transport in list(self.pending):
            self.release(transport)
            transport.abort()


def _rank_of_first_record(waiting: bytes) -> int | None:
    """ARRIVING or WHOLE for what may start a client's first TLS record, None if it cannot: a handshake record
    (type 0x16, version 3.0 to 3.4, at most MAX_RECORD long) whose message is a ClientHello; WHOLE once all
    of the record is there."""
    version, length = waiting[1:3], int.from_bytes(waiting[3:5], "big")
    if waiting[0] != TLS_HANDSHAKE or version[:1] not in (b"", b"\x03") or version[1:] > b"\x04":
        return None
    if (len(waiting) >= 5 and length > MAX_RECORD) or waiting[5:6] not in (b"", CLIENT_HELLO):
        return None
    return WHOLE if len(waiting) >= 9 and len(waiting) >= 5 + length else ARRIVING


def waiting_bytes(transport: asyncio.Transport, size: int = 1) -> bytes | None:
    """Up to `size` bytes that wait unread on the transport's socket (MSG_PEEK: they stay there); b"" when
    the client hung up (or reset), None when nothing has arrived yet."""
    raw = transport.get_extra_info("socket")
    if raw is None or raw.fileno() < 0:
        return b""
    # A socket object over the transport's own descriptor, detached again so that it never closes it.
    sock = socket.socket(fileno=raw.fileno())
    try:
        return sock.recv(size, socket.MSG_PEEK)  # the descriptor is non-blocking (asyncio's)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        sock.detach()


def address(peer: object) -> str:
    """host:port of a peer name as asyncio gives it, for a log line."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "an unknown address"
