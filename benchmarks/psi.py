"""`make bench-psi`: the private set intersection of N x N customer ids with 50% overlap, leader and follower
as two `vfl psi` processes over mutual TLS on 127.0.0.1 (one thread each: both share this 2-core machine);
then the same for three parties: a leader and two followers, N ids each, three `vfl psi --party KEY`
processes over mutual TLS; then one party alone, on `psi.threads` 1 and then 2.

    python -m benchmarks.psi [--ids 1000000] [--overlap 0.5] [--only two|three|alone] [--ids3 N]
                             [--psi-threads 1 2]

Each party's table has its ids and one field (the PSI reads only the ids). Prints wall time, ids/s per party
(its ids blinded + the peer's reblinded, per second of the run) and each process's peak RSS; target: <= 120 s
and <= 1 GiB per party for 1M x 1M.

The three-party row (runs/bench-psi3/): leader, follower1 and follower2 hold N ids each (`--ids3`, default
`--ids`). Each follower shares `--overlap` of its ids with the leader, each a half of the leader's ids drawn on
its own, so the two pairwise overlaps are different sets and the common set is about overlap^2 x N; the
followers also share 20% of N among the ids the leader lacks, so their own overlap is larger than the common
set. The leader runs one pairwise PSI per follower, all at once (a thread each). Prints wall time, ids/s (all three
tables' ids per second of wall time, and per party its own ids plus every peer's per second of its run), peak
RSS per process, and checks the common-set size every party prints (and its digest, the same at all three)
against numpy's intersection of the three id sets.

The one-party row (`--only alone`, no processes, no network): one party's whole share of the PSI compute over N x
N ids with the cores to itself, as `vfl_cli.psi.session` drives a `PsiParty`: hash its N ids to the group and
blind them, validate and reblind the peer's N blinded points, validate its own N returned, intersect; once per
`--psi-threads` (`psi.threads`), one after the other, nothing else running. The peer's work is kept out of the
timing: its scalar is 1, so its blinded points are its ids' points (hashed once, before the timing) and its
reblinding of ours is the identity; the intersection (checked against the overlap) is the same either way.
Prints seconds, ids/s (own + peer's, per second), CPU seconds per wall second, and the speed-up over the first
thread count (target: >= 1.8x on 2 threads for 1M x 1M).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.psi_crypto import TAG, as_ids
from benchmarks.train import free_port, reaped
from vfl_cli.job import PsiSpec
from vfl_cli.psi import PsiParty
from vfl_cli.psi.group import hash_to_group

VFL = [sys.executable, "-m", "vfl_cli.app"]
BASE = Path("runs/bench-psi")


def write_table(path: Path, ids: np.ndarray, field: str, label: bool) -> None:
    rng = np.random.default_rng(len(ids))
    with path.open("w") as out:
        out.write("id\t" + ("label\t" if label else "") + field + "\n")
        values = rng.integers(0, 50, size=len(ids))
        for cid, value in zip(ids.tolist(), values.tolist(), strict=True):
            out.write(f"c{cid:012x}\t" + ("0\t" if label else "") + f"{value}\n")


def job_spec(base: Path, fields: dict[str, str], timeout_s: float, connect_timeout_s: float) -> dict:
    """A PSI job under `base`: one party per key of `fields` (its one field), mutual TLS, generous waits."""
    certs = base / "certs"
    parties = {key: {"name": key, "fields": [field], "listen": f"127.0.0.1:{free_port()}", "threads": 1,
                     "cert": str(certs / f"{key}.pem"), "key": str(certs / f"{key}.key"),
                     "key_password_env": f"VFL_{key.upper()}_KEY_PASSWORD"}
               for key, field in fields.items()}
    return {"name": base.name, "data": {"dir": str(base / "data"), "threshold": 1}, "parties": parties,
            "psi": {"min_intersection": 1},
            "transport": {"timeout_s": timeout_s, "connect_timeout_s": connect_timeout_s},
            "tls": {"enabled": True, "ca": str(certs / "ca.pem")}}


THREE = ("leader", "follower1", "follower2")
FIELDS3 = ("I1", "I2", "I3")  # one field each
BASE3 = Path("runs/bench-psi3")


def three_party_ids(n: int, overlap: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Each follower: `overlap` x n of the leader's ids (drawn independently per follower), the rest outside the
    leader's; the followers' outside parts share 20% of n."""
    rng = np.random.default_rng(seed)
    shared = int(n * overlap)
    outside = n - shared  # each follower's ids the leader lacks
    extra = min(int(n * 0.2), outside)
    universe = rng.permutation(n + 2 * outside)
    leader = universe[:n]
    rest = universe[n:]
    outsiders = {"follower1": rest[:outside], "follower2": rest[outside - extra : 2 * outside - extra]}
    ids = {"leader": leader}
    for key in ("follower1", "follower2"):
        ids[key] = np.concatenate([rng.choice(leader, size=shared, replace=False), outsiders[key]])
    return ids


