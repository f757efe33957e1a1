"""`vfl psi` for one party: its table's customer ids through the PSI, over any `Grid` (HTTPS, or in memory for
`--role local`), then its rows of the common set written as aligned training data.

With more than one follower the leader runs the two-party PSI below with every follower at once (a thread
and a fresh secret scalar per pair), takes the ids it has in common with every one of them, and tells each follower
which of the pair's common ids are in that set: one `psi_common` bit mask over the pair's intersection in
its agreed order (`psi.batch_size` bytes per message). Every party then sorts its rows of the common set by
customer id: the one order all agree on. What each learns: the leader every pairwise intersection and every
follower's number of ids; a follower the common set (of every party) and the leader's number of ids, never
another follower's ids or count beyond what the common set says.

The rounds of one pair, the same loop on both sides (batch i of each side's points, `psi.batch_size` ids each):

    send my blinded batch i                      (if I have one)
    receive the peer's blinded batch i, reblind it with my k, send it back   (if the peer has one)
    receive my batch i back, reblinded by the peer                            (if I have one)

Each side only ever waits for what the other sent in the same round, so the bounded inboxes never block
both. The numbers of ids are announced in the Hellos: a batch of another size than announced is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.align import write_aligned
from data_prep.store import TableData, open_table, table_dir
from vfl_cli.errors import DataError, ProtocolError
from vfl_cli.grid import Grid, LocalGrid, run_all
from vfl_cli.job import JobSpec, Role
from vfl_cli.party import PartyContext
from vfl_cli.protocol import PSI_MASK, PSI_POINTS, BatchKey, Hello, WireTensors, meet
from vfl_cli.psi.group import psi_tag
from vfl_cli.psi.protocol import Intersection, PsiParty, check_min_intersection, check_peer_size
from vfl_cli.reporter import Reporter, SilentReporter


@dataclass(frozen=True)
class PsiOutcome:
    size: int  # customers in every party's table
    my_size: int  # ids this party put in
    peer_sizes: dict[str, int]  # ids each peer put in, by key (announced in its Hello)
    pairwise: dict[str, int]  # the size of this party's intersection with each peer
    digest: str  # of the common set: the same at every party
    data_dir: Path  # where the aligned data went: <data.dir>/<role>, or <out>/<role>
    rows: dict[str, int]  # split -> rows written
    threads: int = 1  # threads this party's curve arithmetic ran on (`psi_threads`)


def _announced(role: str) -> str:
    """The data-fingerprint entry in which a party announces its number of ids (one only it has, so the Hello
    comparison, which looks at entries both sides have, leaves it alone)."""
    return f"psi ids of the {role}"


def common_digest(tag: bytes, ids: np.ndarray) -> str:
    """sha256 of the common set (the customer ids in the agreed order, which every party holds): equal at every
    party iff they hold the same rows, and part of each aligned split's data fingerprint."""
    h = hashlib.sha256(b"vfl-psi-common-v1\0" + tag)
    h.update(len(ids).to_bytes(8, "big"))
    for cid in ids.tolist():
        h.update(len(cid).to_bytes(4, "big") + cid)
    return h.hexdigest()


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


def psi_threads(ctx: PartyContext) -> int:
    """Threads for this party's curve arithmetic: `psi.threads`, else the party's `threads`, else 1 (rbcl releases
    the GIL, so each thread is a core; with several followers the leader runs this many per pair)."""
    return ctx.job.psi.threads or ctx.spec.threads or 1


def psi_session(
    ctx: PartyContext,
    grid: Grid,
    reporter: Reporter | None = None,
    table: Path | None = None,
    out: Path | None = None,
) -> PsiOutcome:
    """Run the PSI with every peer and write this party's aligned data: train and test splits to
    `<data.dir>/<role>`, or, with `out`, one split `all` to `<out>/<role>` (new customers to score)."""
    job, role = ctx.job, ctx.role
    reporter = reporter or SilentReporter()
    data = open_own_table(job, role, table)
    ids, tag = data.customer_ids(), psi_tag(job.fingerprint())
    mine = Hello(role=role, name=ctx.name, job_fingerprint=job.fingerprint(),
                 data_fingerprint={_announced(role): {"rows": len(ids)}}, command="psi")
    theirs = meet(ctx, grid, mine)
    peer_sizes = {key: int(hello.data_fingerprint.get(_announced(key), {}).get("rows", 0))
                  for key, hello in theirs.items()}
    for key, size in peer_sizes.items():
        check_peer_size(key, size, job.psi.min_intersection)
    reporter.begin(f"{role} psi", sum(len(ids) + size for size in peer_sizes.values()))
    threads = psi_threads(ctx)

    def pair(key: str) -> Intersection:
        party = PsiParty(role, ids, tag, threads=threads, peer=key)  # a fresh scalar per pair
        kept = _rounds(party, grid, key, peer_sizes[key], job.psi.batch_size, reporter)
        found = party.intersect(kept, peer_size=peer_sizes[key])
        check_min_intersection(found, job.psi.min_intersection)
        return found

    pairs = _each_peer(grid, tuple(ctx.peers), pair)
    reporter.end()
    rows = _common_rows(ctx, grid, pairs)
    if len(rows) < job.psi.min_intersection:
        raise DataError(f"only {len(rows):,} customers are in every party's table, fewer than psi.min_intersection "
                        f"= {job.psi.min_intersection:,}; refusing to align")
    # Every party now knows the common customers' ids: sorted by them, the order (and so the train/test split)
    # is the same everywhere and on every rerun, unlike the PSI's own order, which is new with every key.
    rows = rows[np.argsort(ids[rows], kind="stable")]
    digest = common_digest(tag, ids[rows])
    summary: dict[str, Any] = {"size": len(rows), "digest": digest, "my_size": len(ids), "peer_sizes": peer_sizes,
                               "pairwise": {key: pair.size for key, pair in pairs.items()}}
    target = out or job.data.dir
    aligned = write_aligned(data, rows, target, job.seed, None if out else job.data.test_fraction, summary)
    return PsiOutcome(len(rows), len(ids), peer_sizes, summary["pairwise"], digest, target / role,
                      {name: split.rows for name, split in aligned.splits.items()}, threads)


