"""Benchmark `vfl prep criteo`: 1M and 2M synthetic rows, rows/s and the child's peak RSS for each.

Run with `make bench-prep` (`python -m benchmarks.prep`). Uses jobs/criteo.yaml's field split with threshold
100, writes everything under a temporary directory, and runs the real CLI in a subprocess so the peak RSS
(ru_maxrss from wait4) is that run's alone. Peak RSS should stay flat in rows: a ratio 2M/1M near 1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.synth import write_synth

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "criteo.yaml"


@dataclass(frozen=True)
class Run:
    rows: int
    wall_s: float  # the whole subprocess, including interpreter start and imports
    prep_rows_per_s: float  # the two passes alone, as `vfl prep` reports it
    peak_rss_mb: float
    cpu_s: float  # the child's user + system CPU time: comparable even when other work shares the cores


def run_prep(raw: Path, out: Path, rows: int) -> Run:
    command = [sys.executable, "-m", "vfl_cli.app", "prep", "criteo", "--input", str(raw), "--job", str(JOB)]
    command += ["--out", str(out), "--threshold", "100", "--bench"]
    env = {**os.environ, "VFL_NO_PROGRESS": "1", "COLUMNS": "200"}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    report = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's maximum
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"vfl prep failed ({child.returncode}):\n{report}")
    print(report.rstrip(), flush=True)
    match = re.search(r"([\d,]+) rows/s over both passes", report)
    rate = float(match.group(1).replace(",", "")) if match else float("nan")
    return Run(rows, wall, rate, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000])
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vfl-bench-prep-") as tmp:
        for rows in args.rows:
            raw = Path(tmp) / f"synth-{rows}.txt"
            started = time.perf_counter()
            write_synth(raw, rows, seed=0)
            size_mb = raw.stat().st_size / 1e6
            print(f"synth {rows:,} rows ({size_mb:,.0f} MB) in {time.perf_counter() - started:.1f} s", flush=True)
            runs.append(run_prep(raw, Path(tmp) / f"out-{rows}", rows))
            raw.unlink()  # keep at most one input on disk
    load = os.getloadavg()[0]
    print(f"\n{os.cpu_count()} cores, load average {load:.1f} (other work on the machine slows the figures)")
    print("rows        prep rows/s   wall rows/s   CPU s   peak RSS")
    for run in runs:
        wall_rate = run.rows / run.wall_s
        print(
            f"{run.rows:>9,}   {run.prep_rows_per_s:>11,.0f}   {wall_rate:>11,.0f}   {run.cpu_s:>5.1f}"
            f"   {run.peak_rss_mb:>6,.0f} MB"
        )
    if len(runs) >= 2:
        ratio = runs[-1].peak_rss_mb / runs[0].peak_rss_mb
        print(f"peak RSS ratio {runs[-1].rows:,}/{runs[0].rows:,} rows: {ratio:.2f}")


if __name__ == "__main__":
    main()
