"""`vfl psi` for one party: its table's customer ids through the PSI with the peer, over any `Peer` (HTTPS,
or in memory for `--role local`), then its rows of the intersection written as aligned training data.

The rounds, the same loop on both sides (batch i of each side's points, `psi.batch_size` ids each):

    send my blinded batch i                      (if I have one)
    receive the peer's blinded batch i, reblind it with my k, send it back   (if the peer has one)
    receive my batch i back, reblinded by the peer                            (if I have one)

Each side only ever waits for what the other sent in the same round, so the bounded inboxes never block
both. The numbers of ids are announced in the Hellos: a batch of another size than announced is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.align import write_aligned
from data_prep.store import TableData, open_table, table_dir
from vfl_cli.errors import DataError, ProtocolError
from vfl_cli.job import JobSpec, Role
from vfl_cli.party import PartyContext
from vfl_cli.peer import LocalPeer, Peer, run_both
from vfl_cli.protocol import PSI_POINTS, BatchKey, Hello, WireTensors, meet
from vfl_cli.psi.group import psi_tag
from vfl_cli.psi.protocol import Intersection, PsiParty, check_min_intersection, check_peer_size
from vfl_cli.reporter import Reporter, SilentReporter


@dataclass(frozen=True)
class PsiOutcome:
    intersection: Intersection
    data_dir: Path  # where the aligned data went: <data.dir>/<role>, or <out>/<role>
    rows: dict[str, int]  # split -> rows written


def _announced(role: str) -> str:
    """The data-fingerprint entry in which a side announces its number of ids (one only it has, so the Hello
    comparison, which looks at entries both sides have, leaves it alone)."""
    return f"psi ids of the {role}"


def open_own_table(job: JobSpec, role: Role, table: Path | None = None) -> TableData:
    """The party's prepared table, if it was prepared for what the job says of this party's columns and labels."""
    data = open_table(table or table_dir(job.data.dir, role))
    meta, schema = data.meta, job.table_schema(role)
    if meta.role != role or meta.fields != schema.fields:
        raise DataError(f"{data.dir}: a {meta.role} table of fields {', '.join(meta.fields) or '(none)'}, but the "
                        f"job gives the {role} {', '.join(schema.fields) or '(none)'}; run `vfl prep table` again")
    kinds = tuple(kind for _, kind in schema.columns)
    if meta.kinds != kinds:
        wrong = [f"{name} {was} there, {kind} in the job"
                 for (name, kind), was in zip(schema.columns, meta.kinds, strict=True) if kind != was]
        raise DataError(f"{data.dir}: the {role}'s table has other column kinds than the job ({'; '.join(wrong)}); "
                        "run `vfl prep table` again")
    if meta.task is not None and meta.task != schema.task:
        raise DataError(f"{data.dir}: the {role}'s table has {meta.task} labels, but the job's task is {schema.task}; "
                        "run `vfl prep table` again")
    return data


def psi_session(
    ctx: PartyContext,
    peer: Peer,
    reporter: Reporter | None = None,
    table: Path | None = None,
    out: Path | None = None,
) -> PsiOutcome:
    """Run the PSI with the peer and write this party's aligned data: train and test splits to
    `<data.dir>/<role>`, or, with `out`, one split `all` to `<out>/<role>` (new customers to score)."""
    job, role, peer_role = ctx.job, ctx.role, ctx.peer_role
    reporter = reporter or SilentReporter()
    data = open_own_table(job, role, table)
    party = PsiParty(role, data.customer_ids(), psi_tag(job.fingerprint()), threads=ctx.spec.threads or 1)
    mine = Hello(role=role, name=ctx.name, job_fingerprint=job.fingerprint(),
                 data_fingerprint={_announced(role): {"rows": party.size}}, command="psi")
    theirs = meet(ctx, peer, mine)
    peer_size = int(theirs.data_fingerprint.get(_announced(peer_role), {}).get("rows", 0))
    check_peer_size(peer_role, peer_size, job.psi.min_intersection)

    peer_double_blinded = _rounds(party, peer, peer_size, job.psi.batch_size, reporter)
    result = party.intersect(peer_double_blinded, peer_size=peer_size)
    check_min_intersection(result, job.psi.min_intersection)
    summary: dict[str, Any] = {"size": result.size, "digest": result.digest(), "my_size": result.my_size,
                               "peer_size": result.peer_size}
    # Both sides now know the common customers' ids: sorted by them, the order (and so the train/test split)
    # is the same on both sides and on every rerun, unlike the PSI's own order, which is new with every key.
    rows = result.rows[np.argsort(data.customer_ids()[result.rows], kind="stable")]
    target = out or job.data.dir
    aligned = write_aligned(data, rows, target, job.seed, None if out else job.data.test_fraction, summary)
    return PsiOutcome(result, target / role, {name: split.rows for name, split in aligned.splits.items()})


def _rounds(party: PsiParty, peer: Peer, peer_size: int, batch_size: int, reporter: Reporter) -> list[np.ndarray]:
    """The exchange; returns the peer's double-blinded values (my reblinding of its points)."""
    my_batches = party.blinded_batches(batch_size)
    mine, theirs = -(-party.size // batch_size), -(-peer_size // batch_size)
    kept: list[np.ndarray] = []
    reporter.begin(f"{party.role} psi", party.size + peer_size)
    for step in range(max(mine, theirs)):
        key = BatchKey("psi", 0, step)
        if step < mine:
            peer.send("psi_blinded", key, {PSI_POINTS: torch.from_numpy(next(my_batches))})
        if step < theirs:
            expected = min(batch_size, peer_size - step * batch_size)
            points = _points(peer.receive("psi_blinded", key), expected, f"the peer's blinded batch {step}")
            kept.append(party.reblind(points))
            peer.send("psi_reblinded", key, {PSI_POINTS: torch.from_numpy(kept[-1])})
            reporter.advance(expected)
        if step < mine:
            expected = min(batch_size, party.size - step * batch_size)
            party.add_my_double_blinded(_points(peer.receive("psi_reblinded", key), expected,
                                                f"our batch {step} returned by the peer"))
            reporter.advance(expected)
    reporter.end()
    return kept


def _points(tensors: WireTensors, expected: int, what: str) -> np.ndarray:
    points = tensors.get(PSI_POINTS)
    if not isinstance(points, torch.Tensor) or points.dtype != torch.uint8 or tuple(points.shape) != (expected, 32):
        shape = f"{str(points.dtype).removeprefix('torch.')} {list(points.shape)}" \
            if isinstance(points, torch.Tensor) else None if points is None else "a quantised tensor"
        raise ProtocolError(f"{what}: {shape}, expected uint8 [{expected}, 32] as the peer announced")
    return points.numpy()


def psi_locally(job: JobSpec, tables: dict[Role, Path] | None = None, out: Path | None = None) -> dict[str, PsiOutcome]:
    """Both parties in this process (two threads, an in-memory peer): `vfl psi --role local`."""
    peers: dict[Role, Peer] = dict(zip(("leader", "follower"), LocalPeer.pair(job.transport.timeout_s), strict=True))
    return run_both({
        role: (partial(psi_session, PartyContext.of(job, role), peers[role], table=(tables or {}).get(role), out=out),
               peers[role])
        for role in peers
    })