def _each_peer(grid: Grid, peers: tuple[str, ...], work: Callable[[str], Intersection]) -> dict[str, Intersection]:
    """`work(peer)` for every peer at once (the leader: one PSI per follower, so that no follower waits out its
    timeout while the leader works with another; libsodium runs without the GIL). On the first failure every
    peer is told at once, so that no pair is left waiting."""
    if len(peers) == 1:
        return {peers[0]: work(peers[0])}
    pool = ThreadPoolExecutor(len(peers), thread_name_prefix="vfl-psi")
    futures = {key: pool.submit(work, key) for key in peers}
    try:
        return {key: future.result() for key, future in futures.items()}
    except BaseException as exc:
        grid.abort(f"the PSI with a follower failed: {exc}")
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _common_rows(ctx: PartyContext, grid: Grid, pairs: dict[str, Intersection]) -> np.ndarray:
    """My rows (int64) of the ids every party holds. The leader intersects its pairwise results and sends each
    follower its bit mask over their pair's intersection (in the pair's agreed order); a follower applies it."""
    batch = ctx.job.psi.batch_size
    if ctx.is_leader:
        common = pairs[ctx.followers[0]].rows
        for pair in pairs.values():
            common = np.intersect1d(common, pair.rows)
        for key, pair in pairs.items():
            mask = np.packbits(np.isin(pair.rows, common))
            for i, start in enumerate(range(0, len(mask), batch)):
                part: WireTensors = {PSI_MASK: torch.from_numpy(mask[start:start + batch])}
                grid.send(key, "psi_common", BatchKey("psi", 1, i), part)
        return common
    (leader, pair), = pairs.items()
    chunks, nbytes = [], -(-pair.size // 8)
    for i in range(-(-nbytes // batch)):
        chunk = grid.receive(leader, "psi_common", BatchKey("psi", 1, i))[PSI_MASK]
        expected = min(batch, nbytes - i * batch)
        if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != (expected,):
            raise ProtocolError(f"the {leader}'s mask of the common set, part {i}: expected uint8 [{expected}]")
        chunks.append(chunk.numpy())
    bits = np.unpackbits(np.concatenate(chunks))
    if bits[pair.size:].any():
        raise ProtocolError(f"the {leader}'s mask of the common set marks ids beyond our intersection")
    return pair.rows[bits[:pair.size].astype(bool)]


def _rounds(party: PsiParty, grid: Grid, peer: str, peer_size: int, batch_size: int,
            reporter: Reporter) -> list[np.ndarray]:
    """The exchange with `peer`; returns its double-blinded values (my reblinding of its points)."""
    my_batches = party.blinded_batches(batch_size)
    mine, theirs = -(-party.size // batch_size), -(-peer_size // batch_size)
    kept: list[np.ndarray] = []
    for step in range(max(mine, theirs)):
        key = BatchKey("psi", 0, step)
        if step < mine:
            grid.send(peer, "psi_blinded", key, {PSI_POINTS: torch.from_numpy(next(my_batches))})
        if step < theirs:
            expected = min(batch_size, peer_size - step * batch_size)
            points = _points(grid.receive(peer, "psi_blinded", key), expected, f"the {peer}'s blinded batch {step}")
            kept.append(party.reblind(points))
            grid.send(peer, "psi_reblinded", key, {PSI_POINTS: torch.from_numpy(kept[-1])})
            reporter.advance(expected)
        if step < mine:
            expected = min(batch_size, party.size - step * batch_size)
            party.add_my_double_blinded(_points(grid.receive(peer, "psi_reblinded", key), expected,
                                                f"our batch {step} returned by the {peer}"))
            reporter.advance(expected)
    return kept


def _points(tensors: WireTensors, expected: int, what: str) -> np.ndarray:
    points = tensors.get(PSI_POINTS)
    if not isinstance(points, torch.Tensor) or points.dtype != torch.uint8 or tuple(points.shape) != (expected, 32):
        shape = f"{str(points.dtype).removeprefix('torch.')} {list(points.shape)}" \
            if isinstance(points, torch.Tensor) else None if points is None else "a quantised tensor"
        raise ProtocolError(f"{what}: {shape}, expected uint8 [{expected}, 32] as the peer announced")
    return points.numpy()


def psi_locally(job: JobSpec, tables: dict[Role, Path] | None = None, out: Path | None = None) -> dict[str, PsiOutcome]:
    """Every party in this process (a thread each, an in-memory grid): `vfl psi --role local`."""
    grids = LocalGrid.star(job.label_party, job.followers, job.transport.timeout_s)
    return run_all({
        key: (partial(psi_session, PartyContext.of(job, key), grid, table=(tables or {}).get(key), out=out), grid)
        for key, grid in grids.items()
    }, job.label_party)
