"""The inbox between a party's HTTPS server (event-loop thread) and its training loop (main thread).

It owns the exactly-once rule: per kind, message `seq` must be last+1 to be accepted; a resend of the
last one (its acknowledgement was lost) is acknowledged and dropped; anything else is a conflict. It also
holds the peer's Hello and abort, and wakes waiting readers as soon as either arrives.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Literal

from vfl_cli.errors import PeerAborted
from vfl_cli.peer import KINDS, BatchKey, Hello, Kind
from vfl_cli.transport.codec import TensorMessage

Offer = Literal["accepted", "duplicate"]


class SeqConflict(Exception):
    """A tensor message out of sequence; the server answers 409 with this reason."""


class Inbox:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[Kind, deque[TensorMessage]] = {kind: deque() for kind in KINDS}
        self._last_seq: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._last_key: dict[Kind, BatchKey | None] = dict.fromkeys(KINDS, None)
        self._hello: Hello | None = None
        self._abort_reason: str | None = None
        self.bytes_received = 0  # request body bytes of every accepted or duplicate message

    # -------------------------------------------------------------------- writers (the server)

    def offer(self, message: TensorMessage, size: int = 0) -> Offer:
        """Queue the message if it is the next in its kind's sequence; raises SeqConflict otherwise.
        `size` (its body bytes) is counted unless it is refused."""
        with self._cond:
            self._check_seq(message)
            if message.seq == self._last_seq[message.kind]:
                self.bytes_received += size
                return "duplicate"
            self._queues[message.kind].append(message)
            self._last_seq[message.kind] = message.seq
            self._last_key[message.kind] = message.key
            self.bytes_received += size
            self._cond.notify_all()
            return "accepted"

    def _check_seq(self, message: TensorMessage) -> None:
        last = self._last_seq[message.kind]
        if message.seq == last + 1:
            return
        if message.seq == last and message.key == self._last_key[message.kind]:
            return  # a resend whose acknowledgement was lost
        if message.seq == last:
            raise SeqConflict(
                f"{message.kind} seq {last} was already used for {self._last_key[message.kind]}"
            )
        if message.seq < last:
            raise SeqConflict(f"{message.kind} seq {message.seq} is from the past: last accepted was {last}")
        raise SeqConflict(f"{message.kind} seq {message.seq} leaves a gap: last accepted was {last}")

    def put_hello(self, hello: Hello, size: int = 0) -> None:
        with self._cond:
            self._hello = hello
            self.bytes_received += size
            self._cond.notify_all()

    def put_abort(self, reason: str, size: int = 0) -> None:
        with self._cond:
            self.bytes_received += size
            if self._abort_reason is None:  # the first reason is the cause; later ones are echoes
                self._abort_reason = reason
            self._cond.notify_all()

    # -------------------------------------------------------------------- readers (the training loop)

    def wait_hello(self, timeout_s: float) -> Hello | None:
        """The peer's Hello, or None when none came within the timeout; raises PeerAborted."""
        with self._cond:
            self._cond.wait_for(lambda: self._hello is not None or self._abort_reason is not None, timeout_s)
            if self._hello is None:  # a Hello that came before an abort still lets us say what differs
                self._raise_if_aborted()
            return self._hello

    def next_tensors(self, kind: Kind, timeout_s: float) -> TensorMessage | None:
        """The oldest queued message of `kind`, or None after `timeout_s`; PeerAborted at once on abort."""
        deadline = time.monotonic() + timeout_s
        queue = self._queues[kind]
        with self._cond:
            while True:
                self._raise_if_aborted()
                if queue:
                    return queue.popleft()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def pending(self, kind: Kind) -> int:
        with self._cond:
            return len(self._queues[kind])

    @property
    def aborted(self) -> str | None:
        return self._abort_reason

    def _raise_if_aborted(self) -> None:
        if self._abort_reason is not None:
            raise PeerAborted(f"the peer stopped: {self._abort_reason}")
