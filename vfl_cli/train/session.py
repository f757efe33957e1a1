"""A party's session: open its data, build its model, shake hands with the peer, then train, evaluate or
infer. `run_local` runs both parties in one process (two threads joined by a `LocalPeer`)."""

from __future__ import annotations

import csv
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from data_prep.store import open_party
from vfl_cli.checkpoint import checkpoint_path, load_checkpoint
from vfl_cli.errors import DataError, PeerAborted, ProtocolError
from vfl_cli.job import JobSpec
from vfl_cli.peer import Hello, LocalPeer, Peer
from vfl_cli.train.loop import EvalResult, PartyRun, Reporter, SilentReporter, forward_split, train
from vfl_cli.train.parties import build_party, pick_device

T = TypeVar("T")


def open_run(job: JobSpec, role: str, peer: Peer, reporter: Reporter | None = None) -> PartyRun:
    spec = job.party(role)
    data = open_party(job.data.dir, role)
    if data.meta.fields != spec.fields:
        raise DataError(
            f"{data.dir}: prepared for fields {', '.join(data.meta.fields)}, but the job gives the {role} "
            f"{', '.join(spec.fields)}; run `vfl prep criteo` again"
        )
    if role == "leader" and not data.meta.has_labels:
        raise DataError(f"{data.dir}: the leader's data has no labels")
    party = build_party(job, role, data.meta, pick_device(spec.device))
    return PartyRun(job, role, data, party, peer, reporter or SilentReporter(), job.train.run_dir / role)


def handshake(run: PartyRun, command: str, resume_epoch: int = 0, extra: dict[str, str] | None = None) -> Hello:
    """Exchange Hellos; any difference in what both sides must share stops the run here."""
    mine = Hello(
        role=run.role,
        name=run.job.party(run.role).name,
        job_fingerprint=run.job.fingerprint(),
        data_fingerprint={split: run.data.fingerprint(split) for split in run.data.meta.splits},
        command=command,
        resume_epoch=resume_epoch,
        extra=extra or {},
    )
    theirs = run.peer.handshake(mine)
    peer_role = run.job.peer_role(run.role)
    if theirs.role != peer_role or theirs.name != run.job.party(peer_role).name:
        raise ProtocolError(f"handshake: expected the {peer_role} {run.job.party(peer_role).name!r}, "
                            f"met {theirs.role} {theirs.name!r}")
    problem = mine.mismatch(theirs)
    if problem:
        raise ProtocolError(f"handshake with the {peer_role}: {problem}")
    return theirs


def resume_point(run: PartyRun, restart: bool) -> int:
    """Epochs already done according to this party's checkpoint (0 when there is none or on restart)."""
    path = checkpoint_path(run.job.train.run_dir, run.role)
    if restart or not path.exists():
        return 0
    payload = load_checkpoint(path, run.job.fingerprint())
    run.party.load_state_dict(payload["state"])
    return int(payload["epochs_done"])


def load_trained(run: PartyRun, run_dir: Path) -> None:
    payload = load_checkpoint(checkpoint_path(run_dir, run.role), run.job.fingerprint())
    run.party.load_state_dict(payload["state"])


def train_session(run: PartyRun, restart: bool = False) -> list[tuple[int, float, EvalResult | None]]:
    start_epoch = resume_point(run, restart)
    handshake(run, "train", start_epoch)
    return list(train(run, start_epoch))


def eval_session(run: PartyRun, run_dir: Path, split: str) -> EvalResult | None:
    load_trained(run, run_dir)
    handshake(run, "eval", extra={"split": split})
    return forward_split(run, split, "eval", 0)


def infer_session(run: PartyRun, run_dir: Path, split: str, out: Path | None) -> EvalResult | None:
    load_trained(run, run_dir)
    handshake(run, "infer", extra={"split": split})
    result = forward_split(run, split, "infer", 0)
    if result is not None and out is not None:
        write_predictions(out, result)
    return result


def write_predictions(out: Path, result: EvalResult) -> None:
    """sample_id,probability per row; written to a temp file and renamed, so a crash leaves no half file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as exc:
        raise DataError(f"{out}: cannot write predictions ({exc.strerror})") from exc
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["sample_id", "probability"])
            probabilities = (f"{p:.6f}" for p in result.probabilities.tolist())
            writer.writerows(zip(result.sample_ids.tolist(), probabilities, strict=True))
        os.replace(temp_name, out)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def run_local(
    job: JobSpec,
    session: Callable[[PartyRun], T],
    reporters: dict[str, Reporter] | None = None,
) -> dict[str, T]:
    """Run `session` for the leader (this thread) and the follower (a second thread) joined in memory.
    A failure on one side aborts the other, so neither waits out its timeout."""
    leader_peer, follower_peer = LocalPeer.pair(job.transport.timeout_s)
    reporters = reporters or {}
    runs = {
        "leader": open_run(job, "leader", leader_peer, reporters.get("leader")),
        "follower": open_run(job, "follower", follower_peer, reporters.get("follower")),
    }
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run_side(role: str) -> None:
        try:
            results[role] = session(runs[role])
        except BaseException as exc:
            errors[role] = exc
            runs[role].peer.abort(f"{role} failed: {exc}")

    follower = threading.Thread(target=run_side, args=("follower",), name="vfl-follower", daemon=True)
    follower.start()
    run_side("leader")
    follower.join()
    # Report the side that failed first, not the other side's "the peer stopped".
    first = next((e for e in errors.values() if not isinstance(e, PeerAborted)), None)
    if first is not None or errors:
        raise first or next(iter(errors.values()))
    return results


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
