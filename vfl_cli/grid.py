"""The `Grid` a party's loop talks to: `send(dst, ...)` / `receive(src, ...)` to and from its peers, by party
key; the in-memory `LocalGrid` (every party a thread of one process); and `run_all`.

The loop never knows whether its peers are threads in this process (`LocalGrid`, used by `--role local` and
by tests) or processes across the network (`HttpsGrid` in `vfl_cli.transport`): Flower's Grid is the model,
one interface with an in-memory and a networked implementation. The parties form a star: the leader's peers
are every follower, a follower's peer is the leader. What a grid carries (the Hello, the message kinds, their
tensors and checks) is `vfl_cli.protocol`'s.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from vfl_cli.errors import PeerAborted, PeerTimeout, ProtocolError
from vfl_cli.privacy.quantize import QuantizedTensor
from vfl_cli.protocol import BatchKey, Hello, Kind, Reply, WireTensor, WireTensors

T = TypeVar("T")


class Grid(ABC):
    """A party's peers, as its loop sees them: one channel to each, addressed by the peer's party key."""

    peers: tuple[str, ...]  # my peers' keys, in the job's order
    is_leader: bool  # the leader answers the followers' Hellos; a follower sends first

    @abstractmethod
    def handshake(self, mine: Hello, reply: Reply) -> dict[str, Hello]:
        """Exchange Hellos with every peer (each wait bounded) and return theirs by key. A follower sends `mine`
        and waits for the leader's; the leader waits for every follower's, then answers each with `reply(theirs)`
        carrying every follower's nonce as its `group` (see `vfl_cli.protocol.session_id`)."""

    @abstractmethod
    def send(self, dst: str, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        """Deliver the tensors of one batch to peer `dst` exactly once; raises PeerError when that is impossible."""

    @abstractmethod
    def receive(self, src: str, kind: Kind, key: BatchKey) -> WireTensors:
        """Wait (bounded) for peer `src`'s tensors of this batch; raises PeerError or ProtocolError."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Tell every peer we stopped (best effort, never raises)."""

    def send_each(self, kind: Kind, key: BatchKey, by_peer: dict[str, WireTensors]) -> None:
        """Send each peer its own message (a networked grid sends them all at once)."""
        for dst, tensors in by_peer.items():
            self.send(dst, kind, key, tensors)

    def close(self) -> None:  # noqa: B027 - optional hook, an in-memory grid has nothing to release
        """Release connections and servers."""

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def leader_hello(reply: Reply, theirs: dict[str, Hello], followers: tuple[str, ...]) -> Hello:
    """The Hello the leader answers with: `reply`'s, with every follower's nonce, in the job's order."""
    return dataclasses.replace(reply(theirs), group=tuple(theirs[key].nonce for key in followers))


class _Aborted:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class LocalGrid(Grid):
    """One party's end of in-memory channels to its peers, every party a thread of one process."""

    def __init__(self, me: str, peers: tuple[str, ...], is_leader: bool,
                 channels: dict[tuple[str, str], queue.Queue], timeout_s: float = 120.0) -> None:
        self.me, self.peers, self.is_leader = me, peers, is_leader
        self._channels = channels  # (sender, receiver) -> queue
        self._timeout_s = timeout_s

    @classmethod
    def star(cls, leader: str, followers: tuple[str, ...], timeout_s: float = 120.0) -> dict[str, LocalGrid]:
        """Every party's end, by key: the leader joined to each follower."""
        channels: dict[tuple[str, str], queue.Queue] = {}
        for follower in followers:
            channels[leader, follower], channels[follower, leader] = queue.Queue(), queue.Queue()
        grids = {leader: cls(leader, followers, True, channels, timeout_s)}
        return grids | {f: cls(f, (leader,), False, channels, timeout_s) for f in followers}

    def _get(self, src: str, what: str) -> object:
        try:
            item = self._channels[src, self.me].get(timeout=self._timeout_s)
        except queue.Empty as exc:
            raise PeerTimeout(f"no {what} from the {src} within {self._timeout_s:g} s") from exc
        if isinstance(item, _Aborted):
            raise PeerAborted(f"the peer stopped: {item.reason}")
        return item

    def _hello_from(self, src: str) -> Hello:
        item = self._get(src, "hello")
        if not (isinstance(item, tuple) and item[0] == "hello"):
            raise ProtocolError(f"expected the {src}'s hello, got {item!r:.80}")
        return item[1]

    def handshake(self, mine: Hello, reply: Reply) -> dict[str, Hello]:
        if not self.is_leader:
            (leader,) = self.peers
            self._channels[self.me, leader].put(("hello", mine))
            return {leader: self._hello_from(leader)}
        theirs = {src: self._hello_from(src) for src in self.peers}
        answer = leader_hello(reply, theirs, self.peers)
        for dst in self.peers:
            self._channels[self.me, dst].put(("hello", answer))
        return theirs

    def send(self, dst: str, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        self._channels[self.me, dst].put((kind, key, {name: _copy(t) for name, t in tensors.items()}))

    def receive(self, src: str, kind: Kind, key: BatchKey) -> WireTensors:
        item = self._get(src, f"{kind} for {key}")
        if not (isinstance(item, tuple) and item[:2] == (kind, key)):
            got = f"{item[0]} for {item[1]}" if isinstance(item, tuple) else repr(item)
            raise ProtocolError(f"expected {kind} for {key} from the {src}, got {got}")
        return item[2]

    def abort(self, reason: str) -> None:
        for dst in self.peers:
            self._channels[self.me, dst].put(_Aborted(reason))


def _copy(tensor: WireTensor) -> WireTensor:
    # A copy, so that the receiver's autograd graph never reaches into the sender's. A QuantizedTensor is frozen
    # and holds immutable bytes: nothing to copy.
    return tensor if isinstance(tensor, QuantizedTensor) else tensor.detach().clone()


def run_all(sides: dict[str, tuple[Callable[[], T], Grid]], leader: str) -> dict[str, T]:
    """Run the leader's side in this thread and each follower's in a thread of its own (each `(work, its grid)`).
    A failure on one side aborts its peers through its grid, so none waits out its timeout; the side that
    failed first is reported, not the others' "the peer stopped"."""
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}

    def run_side(role: str) -> None:
        work, grid = sides[role]
        try:
            results[role] = work()
        except BaseException as exc:
            errors[role] = exc
            grid.abort(f"{role} failed: {exc}")  # a follower's reaches the leader, which then stops the others

    threads = [threading.Thread(target=run_side, args=(role,), name=f"vfl-{role}", daemon=True)
               for role in sides if role != leader]
    for thread in threads:
        thread.start()
    run_side(leader)
    for thread in threads:
        thread.join()
    first = next((e for e in errors.values() if not isinstance(e, PeerAborted)), None)
    if first is not None or errors:
        raise first or next(iter(errors.values()))
    return results
