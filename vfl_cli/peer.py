"""The `Peer` interface the training loop talks to, the messages it carries, and the in-memory `LocalPeer`.

The loop never knows whether the other party is a thread in this process (`LocalPeer`, used by
`--role local` and by tests) or a process across the network (`HttpsPeer` in `vfl_cli.transport`).

What crosses per batch, keyed by `BatchKey(phase, epoch, step)`:
    follower -> leader   kind "embeddings": its cut, e.g. {"wide": float32 [B, 1], "deep": float32 [B, 1]} (Wide&Deep)
                         or {"cut": float32 [B, cut_dim]} (mlp): `JobSpec.cut_widths("follower")`
    leader -> follower   kind "gradients":  the same names and shapes (train phase only)
    both ways            kinds "psi_blinded", "psi_reblinded": {"points": uint8 [n, 32]}  (phase "psi")
With the job's `privacy.quantize.embeddings` (or `.gradients`) set, that kind's two tensors travel as
`QuantizedTensor`s of the same shapes instead: the loop quantises before `send` and dequantises after `receive`,
peers and transport only carry them (`WireTensor`).
Before any batch both sides exchange a `Hello`; after a failure a side sends `abort(reason)`. Each Hello
carries a fresh random nonce; the two nonces make the session id that every later message carries, so a
message from an earlier session (a stale resend from a previous process) is never applied.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

from vfl_cli.errors import PeerAborted, PeerTimeout, ProtocolError
from vfl_cli.job import JobSpec
from vfl_cli.privacy.quantize import QuantizedTensor

T = TypeVar("T")
PROTOCOL_VERSION = 2
Kind = Literal["embeddings", "gradients", "selection", "psi_blinded", "psi_reblinded"]
Phase = Literal["train", "eval", "infer", "psi"]
KINDS: tuple[Kind, ...] = ("embeddings", "gradients", "selection", "psi_blinded", "psi_reblinded")
# "selection": after each epoch's validation, the leader tells the follower which step is the best so far and
# whether to stop early (int64 [1] each), so that both keep the same checkpoint for eval and infer
SELECTION_TENSORS = ("best_step", "stop")
PSI_KINDS: tuple[Kind, ...] = ("psi_blinded", "psi_reblinded")  # both parties send and receive these
PHASES: tuple[Phase, ...] = ("train", "eval", "infer", "psi")
PSI_POINTS = "points"  # the one tensor of a PSI message: uint8 [n, 32], n ristretto255 points
WireTensor = torch.Tensor | QuantizedTensor  # what one named tensor of a message may be
WireTensors = dict[str, WireTensor]  # the tensors of one message, by name


@dataclass(frozen=True, order=True)
class BatchKey:
    phase: Phase
    epoch: int
    step: int

    def __str__(self) -> str:
        return f"{self.phase} epoch {self.epoch} step {self.step}"


@dataclass(frozen=True)
class Hello:
    """What each side announces before any work; any difference in the shared parts stops both sides."""

    role: str  # "leader" or "follower"
    name: str  # the party's name in the job (its certificate's CN)
    job_fingerprint: str  # JobSpec.fingerprint()
    data_fingerprint: dict[str, dict[str, int | str]]  # split -> {"rows": N, "sample_ids_digest": hex}
    command: str  # "train", "eval" or "infer": both sides must be running the same one
    run_id: str = ""  # the training run this side's checkpoints belong to ("" = none yet)
    checkpoint_steps: tuple[int, ...] = ()  # global steps of the checkpoints it holds for run_id, oldest first
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))  # fresh per handshake: see session_id
    protocol: int = PROTOCOL_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # e.g. the split that eval/infer reads

    def mismatch(self, other: Hello) -> str | None:
        """Describe the first shared setting on which the two sides differ, or None when they agree."""
        checks = [
            ("protocol version", self.protocol, other.protocol),
            ("job fingerprint (the jobs differ in a shared setting)", self.job_fingerprint, other.job_fingerprint),
            ("command", self.command, other.command),
            ("options", self.extra, other.extra),
        ]
        for split in sorted(set(self.data_fingerprint) & set(other.data_fingerprint)):
            mine, theirs = self.data_fingerprint[split], other.data_fingerprint[split]
            checks.append((f"{split} rows", mine.get("rows"), theirs.get("rows")))
            checks.append((f"{split} sample ids", mine.get("sample_ids_digest"), theirs.get("sample_ids_digest")))
            checks.append((f"{split} PSI intersection", mine.get("psi_digest"), theirs.get("psi_digest")))
        for what, mine_value, their_value in checks:
            if mine_value != their_value:
                return f"{what}: here {mine_value}, peer {their_value}"
        return None


def session_id(leader: Hello, follower: Hello) -> str:
    """The id of the session two Hellos open: both sides derive it, neither can pick it alone."""
    return hashlib.sha256(f"{leader.nonce}:{follower.nonce}".encode()).hexdigest()[:16]


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


def meet(job: JobSpec, role: str, peer: Peer, mine: Hello) -> Hello:
    """Send our Hello, take the peer's; a peer that is not the job's other party, or differs in anything both
    must share, stops the run here (train, eval, infer and psi alike)."""
    theirs = peer.handshake(mine)
    peer_role = job.peer_role(role)
    if theirs.role != peer_role or theirs.name != job.party(peer_role).name:
        raise ProtocolError(f"handshake: expected the {peer_role} {job.party(peer_role).name!r}, "
                            f"met {theirs.role} {theirs.name!r}")
    problem = mine.mismatch(theirs)
    if problem:
        raise ProtocolError(f"handshake with the {peer_role}: {problem}")
    return theirs
