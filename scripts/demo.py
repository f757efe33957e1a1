"""The README's demo, end to end on loopback: synthetic data, prep, dev certificates, leader and follower as
two processes over mutually authenticated HTTPS, evaluation, inference, and a summary.

    python scripts/demo.py jobs/demo.yaml            # make demo
    python scripts/demo.py jobs/smoke.yaml --check   # make smoke-test: also asserts the outcome

--check asserts that both processes exit 0, that the test AUC beats 0.5 clearly, and that the two-process
run gives the same test AUC as `--role local` on the same job (to 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import yaml

VFL = [sys.executable, "-m", "vfl_cli.app"]
AUC_LINE = re.compile(r"test: AUC (\d+\.\d+)")
TRAFFIC_LINE = re.compile(r"sent ([\d,.]+) MB, received ([\d,.]+) MB")


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def vfl(*args: str) -> str:
    """Run one vfl command in the foreground; its progress shows, its stdout is returned."""
    done = subprocess.run([*VFL, *args], stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        sys.exit(f"demo: `vfl {' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout


def two_parties(*args: str, log_dir: Path) -> tuple[str, str]:
    """Run the same vfl command as follower (background) and leader; both must exit 0."""
    log_dir.mkdir(parents=True, exist_ok=True)
    verb = args[0]
    follower_log = (log_dir / f"follower-{verb}.log").open("w")
    follower = subprocess.Popen([*VFL, *args, "--role", "follower"], stdout=follower_log, stderr=subprocess.STDOUT)
    try:
        leader = subprocess.run([*VFL, *args, "--role", "leader"], stdout=subprocess.PIPE, text=True)
        follower_code = follower.wait(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        follower_log.close()
    print(leader.stdout, end="", flush=True)
    follower_output = (log_dir / f"follower-{verb}.log").read_text()
    if leader.returncode != 0 or follower_code != 0:
        sys.exit(f"demo: `vfl {verb}`: leader exited {leader.returncode}, follower {follower_code}; "
                 f"follower log: {log_dir / f'follower-{verb}.log'}")
    return leader.stdout, follower_output


def auc_of(output: str) -> float:
    match = AUC_LINE.search(output)
    if not match:
        sys.exit("demo: no test AUC in the leader's output")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default: 20,000 smoke, 200,000 else)")
    parser.add_argument("--check", action="store_true", help="assert the outcome (make smoke-test)")
    args = parser.parse_args()
    spec = yaml.safe_load(args.job.read_text())
    job = str(args.job)
    base = Path(spec["data"]["dir"]).parent
    rows = args.rows or (20_000 if args.check else 200_000)
    for role in ("LEADER", "FOLLOWER"):  # dev key passwords: generated per demo, passed by environment only
        os.environ.setdefault(f"VFL_{role}_KEY_PASSWORD", secrets.token_urlsafe(16))
    started = time.perf_counter()

    step(f"synthetic Criteo-format data: {rows:,} rows")
    raw = base / "raw.txt"
    vfl("prep", "synth", "--rows", str(rows), "--out", str(raw), "--seed", "1")
    step("prepare each party's columns")
    vfl("prep", "criteo", "--input", str(raw), "--job", job)
    step("dev certificates (a CA and one certificate per party)")
    vfl("certs", "--job", job)

    if args.check:
        step("reference: both parties in one process (--role local)")
        local_auc = auc_of(vfl("train", "--role", "local", "--job", job, "--restart"))

    step("train: leader and follower as two processes over HTTPS on 127.0.0.1")
    leader_out, _ = two_parties("train", "--job", job, "--restart", log_dir=base / "logs")
    train_auc = auc_of(leader_out)
    step("evaluate the checkpoint together")
    two_parties("eval", "--job", job, log_dir=base / "logs")
    step("infer: the leader writes sample_id,probability")
    predictions = base / "predictions.csv"
    follower_infer = subprocess.Popen([*VFL, "infer", "--role", "follower", "--job", job],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vfl("infer", "--role", "leader", "--job", job, "--out", str(predictions))
    if follower_infer.wait(timeout=120) != 0:
        sys.exit("demo: the follower's inference failed")

    metrics = [json.loads(line) for line in (Path(spec["train"]["run_dir"]) / "leader" / "metrics.jsonl").open()]
    speeds = [m["train_samples_per_s"] for m in metrics if m["event"] == "epoch"]
    traffic = TRAFFIC_LINE.search(leader_out)
    step("summary")
    print(f"test AUC (two parties over HTTPS): {train_auc:.6f}")
    print(f"training speed, last epoch:        {speeds[-1]:,.0f} samples/s")
    if traffic:
        print(f"leader received {traffic.group(2)} MB of follower embeddings, sent {traffic.group(1)} MB of gradients")
    print(f"predictions:                       {predictions} ({len(predictions.read_text().splitlines()) - 1:,} rows)")
    print(f"total time:                        {time.perf_counter() - started:,.0f} s")
    if args.check:
        print(f"local (one process) test AUC:      {local_auc:.6f}")
        assert train_auc > 0.6, f"AUC {train_auc} does not beat 0.5 clearly on the planted signal"
        assert abs(train_auc - local_auc) <= 1e-6, f"two-process AUC {train_auc} != local AUC {local_auc}"
        print("smoke test passed")


if __name__ == "__main__":
    main()
