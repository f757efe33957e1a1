"""The message protocol between the parties: every message kind, what it carries, and its checks.

The parties form a star: the leader (the label party) and each follower; followers never talk to each other.
Before any batch every follower sends the leader its `Hello`; once the leader has them all it answers each
with its own, whose `group` lists every follower's nonce in the job's order (`meet` checks them all). Each
Hello carries a fresh random nonce; all the nonces make the session id (`session_id`) that every later
message carries, so a message from an earlier session (a stale resend from a previous process) is never
applied. After a failure a party sends an abort with a reason. Every other message is one `Kind`, keyed by
`BatchKey(phase, epoch, step)`, between the leader and one follower:

    kind            sender -> receiver    phase(s)             tensors                          check
    embeddings      follower -> leader    train, eval, infer   the follower's cut, e.g.          check_cut_tensors
                                                               {"wide": float32 [B, 1], "deep": float32 [B, 1]}
                                                               (Wide&Deep) or {"cut": float32 [B, cut_dim]} (mlp):
                                                               `PartyContext.cut_widths`, 1 <= B <= batch
    gradients       leader -> follower    train                the same names and shapes         check_cut_tensors
    selection       leader -> follower    eval (step 0, after  {"best_step": int64 [1] (>= 1),   check_selection
                                          each epoch's          "stop": int64 [1] (0 or 1)}
                                          validation)
    psi_blinded     both ways             psi                  {"points": uint8 [n, 32]},        check_points
    psi_reblinded   both ways             psi                  1 <= n <= psi.batch_size
    psi_common      leader -> follower    psi (after the       {"mask": uint8 [n]}: bits over    check_mask
                                          pairwise rounds)     the pair's intersection, in its
                                                               agreed order: 1 = in every party's

With the job's `privacy.quantize.embeddings` (or `.gradients`) set, that kind's tensors travel as
`QuantizedTensor`s of the same shapes and exactly those bits instead: the loop quantises before `send` and
dequantises after `receive`, peers and transport only carry them (`WireTensor`).

`selection` tells each follower which step is the best so far and whether to stop early, so that all keep the
same checkpoint for eval and infer (`selection_message` builds it, `read_selection` reads it back).

A party receives its cut-layer kind (`RECEIVES`), its control kinds (`CONTROL`) and both PSI kinds
(`accepted_kinds`); `check_message` refuses any other kind and runs the kind's check on what it receives.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from vfl_cli.errors import ProtocolError
from vfl_cli.privacy.quantize import QuantizedTensor

if TYPE_CHECKING:
    from vfl_cli.party import PartyContext
    from vfl_cli.peer import Grid

PROTOCOL_VERSION = 3
Kind = Literal["embeddings", "gradients", "selection", "psi_blinded", "psi_reblinded", "psi_common"]
Phase = Literal["train", "eval", "infer", "psi"]
Side = Literal["leader", "follower"]  # which half of the protocol a party runs
KINDS: tuple[Kind, ...] = ("embeddings", "gradients", "selection", "psi_blinded", "psi_reblinded", "psi_common")
# "selection": after each epoch's validation, the leader tells the follower which step is the best so far and
# whether to stop early (int64 [1] each), so that both keep the same checkpoint for eval and infer
SELECTION_TENSORS = ("best_step", "stop")
PSI_KINDS: tuple[Kind, ...] = ("psi_blinded", "psi_reblinded")  # both parties send and receive these
PHASES: tuple[Phase, ...] = ("train", "eval", "infer", "psi")
PSI_POINTS = "points"  # the one tensor of a PSI message: uint8 [n, 32], n ristretto255 points
POINT_BYTES = 32  # a ristretto255 point
PSI_MASK = "mask"  # the one tensor of a psi_common message: uint8 [n], bits packed big-endian (np.packbits)
RECEIVES: dict[Side, Kind] = {"leader": "embeddings", "follower": "gradients"}  # the cut-layer kind each takes
CONTROL: dict[Side, tuple[Kind, ...]] = {"leader": (), "follower": ("selection", "psi_common")}  # and control kinds
WireTensor = torch.Tensor | QuantizedTensor  # what one named tensor of a message may be
WireTensors = dict[str, WireTensor]  # the tensors of one message, by name


@dataclass(frozen=True, order=True)
class BatchKey:
    phase: Phase
    epoch: int
    step: int

    def __str__(self) -> str:
        return f"{self.phase} epoch {self.epoch} step {self.step}"


# -------------------------------------------------------------------------------------------------- the handshake


@dataclass(frozen=True)
class Hello:
    """What each side announces before any work; any difference in the shared parts stops both sides."""

    role: str  # the party's key in the job, e.g. "leader", "follower2"
    name: str  # the party's name in the job (its certificate's CN)
    job_fingerprint: str  # JobSpec.fingerprint()
    data_fingerprint: dict[str, dict[str, int | str]]  # split -> {"rows": N, "sample_ids_digest": hex}
    command: str  # "train", "eval" or "infer": both sides must be running the same one
    run_id: str = ""  # the training run this side's checkpoints belong to ("" = none yet)
    checkpoint_steps: tuple[int, ...] = ()  # global steps of the checkpoints it holds for run_id, oldest first
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))  # fresh per handshake: see session_id
    protocol: int = PROTOCOL_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # e.g. the split that eval/infer reads
    group: tuple[str, ...] = ()  # the leader's: every follower's nonce, in the job's order (see session_id)

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


def session_id(leader: Hello) -> str:
    """The id of the session that the leader's Hello opens: from every party's nonce (the leader's and, in its
    `group`, each follower's), so that no party can pick it alone."""
    return hashlib.sha256(":".join((leader.nonce, *leader.group)).encode()).hexdigest()[:16]


Reply = Callable[[dict[str, Hello]], Hello]  # the leader's: every follower's Hello -> the Hello it answers with
Answer = Callable[[Hello, dict[str, Hello]], Hello]  # the same, given the leader's own Hello too


def meet(ctx: PartyContext, grid: Grid, mine: Hello, answer: Answer | None = None) -> dict[str, Hello]:
    """Exchange Hellos with every peer (a follower: the leader; the leader: every follower) and return theirs by
    party key; the leader answers with `answer(mine, theirs)` (default `mine`). A peer that is not the job's
    party, or differs in anything all must share, stops the run here (train, eval, infer and psi alike). Every
    party checks what it received itself, after the exchange, so that a follower whose job differs stops with
    the difference, as the leader does; the leader's stop then reaches every other follower as an abort."""
    theirs = grid.handshake(mine, (lambda hellos: answer(mine, hellos)) if answer else (lambda _: mine))
    for key, hello in theirs.items():
        _check_peer(ctx, key, mine, hello)
    return theirs


def _check_peer(ctx: PartyContext, key: str, mine: Hello, theirs: Hello) -> None:
    expected = ctx.peers[key].name
    if theirs.role != key or theirs.name != expected:
        raise ProtocolError(f"handshake: expected the {key} {expected!r}, met {theirs.role} {theirs.name!r}")
    problem = mine.mismatch(theirs)
    if problem:
        raise ProtocolError(f"handshake with the {key}: {problem}")


# -------------------------------------------------------------------------------------------------- the checks


def accepted_kinds(side: Side) -> tuple[Kind, ...]:
    """The kinds a party on `side` receives: its cut-layer kind, its control kinds and both PSI kinds."""
    return (RECEIVES[side], *CONTROL[side], *PSI_KINDS)


def check_message(ctx: PartyContext, kind: str, tensors: WireTensors) -> None:
    """Refuse (ProtocolError) a message of `kind` that party `ctx` does not receive, or whose tensors are not
    what that kind carries in this job. All parties run the same job (its fingerprint is checked on every
    message), so the cut widths and the quantisation bits are known here."""
    job, accepts = ctx.job, accepted_kinds(ctx.side)
    if kind not in accepts:
        raise ProtocolError(f"this {ctx.side} receives {', '.join(accepts)}, not {kind}")
    if kind in PSI_KINDS:
        check_points(tensors, job.psi.batch_size)
    elif kind == "psi_common":
        check_mask(tensors, job.psi.batch_size)
    elif kind == "selection":
        check_selection(tensors)
    else:
        quantize = job.privacy.quantize
        bits = quantize.embeddings if kind == "embeddings" else quantize.gradients
        # both ways: a follower's cut outputs, then the gradients for them
        check_cut_tensors(tensors, ctx.cut_widths, job.train.batch_size, bits)


def check_cut_tensors(tensors: WireTensors, widths: dict[str, int], max_batch: int, bits: int | None = None) -> None:
    """Exactly the job's cut-layer tensors (`widths`: name -> width), each [B, width] with the same
    1 <= B <= batch size: float32 when `bits` is None, else QuantizedTensors of exactly `bits` bits (finiteness
    and packing are checked by the codec)."""
    _exactly(tensors, tuple(widths))
    expected = "float32" if bits is None else f"{bits}-bit quantised"
    batch = None
    for name, width in widths.items():
        tensor = tensors[name]
        got = _describe(tensor)
        if got.removeprefix("dtype ") != expected:
            raise ProtocolError(f"tensors.{name}: {got}, expected {expected}")
        shape = list(tensor.shape)
        if len(shape) != 2 or shape[1] != width:
            raise ProtocolError(f"tensors.{name}: shape {shape}, expected [B, {width}]")
        if not 1 <= shape[0] <= max_batch:
            raise ProtocolError(f"tensors.{name}: batch of {shape[0]}, expected 1..{max_batch}")
        if batch is not None and shape[0] != batch:
            raise ProtocolError(f"tensors: batch sizes differ ({batch} and {shape[0]})")
        batch = shape[0]


def check_selection(tensors: WireTensors) -> None:
    """Exactly best_step and stop, each int64 [1]; stop is 0 or 1, best_step at least 1 (an epoch end)."""
    _exactly(tensors, SELECTION_TENSORS)
    for name in SELECTION_TENSORS:
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tuple(tensor.shape) != (1,):
            raise ProtocolError(f"tensors.{name}: expected int64 [1]")
    if int(tensors["stop"][0]) not in (0, 1) or int(tensors["best_step"][0]) < 1:  # type: ignore[index]
        raise ProtocolError("tensors: stop must be 0 or 1 and best_step at least 1")


def check_points(tensors: WireTensors, max_batch: int) -> None:
    """Exactly one tensor of 1 <= n <= psi.batch_size encoded points, uint8 [n, 32] (whether each is a valid
    point is checked by the PSI step that uses it)."""
    _exactly(tensors, (PSI_POINTS,))
    points = tensors[PSI_POINTS]
    got = _describe(points).removeprefix("dtype ")  # points are never quantised
    if got != "uint8" or len(points.shape) != 2 or points.shape[1] != POINT_BYTES:
        raise ProtocolError(f"tensors.{PSI_POINTS}: {got} {list(points.shape)}, expected uint8 [n, {POINT_BYTES}]")
    if not 1 <= points.shape[0] <= max_batch:
        raise ProtocolError(f"tensors.{PSI_POINTS}: {points.shape[0]} points, expected 1..{max_batch}")


def check_mask(tensors: WireTensors, max_bytes: int) -> None:
    """Exactly one tensor of 1 <= n <= psi.batch_size bytes, uint8 [n] (its length against the pair's
    intersection is checked by the PSI step that reads it)."""
    _exactly(tensors, (PSI_MASK,))
    mask = tensors[PSI_MASK]
    got = _describe(mask).removeprefix("dtype ")
    if got != "uint8" or len(mask.shape) != 1 or not 1 <= mask.shape[0] <= max_bytes:
        raise ProtocolError(f"tensors.{PSI_MASK}: {got} {list(mask.shape)}, expected uint8 [1..{max_bytes}]")


def _exactly(tensors: WireTensors, names: tuple[str, ...]) -> None:
    """The message holds exactly these named tensors, no more, no fewer."""
    if set(tensors) != set(names):
        got = ", ".join(sorted(name[:40] for name in tensors)) or "none"
        raise ProtocolError(f"tensors: expected exactly {', '.join(names)}; got {got}")


def _describe(tensor: WireTensor) -> str:
    """What a tensor travels as, in the words of a refusal: "dtype float32", "dtype uint8", "6-bit quantised"."""
    if isinstance(tensor, QuantizedTensor):
        return f"{tensor.bits}-bit quantised"
    return f"dtype {str(tensor.dtype).removeprefix('torch.')}"


# -------------------------------------------------------------------------------------------------- selection


def selection_message(best_step: int, stop: bool) -> WireTensors:
    """The leader's `selection` message: the best step so far and whether to stop, int64 [1] each."""
    return {"best_step": torch.tensor([best_step]), "stop": torch.tensor([int(stop)])}


def read_selection(tensors: WireTensors) -> tuple[int, bool]:
    """(best_step, stop) of a `selection` message (the server checked it with `check_selection`)."""
    return int(tensors["best_step"][0]), bool(tensors["stop"][0])  # type: ignore[index]