def three_party(n: int, overlap: float) -> None:
    for key in THREE:
        os.environ.setdefault(f"VFL_{key.upper()}_KEY_PASSWORD", secrets.token_urlsafe(16))
    BASE3.mkdir(parents=True, exist_ok=True)
    job = BASE3 / "job.yaml"
    job.write_text(yaml.safe_dump(job_spec(BASE3, dict(zip(THREE, FIELDS3, strict=True)), 1800, 1800)))
    ids = three_party_ids(n, overlap)
    expected = len(np.intersect1d(np.intersect1d(ids["leader"], ids["follower1"]), ids["follower2"]))
    pairs = {f"leader & {f}": len(np.intersect1d(ids["leader"], ids[f])) for f in ("follower1", "follower2")}
    pairs["follower1 & follower2"] = len(np.intersect1d(ids["follower1"], ids["follower2"]))
    print(f"\nbench-psi three parties: {n:,} ids each; pairwise {', '.join(f'{k} {v:,}' for k, v in pairs.items())}"
          f"; {expected:,} in all three (numpy); writing and preparing the tables", flush=True)
    for key, field in zip(THREE, FIELDS3, strict=True):
        write_table(BASE3 / f"{key}.tsv", np.random.default_rng(1).permutation(ids[key]), field, key == "leader")
        run("prep", "table", "--party", key, "--input", str(BASE3 / f"{key}.tsv"), "--job", str(job))
    run("certs", "--job", str(job))

    logs = {key: (BASE3 / f"{key}.out").open("w+") for key in THREE}  # files, not pipes: nothing can stall
    started = time.perf_counter()
    processes = {key: subprocess.Popen([*VFL, "psi", "--party", key, "--job", str(job)], stdout=logs[key],
                                       stderr=subprocess.STDOUT, text=True) for key in reversed(THREE)}
    peak_gib, outputs, ended = {}, {}, {}
    try:
        for key, peak in reaped(processes, poll_s=0.1):  # each process's own end time and peak RSS, as it ends
            ended[key] = time.perf_counter() - started
            peak_gib[key] = peak / 2**30
            logs[key].seek(0)
            outputs[key] = logs[key].read()
            if processes[key].returncode != 0:
                sys.exit(f"bench-psi: the {key} failed: {outputs[key].strip()[-500:]}")
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.kill()
                process.wait()
    wall = max(ended.values())
    print(f"wall time:    {wall:,.1f} s for 3 x {n:,} ids ({3 * n / wall:,.0f} ids/s over all three tables)")
    sizes, digests = {}, {}
    for key in THREE:
        line = next((ln for ln in outputs[key].splitlines() if "customers in common" in ln), "")
        found = re.search(r"([\d,]+) customers in common", line)
        digest = re.search(r"common-set digest ([0-9a-f]+)", line)
        sizes[key] = int(found.group(1).replace(",", "")) if found else None
        digests[key] = digest.group(1) if digest else None
        own_and_peers = n * (len(THREE) if key == "leader" else 2)
        size = "?" if sizes[key] is None else f"{sizes[key]:,}"
        print(f"{key:10s}    {size} in common, "
              f"{own_and_peers / ended[key]:,.0f} ids/s (own + peers'), done at {ended[key]:,.1f} s, "
              f"peak RSS {peak_gib[key]:.2f} GiB (target <= 1 GiB)")
        print(f"              {line.strip()}")
    same = all(size == expected for size in sizes.values()) and len(set(digests.values())) == 1
    print(f"common set:   {'OK' if same else 'MISMATCH'}: every party {sorted(set(sizes.values()), key=str)}, "
          f"numpy {expected:,}; digests {'equal' if len(set(digests.values())) == 1 else 'DIFFER'}")
    if not same:
        sys.exit(1)


