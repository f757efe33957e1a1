"""Checkpoints, and the one training history both parties agree on.

Each party keeps its own files; only the handshake's `Hello` (run id, steps held) crosses the wire:

    <run_dir>/<role>/run.json                    {"run_id": ...}: the run this party's checkpoints belong to
    <run_dir>/<role>/checkpoint-<step:09d>.pt    {format, job, run_id, step, epoch, epoch_step, state}

`step` counts training steps since the start of the run: a checkpoint at step g holds the state after g
steps. The run id is fixed when a run starts (at its first handshake) and never changes while it is
resumed. Every file is written atomically (temp file, flush, fsync, rename, fsync of the directory), so a
crash leaves either the old set of files or the new one, never half a checkpoint; the newest `KEEP` stay.
Files load with `weights_only=True`, so a checkpoint can never run code.

Each file is torch.save's bytes followed by a trailer, `\nvfl-sha256:<64 hex digits>\n`, the SHA-256 of
those bytes (torch's zip reader ignores what follows the archive, so the file still `torch.load`s). Every
read checks it first, as it checks readability: a file that fails is not held in training (one warning
naming it; the parties agree on an older step, as for a truncated file) and is refused by eval, infer and the
baselines (CheckpointError). Files written before the digest (format 2) have none: they load with a warning,
so a run trained then still resumes and evaluates; a format-3 file without its trailer is refused.

At the handshake, `agree(leader, *followers)` picks the newest step every party holds (step 0, the seeded
initial weights, is held by every party on the run); all roll back to it. Two different histories are
refused. The leader decides over every follower's Hello and answers each with the outcome (`agreed_hello`),
so a follower, which sees the leader's Hello alone, computes the same agreement. `vfl eval`/`vfl infer` use
each party's newest checkpoint and `same_checkpoint` refuses parties whose checkpoints differ.

Errors: two sides whose runs or checkpoints differ -> ProtocolError (exit 5, a handshake mismatch; each
file alone is fine); a checkpoint that is missing, unreadable, corrupt or from another job -> CheckpointError
(exit 6), one line naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from vfl_cli.errors import CheckpointError, ProtocolError
from vfl_cli.protocol import Hello
from vfl_cli.train.batches import Position

FORMAT_VERSION = 3  # 3: with the digest trailer
UNDIGESTED_FORMAT = 2  # written before the trailer: loaded unchecked, with a warning
DIGEST_TAG = b"\nvfl-sha256:"  # the trailer is DIGEST_TAG, the hex SHA-256 of all bytes before it, b"\n"
TRAILER_SIZE = len(DIGEST_TAG) + 64 + 1
CORRUPT = "corrupt: its bytes do not match the SHA-256 digest saved with them"
KEEP = 2  # the parties can be at most one checkpoint apart (see `agree`), so two always share one
RUN_FILE = "run.json"
SELECTED_FILE = "selected.pt"  # a hard link to the best-validation epoch's checkpoint (data.valid_fraction > 0)
SELECTED_RECORD = "selected.json"  # {run_id, step, epoch, valid_score} of that checkpoint: the record is what counts
FILE_PATTERN = re.compile(r"checkpoint-(\d{9})\.pt")
TEMP_PREFIX = ".tmp-"  # a leftover from a crash mid-write; never matches FILE_PATTERN
RESTART_HINT = "rerun `vfl train` on every party with --restart to start over"

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return secrets.token_hex(8)


def short(run_id: str) -> str:
    """A run id as people read it: its first 8 hex digits."""
    return run_id[:8] or "(none)"


def file_name(step: int) -> str:
    return f"checkpoint-{step:09d}.pt"


# ------------------------------------------------------------------------------------------- the files


def _write_atomically(path: Path, write: Any) -> None:
    """Write through `write(file)` to a temp file beside `path`, make it durable, then rename it over `path`."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(handle, "w+b") as file:  # readable too: a checkpoint's digest is of the bytes on disk
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory: without this fsync a power cut can undo it.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trailer(file: IO[bytes], size: int) -> bytes:
    """The trailer for the first `size` bytes of `file`, hashed in chunks: a checkpoint can be gigabytes."""
    file.seek(0)
    digest = hashlib.sha256()
    while size > 0 and (chunk := file.read(min(size, 1 << 20))):
        digest.update(chunk)
        size -= len(chunk)
    return DIGEST_TAG + digest.hexdigest().encode() + b"\n"


