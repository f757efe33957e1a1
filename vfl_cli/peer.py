"""The `Peer` interface the training loop talks to, the in-memory `LocalPeer`, and `run_both`.

The loop never knows whether the other party is a thread in this process (`LocalPeer`, used by
`--role local` and by tests) or a process across the network (`HttpsPeer` in `vfl_cli.transport`).
What a peer carries (the Hello, the message kinds, their tensors and checks) is `vfl_cli.protocol`'s.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from vfl_cli.errors import PeerAborted, PeerTimeout, ProtocolError
from vfl_cli.privacy.quantize import QuantizedTensor
from vfl_cli.protocol import BatchKey, Hello, Kind, WireTensor, WireTensors

T = TypeVar("T")


class Peer(ABC):
    """The other party, as the training loop sees it."""

    @abstractmethod
    def handshake(self, mine: Hello) -> Hello:
        """Send our Hello and return the peer's; waits (bounded) for the peer to come up."""

    @abstractmethod
    def send(self, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        """Deliver the tensors of one batch exactly once; raises PeerError when that is impossible."""

    @abstractmethod
    def receive(self, kind: Kind, key: BatchKey) -> WireTensors:
        """Wait (bounded) for the peer's tensors of this batch; raises PeerError or ProtocolError."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Tell the peer we stopped (best effort, never raises)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most peers have nothing to release
        """Release connections and servers."""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Aborted:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class LocalPeer(Peer):
    """One end of an in-memory pipe between two parties running in one process (two threads)."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout_s: float = 120.0) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    @classmethod
    def pair(cls, timeout_s: float = 120.0) -> tuple[LocalPeer, LocalPeer]:
        """Two connected ends: give one to the leader, the other to the follower."""
        a_to_b: queue.Queue = queue.Queue()
        b_to_a: queue.Queue = queue.Queue()
        return cls(b_to_a, a_to_b, timeout_s), cls(a_to_b, b_to_a, timeout_s)

    def _get(self, what: str) -> object:
        try:
            item = self._inbox.get(timeout=self._timeout_s)
        except queue.Empty as exc:
            raise PeerTimeout(f"no {what} from the peer within {self._timeout_s:g} s") from exc
        if isinstance(item, _Aborted):
            raise PeerAborted(f"the peer stopped: {item.reason}")
        return item

    def handshake(self, mine: Hello) -> Hello:
        self._outbox.put(("hello", mine))
        item = self._get("hello")
        if not (isinstance(item, tuple) and item[0] == "hello"):
            raise ProtocolError(f"expected the peer's hello, got {item!r:.80}")
        return item[1]

    def send(self, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        self._outbox.put((kind, key, {name: _copy(t) for name, t in tensors.items()}))

    def receive(self, kind: Kind, key: BatchKey) -> WireTensors:
        item = self._get(f"{kind} for {key}")
        if not (isinstance(item, tuple) and item[:2] == (kind, key)):
            got = f"{item[0]} for {item[1]}" if isinstance(item, tuple) else repr(item)
            raise ProtocolError(f"expected {kind} for {key}, got {got}")
        return item[2]

    def abort(self, reason: str) -> None:
        self._outbox.put(_Aborted(reason))


def _copy(tensor: WireTensor) -> WireTensor:
    # A copy, so that the receiver's autograd graph never reaches into the sender's. A QuantizedTensor is frozen
    # and holds immutable bytes: nothing to copy.
    return tensor if isinstance(tensor, QuantizedTensor) else tensor.detach().clone()


def run_both(sides: dict[str, tuple[Callable[[], T], Peer]]) -> dict[str, T]:
    """Run the leader's side in this thread and the follower's in a second one (each `(work, its peer)`).
    A failure on one side aborts the other through its peer, so neither waits out its timeout; the side that
    failed first is reported, not the other side's "the peer stopped"."""
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}

    def run_side(role: str) -> None:
        work, peer = sides[role]
        try:
            results[role] = work()
        except BaseException as exc:
            errors[role] = exc
            peer.abort(f"{role} failed: {exc}")

    follower = threading.Thread(target=run_side, args=("follower",), name="vfl-follower", daemon=True)
    follower.start()
    run_side("leader")
    follower.join()
    first = next((e for e in errors.values() if not isinstance(e, PeerAborted)), None)
    if first is not None or errors:
        raise first or next(iter(errors.values()))
    return results

