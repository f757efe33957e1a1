"""`make bench-psi`: the private set intersection of N x N customer ids with 50% overlap, leader and follower
as two `vfl psi` processes over mutual TLS on 127.0.0.1 (one thread each: both share this 2-core machine).

    python -m benchmarks.psi [--ids 1000000] [--overlap 0.5]

Each party's table has its ids and one field (the PSI reads only the ids). Prints wall time, ids/s per party
(its ids blinded + the peer's reblinded, per second of the run) and each process's peak RSS; target: <= 120 s
and <= 1 GiB per party for 1M x 1M.
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

from benchmarks.train import free_port

VFL = [sys.executable, "-m", "vfl_cli.app"]
BASE = Path("runs/bench-psi")


def write_table(path: Path, ids: np.ndarray, field: str, label: bool) -> None:
    rng = np.random.default_rng(len(ids))
    with path.open("w") as out:
        out.write("id\t" + ("label\t" if label else "") + field + "\n")
        values = rng.integers(0, 50, size=len(ids))
        for cid, value in zip(ids.tolist(), values.tolist(), strict=True):
            out.write(f"c{cid:012x}\t" + ("0\t" if label else "") + f"{value}\n")


def job_spec() -> dict:
    certs = BASE / "certs"
    parties = {}
    for role, field in (("leader", "I1"), ("follower", "I2")):
        parties[role] = {"name": role, "fields": [field], "listen": f"127.0.0.1:{free_port()}", "threads": 1,
                         "cert": str(certs / f"{role}.pem"), "key": str(certs / f"{role}.key"),
                         "key_password_env": f"VFL_{role.upper()}_KEY_PASSWORD"}
    return {"name": "bench-psi", "data": {"dir": str(BASE / "data"), "threshold": 1}, "parties": parties,
            "psi": {"min_intersection": 1}, "transport": {"timeout_s": 600, "connect_timeout_s": 120},
            "tls": {"enabled": True, "ca": str(certs / "ca.pem")}}


def run(*args: str) -> None:
    done = subprocess.run([*VFL, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench-psi: `vfl {' '.join(args)}` failed: {done.stderr.strip()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--overlap", type=float, default=0.5)
    args = parser.parse_args()
    for role in ("LEADER", "FOLLOWER"):
        os.environ.setdefault(f"VFL_{role}_KEY_PASSWORD", secrets.token_urlsafe(16))
    os.environ["VFL_NO_PROGRESS"] = "1"
    BASE.mkdir(parents=True, exist_ok=True)
    job = BASE / "job.yaml"
    job.write_text(yaml.safe_dump(job_spec()))
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