def _save_with_digest(payload: dict[str, Any], file: IO[bytes]) -> None:
    """torch.save `payload`, then append the trailer: the digest of exactly the bytes now in the file."""
    torch.save(payload, file)
    file.flush()
    size = file.seek(0, os.SEEK_END)
    trailer = _trailer(file, size)
    file.seek(size)
    file.write(trailer)


def _digested(path: Path) -> bool:
    """Whether `path` ends with a digest trailer; CheckpointError when it does and the bytes do not match."""
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size < TRAILER_SIZE:
            return False
        file.seek(size - TRAILER_SIZE)
        trailer = file.read(TRAILER_SIZE)
        if not trailer.startswith(DIGEST_TAG):
            return False
        if _trailer(file, size - TRAILER_SIZE) != trailer:
            raise CheckpointError(f"{path}: {CORRUPT}")
    return True


def _read(path: Path, mmap: bool = False, warn_undigested: bool = True) -> dict[str, Any]:
    """The payload of one checkpoint file, its digest checked before torch reads a byte; anything else is a
    one-line CheckpointError naming the file. `warn_undigested`: say so when a file from before the digest is
    loaded (not when merely listed, so that a resume says it once)."""
    try:
        digested = _digested(path)
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no checkpoint here") from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]  # an empty file raises a bare EOFError
        raise CheckpointError(f"{path}: not a readable vfl checkpoint ({reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT_VERSION, UNDIGESTED_FORMAT):
        raise CheckpointError(f"{path}: not a vfl checkpoint of format {FORMAT_VERSION}")
    if not digested and payload["format"] == FORMAT_VERSION:  # its trailer cut off or damaged
        raise CheckpointError(f"{path}: corrupt: its SHA-256 digest is missing (the file ends early or was altered)")
    if not digested and warn_undigested:
        log.warning("%s: written before checkpoints carried a digest; loaded unchecked", path)
    return payload


def _check_job(path: Path, payload: dict[str, Any], job_fingerprint: str) -> dict[str, Any]:
    if payload.get("job") != job_fingerprint:
        raise CheckpointError(
            f"{path}: made by another job (fingerprint {payload.get('job')}, this job {job_fingerprint}); "
            f"{RESTART_HINT}"
        )
    return payload


class CheckpointStore:
    """One party's checkpoints in one directory (`<run_dir>/<role>`)."""

    def __init__(self, directory: Path, job_fingerprint: str) -> None:
        self.directory = directory
        self.job_fingerprint = job_fingerprint

    def run_id(self) -> str | None:
        """The run recorded in run.json, or None when this party has not started one."""
        path = self.directory / RUN_FILE
        try:
            run_id = json.loads(path.read_text())["run_id"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a readable vfl run file ({exc}); {RESTART_HINT}") from exc
        if not isinstance(run_id, str) or not run_id:
            raise CheckpointError(f"{path}: not a readable vfl run file (no run id); {RESTART_HINT}")
        return run_id

    def _files(self) -> dict[int, Path]:
        """step -> path of every checkpoint file here, whatever run it belongs to."""
        if not self.directory.is_dir():
            return {}
        found = (FILE_PATTERN.fullmatch(p.name) for p in self.directory.iterdir())
        return {int(m.group(1)): self.directory / m.group(0) for m in found if m}

    def steps(self, run_id: str) -> tuple[int, ...]:
        """Steps of the newest KEEP readable checkpoints of `run_id`, oldest first (what a Hello offers). A file
        of another job is an error (it must not be thrown away silently); an unreadable one, or one of another
        run, is not held."""
        held = []
        for step, path in sorted(self._files().items()):
            try:
                # mmap: torch reads the header, not the weights (the digest check reads every byte)
                payload = _read(path, mmap=True, warn_undigested=False)
            except CheckpointError as exc:
                log.warning("%s; not counted as held", exc)
                continue
            _check_job(path, payload, self.job_fingerprint)
            if payload.get("run_id") == run_id and payload.get("step") == step:
                held.append(step)
        return tuple(held[-KEEP:])

    def load(self, run_id: str, step: int) -> dict[str, Any]:
        path = self.directory / file_name(step)
        payload = _check_job(path, _read(path), self.job_fingerprint)
        if payload.get("run_id") != run_id or payload.get("step") != step:
            raise CheckpointError(f"{path}: holds run {short(str(payload.get('run_id')))} step "
                                  f"{payload.get('step')}, expected run {short(run_id)} step {step}")
        return payload

    def newest(self) -> dict[str, Any]:
        """The newest checkpoint of this party's run (what `vfl eval` and `vfl infer` use)."""
        run_id = self.run_id()
        if run_id is None:
            raise CheckpointError(f"{self.directory}: no checkpoint here; run `vfl train` first")
        for step, path in sorted(self._files().items(), reverse=True):
            payload = _check_job(path, _read(path, mmap=True), self.job_fingerprint)
            if payload.get("run_id") == run_id and payload.get("step") == step:
                return payload
        raise CheckpointError(f"{self.directory}: no checkpoint of run {short(run_id)} yet; "
                              "run `vfl train` until it writes one")

    def begin(self, run_id: str, step: int, held: tuple[int, ...]) -> None:
        """Record the agreed run and roll the files back to `step`: what lies beyond it, or belongs to
        another run, is another history and goes. run.json first, so a crash halfway leaves foreign files
        that are ignored, never our run without its record."""
        try:
            recorded = self.run_id()
        except CheckpointError:  # an unreadable run.json (seen before, unless on --restart) is replaced
            recorded = None
        if recorded != run_id:
            _write_atomically(self.directory / RUN_FILE, lambda f: f.write(json.dumps({"run_id": run_id}).encode()))
        for old_step, path in self._files().items():
            if old_step > step or old_step not in held:
                path.unlink(missing_ok=True)
        for temp in self.directory.glob(f"{TEMP_PREFIX}*"):
            temp.unlink(missing_ok=True)
        selected = self.selected(run_id)
        if selected is None or selected["step"] > step:  # another run's, or from the history beyond `step`
            self.drop_selected()

    # -- model selection: the best-validation epoch's checkpoint, kept whatever newer ones come and go

    def select(self, run_id: str, step: int, epoch: int, valid_score: float | None,
               valid_tiebreak: float | None = None) -> None:
        """Keep the checkpoint at `step` (just saved) as the selected one: a hard link, so no copy of the
        weights; the record is written last, so a crash in between leaves the previous selection's record,
        which no longer matches the linked file and is then ignored."""
        temp = self.directory / f"{TEMP_PREFIX}selected"
        temp.unlink(missing_ok=True)
        os.link(self.directory / file_name(step), temp)
        os.replace(temp, self.directory / SELECTED_FILE)
        record = {"run_id": run_id, "step": step, "epoch": epoch, "valid_score": valid_score,
                  "valid_tiebreak": valid_tiebreak}
        _write_atomically(self.directory / SELECTED_RECORD, lambda f: f.write(json.dumps(record).encode()))

    def selected(self, run_id: str) -> dict[str, Any] | None:
        """The selection record of `run_id` ({run_id, step, epoch, valid_score: the task's primary metric,
        valid_tiebreak: its tiebreak metric}), or None. A record from before tasks existed names it valid_auc."""
        try:
            record = json.loads((self.directory / SELECTED_RECORD).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("run_id") != run_id or not isinstance(record.get("step"), int):
            return None
        if "valid_auc" in record:
            record["valid_score"] = record.pop("valid_auc")
        return record

    def load_selected(self) -> dict[str, Any] | None:
        """The selected checkpoint of this party's run, or None when there is none (no validation split, or no
        epoch finished yet)."""
        run_id = self.run_id()
        record = self.selected(run_id) if run_id else None
        if record is None:
            return None
        path = self.directory / SELECTED_FILE
        payload = _check_job(path, _read(path), self.job_fingerprint)
        if payload.get("run_id") != run_id or payload.get("step") != record["step"]:
            return None  # a crash between the link and the record: the record's checkpoint is not there
        return payload

    def drop_selected(self) -> None:
        (self.directory / SELECTED_RECORD).unlink(missing_ok=True)
        (self.directory / SELECTED_FILE).unlink(missing_ok=True)

    def save(self, run_id: str, step: int, epoch: int, epoch_step: int, state: dict[str, Any]) -> Path:
        """Write the checkpoint at `step`, then drop all but the newest KEEP (only once the new one is safe)."""
        payload = {"format": FORMAT_VERSION, "job": self.job_fingerprint, "run_id": run_id, "step": step,
                   "epoch": epoch, "epoch_step": epoch_step, "state": state}
        path = self.directory / file_name(step)
        _write_atomically(path, lambda f: _save_with_digest(payload, f))
        for old_step in sorted(self._files())[:-KEEP]:
            (self.directory / file_name(old_step)).unlink(missing_ok=True)
        return path


# ------------------------------------------------------------------ the agreement between the parties


@dataclass(frozen=True)
class Agreement:
    """The history both parties continue: run `run_id` from the state after `step` steps."""

    run_id: str
    step: int
    resumed: bool  # True: both were on this run already; False: it starts here


def _holdings(hello: Hello) -> str:
    if not hello.checkpoint_steps:
        return f"the {hello.role} holds no checkpoint (run {short(hello.run_id)})"
    return f"the {hello.role} holds run {short(hello.run_id)} at steps {', '.join(map(str, hello.checkpoint_steps))}"


def agree(leader: Hello, *followers: Hello) -> Agreement:
    """The newest step every party holds: a pure function of the Hellos, so every party computes it alike.

    - one run: the newest step in every list, else 0 (every party on the run holds the initial weights);
    - different runs, and no party holds a checkpoint: a fresh run, under the leader's run id;
    - different runs otherwise: refused, since a party would have to throw away or invent a history.

    All parties checkpoint at the same steps and each step needs every follower's tensors, so a party is at
    most one checkpoint ahead of another; keeping two files per party therefore always leaves a step in common.
    """
    hellos = (leader, *followers)
    if leader.run_id and all(h.run_id == leader.run_id for h in followers):
        common = set.intersection(*(set(h.checkpoint_steps) for h in hellos))
        return Agreement(leader.run_id, max(common | {0}), resumed=True)
    if not any(h.checkpoint_steps for h in hellos):
        return Agreement(leader.run_id, 0, resumed=False)
    raise ProtocolError(
        f"the parties hold different training runs: {'; '.join(_holdings(h) for h in hellos)}: {RESTART_HINT} "
        "(--restart on one side alone is refused like this)"
    )


def agreed_hello(leader: Hello, followers: Sequence[Hello]) -> Hello:
    """The Hello the leader answers every follower with in `vfl train`: the agreement over all the Hellos as its
    run and steps, so that `agree(answer, follower)` at each follower is the leader's `agree(leader, *followers)`.
    Where the parties hold different runs, its own Hello: each follower then finds the difference itself, and
    the leader stops the others."""
    try:
        agreed = agree(leader, *followers)
    except ProtocolError:
        return leader
    return dataclasses.replace(leader, run_id=agreed.run_id, checkpoint_steps=(agreed.step,) if agreed.step else ())


def _where(step: int, steps_per_epoch: int | None) -> str:
    if steps_per_epoch is None:  # data without a training split (new customers to score)
        return f"step {step}"
    return str(Position.at(step, steps_per_epoch))  # e.g. "step 40 (epoch 2 step 10)"


def same_checkpoint(leader: Hello, *followers: Hello, steps_per_epoch: int | None) -> None:
    """`vfl eval`/`vfl infer` read one model: every party's newest checkpoint must be the same run and step.
    Each Hello carries its checkpoint as (run_id, (step,)); run_id "" means the party has none."""
    for hello in (leader, *followers):
        if not hello.run_id or not hello.checkpoint_steps:
            raise CheckpointError(f"the {hello.role} has no usable checkpoint (missing, or refused there: its own "
                                  "error names the file): run `vfl train` on every party first")
    leader_step = leader.checkpoint_steps[-1]
    for other in followers:
        step = other.checkpoint_steps[-1]
        if leader.run_id != other.run_id:
            leader_at, other_at = _where(leader_step, steps_per_epoch), _where(step, steps_per_epoch)
            raise ProtocolError(
                f"checkpoints differ: the {leader.role}'s is of run {short(leader.run_id)} {leader_at}, "
                f"the {other.role}'s of another run, {short(other.run_id)} {other_at}; "
                "rerun `vfl train` on every party with --restart"
            )
        if leader_step != step:
            (newer, newer_step), (older, older_step) = sorted(
                ((leader.role, leader_step), (other.role, step)), key=lambda side: -side[1]
            )
            raise ProtocolError(
                f"checkpoints differ: the {newer}'s is newer than the {older}'s: run {short(leader.run_id)} "
                f"{_where(newer_step, steps_per_epoch)} against {_where(older_step, steps_per_epoch)}; "
                "rerun `vfl train` on every party so they finish the same step"
            )