def run(*args: str) -> None:
    done = subprocess.run([*VFL, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench-psi: `vfl {' '.join(args)}` failed: {done.stderr.strip()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--only", choices=("two", "three", "alone"),
                        help="run only the two-party, the three-party or the one-party (psi.threads) row")
    parser.add_argument("--ids3", type=int, help="ids per party in the three-party row (default: --ids)")
    parser.add_argument("--psi-threads", type=int, nargs="+", default=[1, 2],
                        help="psi.threads of the one-party row, run one after the other (default: 1 2)")
    args = parser.parse_args()
    os.environ["VFL_NO_PROGRESS"] = "1"
    if args.only in (None, "two"):
        two_party(args)
    if args.only in (None, "three"):
        three_party(args.ids3 or args.ids, args.overlap)
    if args.only in (None, "alone"):
        one_party(args.ids, args.overlap, args.psi_threads)


def one_party(n: int, overlap: float, thread_counts: list[int], batch_size: int = PsiSpec().batch_size) -> None:
    """One party's PSI compute over n x n ids, alone, once per thread count (see the module's docstring)."""
    shared = int(n * overlap)
    universe = np.random.default_rng(0).permutation(2 * n - shared)
    mine, theirs = as_ids(universe[:n]), as_ids(universe[n - shared :])
    print(f"\nbench-psi one party alone: {n:,} own ids x {n:,} of the peer's, {shared:,} shared, "
          f"batch {batch_size:,}, {os.cpu_count()} cores; hashing the peer's ids (untimed)", flush=True)
    peer_points = [hash_to_group(TAG, theirs[i : i + batch_size].tolist(), max(thread_counts))
                   for i in range(0, n, batch_size)]
    first = None
    for threads in thread_counts:
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        party = PsiParty("leader", mine, TAG, threads=threads)  # as psi_session builds it, psi.threads threads
        own, kept = party.blinded_batches(batch_size), []
        for points in peer_points:  # the rounds of `_rounds`: my batch out, the peer's reblinded, mine back
            blinded = next(own)
            kept.append(party.reblind(points))
            party.add_my_double_blinded(blinded)  # the peer's scalar is 1: its reblinding is the identity
        found = party.intersect(kept, peer_size=n)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if found.size != shared:
            sys.exit(f"bench-psi: one party found {found.size:,} common ids, expected {shared:,}")
        first = first or wall
        print(f"psi.threads {threads}: {wall:6.1f} s, {2 * n / wall:,.0f} ids/s (own + peer's), "
              f"{cpu / wall:.2f} CPU s per wall s, {first / wall:.2f}x the first"
              f"{' (target >= 1.8x on 2 threads)' if threads == 2 else ''}; {found.size:,} in common; "
              f"load average {load:.2f} before", flush=True)


def two_party(args: argparse.Namespace) -> None:
    for role in ("LEADER", "FOLLOWER"):
        os.environ.setdefault(f"VFL_{role}_KEY_PASSWORD", secrets.token_urlsafe(16))
    os.environ["VFL_NO_PROGRESS"] = "1"
    BASE.mkdir(parents=True, exist_ok=True)
    job = BASE / "job.yaml"
    job.write_text(yaml.safe_dump(job_spec(BASE, {"leader": "I1", "follower": "I2"}, 600, 120)))
    shared = int(args.ids * args.overlap)
    universe = np.random.default_rng(0).permutation(2 * args.ids - shared)
    ids = {"leader": universe[: args.ids], "follower": universe[args.ids - shared :]}
    print(f"bench-psi: {args.ids:,} x {args.ids:,} ids, {shared:,} shared; writing and preparing the tables",
          flush=True)
    for role, field in (("leader", "I1"), ("follower", "I2")):
        write_table(BASE / f"{role}.tsv", np.random.default_rng(1).permutation(ids[role]), field, role == "leader")
        run("prep", "table", "--role", role, "--input", str(BASE / f"{role}.tsv"), "--job", str(job))
    run("certs", "--job", str(job))

    started = time.perf_counter()
    processes = {role: subprocess.Popen([*VFL, "psi", "--role", role, "--job", str(job)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for role in ("follower", "leader")}
    peak_gib, outputs, ended = {}, {}, {}
    for role, process in processes.items():
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS, not the largest of all children
        ended[role] = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        outputs[role] = (process.stdout.read() if process.stdout else "",
                         process.stderr.read() if process.stderr else "")
        peak_gib[role] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
        if process.returncode != 0:
            sys.exit(f"bench-psi: the {role} failed: {outputs[role][1].strip()[-500:]}")
    wall = max(ended.values())
    found = re.search(r"([\d,]+) customers in common", outputs["leader"][0])
    print(f"\nintersection: {found.group(1) if found else '?'} (expected {shared:,})")
    print(f"wall time:    {wall:,.1f} s for {args.ids:,} x {args.ids:,} ids (target <= 120 s for 1M x 1M)")
    for role in ("leader", "follower"):
        print(f"{role:9s}     {2 * args.ids / ended[role]:,.0f} ids/s (own + peer's), "
              f"peak RSS {peak_gib[role]:.2f} GiB (target <= 1 GiB)")


if __name__ == "__main__":
    main()
