"""The inbox between a party's HTTPS server (event-loop thread) and its training loop (main thread).

Everything is kept per sending party (its name: the CN of its certificate): the leader's inbox holds one
sender per follower, a follower's the leader alone. For each sender the inbox owns:

- the session: the leader's Hello names every party's nonce, and makes the session id (`session_id`) that
  every tensor and abort message must carry; at the leader that Hello is its own (`expect`, once it has
  every follower's), at a follower the leader's, if it names this follower's nonce (ours, `expect`). A
  message of another session is refused, never applied.
  A new Hello from a sender starts a new session: its sequence numbers start again at 1.
- the Hellos seen: a session is never re-opened. The same Hello again while it is the current one (the
  sender's retry after a lost answer) is acknowledged and changes nothing; a Hello with a nonce this inbox
  has seen before (an earlier session's, replayed; or the current nonce with other contents) is refused
  (the server answers 409), so an earlier session's messages can never be applied again. The nonces are
  remembered for the inbox's life, a few bytes per Hello of an authenticated peer.
- the exactly-once rule: per kind, message `seq` must be last+1 to be accepted; a resend of the last one
  (its acknowledgement was lost) is acknowledged and dropped; anything else is a conflict.
- backpressure: at most `max_pending` messages of a kind wait for the loop; more are refused as busy
  (the server answers 503 with Retry-After, the sender waits and resends).
- the sender's abort, which wakes every waiting reader at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from vfl_cli.errors import PeerAborted
from vfl_cli.protocol import KINDS, BatchKey, Hello, Kind, session_id
from vfl_cli.transport.codec import AbortMessage, TensorMessage

Offer = Literal["accepted", "duplicate"]


class SeqConflict(Exception):
    """A tensor message out of sequence; the server answers 409 with this reason."""


class WrongSession(Exception):
    """A message of another (earlier) session, or before any; the server answers 409 with this reason."""


class ReplayedHello(Exception):
    """A Hello whose nonce opened an earlier session; the server answers 409 with this reason."""


class InboxFull(Exception):
    """`max_pending` messages of this kind already wait; the server answers 503 and the sender retries."""


@dataclass
class _Sender:
    hello: Hello | None = None
    session: str | None = None  # known once both our Hello and the sender's are
    restarted: bool = False  # a new Hello came while a session was open: the sender's process restarted
    queues: dict[Kind, deque[TensorMessage]] = field(default_factory=lambda: {kind: deque() for kind in KINDS})
    last_seq: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    last_key: dict[Kind, BatchKey | None] = field(default_factory=lambda: dict.fromkeys(KINDS, None))
    abort_reason: str | None = None


class Inbox:
    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._mine: Hello | None = None
        self._senders: dict[str, _Sender] = {}
        self._nonces: dict[str, set[str]] = {}  # per sender, the nonce of every Hello it has sent us
        self.bytes_received = 0  # request body bytes of every accepted or duplicate message

    def _sender(self, name: str) -> _Sender:
        return self._senders.setdefault(name, _Sender())

    # -------------------------------------------------------------------- our side of the handshake

    def expect(self, mine: Hello) -> None:
        """Our Hello, set before we send it: with the peer's it makes the session id."""
        with self._cond:
            self._mine = mine
            for sender in self._senders.values():
                sender.session = self._session_with(sender.hello)

    def _session_with(self, theirs: Hello | None) -> str | None:
        mine = self._mine
        if mine is None or theirs is None:
            return None
        if mine.group:  # ours is the leader's answer: the session is open with each follower it names
            return session_id(mine) if theirs.nonce in mine.group else None
        return session_id(theirs) if mine.nonce in theirs.group else None

    def session(self, name: str) -> str | None:
        with self._cond:
            return self._sender(name).session

    # -------------------------------------------------------------------- writers (the server)

    def put_hello(self, name: str, hello: Hello, size: int = 0) -> None:
        """A Hello opens a new session with its sender: sequences restart, nothing of the old one is kept.
        Raises ReplayedHello for a nonce seen before, unless it is the current Hello sent again."""
        with self._cond:
            old = self._sender(name)
            if old.hello == hello:
                self.bytes_received += size  # a resent Hello: the same session
                return
            seen = self._nonces.setdefault(name, set())
            if hello.nonce in seen:
                current = old.hello is not None and old.hello.nonce == hello.nonce
                raise ReplayedHello(
                    f"hello nonce {hello.nonce[:32]!r} "
                    + ("is the current session's, with other contents" if current else "opened an earlier session")
                    + ": a session is never re-opened (send a hello with a fresh nonce)"
                )
            seen.add(hello.nonce)
            fresh = _Sender(hello=hello, session=self._session_with(hello))
            fresh.restarted = old.session is not None and old.abort_reason is None
            self._senders[name] = fresh
            self.bytes_received += size
            self._cond.notify_all()

    def offer(self, name: str, message: TensorMessage, size: int = 0) -> Offer:
        """Queue the message if it is the sender's next in its kind's sequence; raises WrongSession,
        SeqConflict or InboxFull otherwise. `size` (its body bytes) is counted unless it is refused."""
        with self._cond:
            sender = self._sender(name)
            self._check_session(sender, message.session)
            _check_seq(sender, message)
            if message.seq == sender.last_seq[message.kind]:
                self.bytes_received += size
                return "duplicate"
            queue = sender.queues[message.kind]
            if len(queue) >= self.max_pending:
                raise InboxFull(f"{len(queue)} {message.kind} messages already wait (transport.max_pending)")
            queue.append(message)
            sender.last_seq[message.kind] = message.seq
            sender.last_key[message.kind] = message.key
            self.bytes_received += size
            self._cond.notify_all()
            return "accepted"

    def put_abort(self, name: str, message: AbortMessage, size: int = 0) -> None:
        """The sender stopped. An abort without a session is taken only while ours is not open yet: a peer
        that fails before it has our Hello cannot know the session id."""
        with self._cond:
            sender = self._sender(name)
            if not (message.session == "" and sender.session is None):
                self._check_session(sender, message.session)
            self.bytes_received += size
            if sender.abort_reason is None:  # the first reason is the cause; later ones are echoes
                sender.abort_reason = message.reason
            self._cond.notify_all()

    @staticmethod
    def _check_session(sender: _Sender, session: str) -> None:
        if sender.session is None:
            raise WrongSession("no session is open with this sender yet (send a hello first)")
        if session != sender.session:
            raise WrongSession(f"session {session[:16]!r} is not the current one (a message from an earlier run?)")

    # -------------------------------------------------------------------- readers (the training loop)

    def wait_hello(self, name: str, timeout_s: float) -> Hello | None:
        """The sender's Hello, or None when none came within the timeout; raises PeerAborted."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._sender(name).hello is not None or self._sender(name).abort_reason is not None,
                timeout_s,
            )
            sender = self._sender(name)
            if sender.hello is None:  # a Hello that came before an abort still lets us say what differs
                _raise_if_aborted(name, sender)
            return sender.hello

    def next_tensors(self, name: str, kind: Kind, timeout_s: float) -> TensorMessage | None:
        """The sender's oldest queued message of `kind`, or None after `timeout_s`; PeerAborted at once on
        abort or when the sender's process restarted (its new session cannot continue ours)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                sender = self._sender(name)
                _raise_if_aborted(name, sender)
                if sender.queues[kind]:
                    message = sender.queues[kind].popleft()
                    self._cond.notify_all()
                    return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def pending(self, name: str, kind: Kind) -> int:
        with self._cond:
            return len(self._sender(name).queues[kind])

    def aborted(self, name: str) -> str | None:
        with self._cond:
            return self._sender(name).abort_reason


def _check_seq(sender: _Sender, message: TensorMessage) -> None:
    last = sender.last_seq[message.kind]
    if message.seq == last + 1:
        return
    if message.seq == last and message.key == sender.last_key[message.kind]:
        return  # a resend whose acknowledgement was lost
    if message.seq == last:
        raise SeqConflict(f"{message.kind} seq {last} was already used for {sender.last_key[message.kind]}")
    if message.seq < last:
        raise SeqConflict(f"{message.kind} seq {message.seq} is from the past: last accepted was {last}")
    raise SeqConflict(f"{message.kind} seq {message.seq} leaves a gap: last accepted was {last}")


def _raise_if_aborted(name: str, sender: _Sender) -> None:
    if sender.abort_reason is not None:
        raise PeerAborted(f"the peer stopped: {sender.abort_reason}")
    if sender.restarted:
        raise PeerAborted(f"{name} restarted and began a new session; rerun this side too to resume together")
