"""`make soak`: a longer two-party run through a bad network, with a kill -9 in the middle; prints what it
survived. Not part of CI (it takes minutes); everything stays on 127.0.0.1.

    python scripts/soak.py [--rows 60000] [--epochs 3] [--seed 1]

1. synthetic data, prep, dev certificates (jobs/smoke.yaml's model, its own ports and run directory);
2. the reference: the two parties as two processes, uninterrupted, without the proxies;
3. leader and follower as two processes, each reaching the other through a `FaultProxy` (5% dropped
   connections, 50 ms per chunk, 1% cut request chunks), their /metrics scraped while they run;
4. at a random training step the follower is killed with SIGKILL; the leader stops on its own; both
   `vfl train` commands are run again, unchanged, and must finish;
5. the summary: steps, resends, refusals, resumes, and the final test AUC against the reference (equal to
   1e-6, or the soak fails).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.faultproxy import FaultProxy  # noqa: E402 - a test utility, used here by design

VFL = [sys.executable, "-m", "vfl_cli.app"]
BASE = Path("runs/soak")
FAULTS = {"drop_rate": 0.05, "delay_s": 0.05, "cut_rate": 0.01}
AUC = re.compile(r"test: AUC (\d+\.\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vfl(*args: str) -> str:
    done = subprocess.run([*VFL, *args], stdout=subprocess.PIPE, text=True, env=os.environ | {"VFL_NO_PROGRESS": "1"})
    if done.returncode != 0:
        sys.exit(f"soak: `vfl {' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout


def scrape(address: str) -> dict[str, float]:
    """name{labels} -> value of a party's /metrics; empty when it does not answer."""
    try:
        text = httpx.get(f"http://{address}/metrics", timeout=1, trust_env=False).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels.get("reason") or sample.labels.get("kind") or ""
                values[f"{sample.name}{'/' + reason if reason else ''}"] = sample.value
    return values


@dataclass
class PairRun:
    codes: dict[str, int]  # exit code per role
    counters: dict[str, dict[str, float]]  # role -> the last value seen of each counter on its /metrics
    killed_at: int | None  # the leader's global step when the follower was killed
    leader_log: str


def run_pair(job: Path, metrics: dict[str, str], kill_follower_at: int | None, log_dir: Path) -> PairRun:
    """Both parties once; scrape while they run; SIGKILL the follower at that step. Returns what happened."""
    env = os.environ | {"VFL_NO_PROGRESS": "1"}
    logs = {role: (log_dir / f"{role}-{time.time_ns()}.log").open("w") for role in ("leader", "follower")}
    processes = {role: subprocess.Popen([*VFL, "train", "--role", role, "--job", str(job)], env=env,
                                        stdout=logs[role], stderr=subprocess.STDOUT) for role in ("follower", "leader")}
    counters: dict[str, dict[str, float]] = {role: {} for role in processes}
    killed_at = None
    leader_metrics = Path(yaml.safe_load(job.read_text())["train"]["run_dir"]) / "leader" / "metrics.jsonl"
    deadline = time.monotonic() + 1800
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline:
        for role, address in metrics.items():
            counters[role] |= scrape(address)  # the last value seen of each counter of this process
        if kill_follower_at is not None and killed_at is None and leader_metrics.exists():
            steps = [json.loads(line) for line in leader_metrics.read_text().splitlines() if '"step"' in line]
            global_steps = [s.get("global_step", 0) for s in steps if s.get("event") == "step"]
            if global_steps and max(global_steps) >= kill_follower_at and processes["follower"].poll() is None:
                processes["follower"].send_signal(signal.SIGKILL)
                killed_at = max(global_steps)
        time.sleep(0.2)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.wait()
    for handle in logs.values():
        handle.close()
    return PairRun({r: p.returncode for r, p in processes.items()}, counters, killed_at,
                   Path(logs["leader"].name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for role in ("LEADER", "FOLLOWER"):
        os.environ.setdefault(f"VFL_{role}_KEY_PASSWORD", secrets.token_urlsafe(16))
    started = time.perf_counter()

    spec = yaml.safe_load(Path("jobs/smoke.yaml").read_text())
    spec["name"] = "soak"
    spec["data"]["dir"] = str(BASE / "data")
    spec["train"] |= {"epochs": args.epochs, "run_dir": str(BASE / "local"), "checkpoint_every": 20}
    spec["transport"] |= {"timeout_s": 15, "retries": 8}
    certs = BASE / "certs"
    spec["tls"]["ca"] = str(certs / "ca.pem")
    for role in ("leader", "follower"):
        spec["parties"][role] |= {"listen": f"127.0.0.1:{free_port()}", "cert": str(certs / f"{role}.pem"),
                                  "key": str(certs / f"{role}.key")}
    BASE.mkdir(parents=True, exist_ok=True)
    job = BASE / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    print(f"soak: {args.rows:,} synthetic rows, {args.epochs} epochs, faults {FAULTS}", flush=True)
    vfl("prep", "synth", "--rows", str(args.rows), "--out", str(BASE / "raw.txt"), "--seed", str(args.seed))
    vfl("prep", "criteo", "--input", str(BASE / "raw.txt"), "--job", str(job))
    vfl("certs", "--job", str(job))
    # The reference: the same two processes, uninterrupted, without the proxies (and the same threads: one
    # process with both parties sums their threads, and GEMMs on 2 threads round differently than on 1).
    shutil.rmtree(BASE / "local", ignore_errors=True)
    clean = run_pair(job, {}, None, BASE)
    if clean.codes != {"follower": 0, "leader": 0}:
        sys.exit(f"soak: the clean run failed: {clean.codes}\n{clean.leader_log[-2000:]}")
    reference = float(AUC.search(clean.leader_log).group(1))  # type: ignore[union-attr]

    ports = {role: int(spec["parties"][role]["listen"].rsplit(":", 1)[1]) for role in ("leader", "follower")}
    with (
        FaultProxy(("127.0.0.1", ports["leader"]), seed=args.seed, **FAULTS) as to_leader,  # type: ignore[arg-type]
        FaultProxy(("127.0.0.1", ports["follower"]), seed=args.seed + 1, **FAULTS) as to_follower,  # type: ignore[arg-type]
    ):
        spec["parties"]["leader"]["address"] = to_leader.address
        spec["parties"]["follower"]["address"] = to_follower.address
        spec["train"]["run_dir"] = str(BASE / "train")
        metrics = {role: f"127.0.0.1:{free_port()}" for role in ("leader", "follower")}
        spec["metrics"] = {"listen": metrics}
        proxied = BASE / "job-proxied.yaml"
        proxied.write_text(yaml.safe_dump(spec))
        train_rows = json.loads((BASE / "data" / "leader" / "meta.json").read_text())["splits"]["train"]["rows"]
        total_steps = args.epochs * -(-train_rows // spec["train"]["batch_size"])
        kill_at = rng.randrange(total_steps // 4, total_steps * 3 // 4)
        print(f"soak: two parties through the proxies; SIGKILL to the follower at step ~{kill_at} of {total_steps}",
              flush=True)
        shutil.rmtree(BASE / "train", ignore_errors=True)
        first = run_pair(proxied, metrics, kill_at, BASE)
        print(f"soak: first run: leader exited {first.codes['leader']} (follower killed at step "
              f"{first.killed_at}); running both again", flush=True)
        second = run_pair(proxied, metrics, None, BASE)
        stats = (to_leader.stats(), to_follower.stats())

    if second.codes != {"follower": 0, "leader": 0}:
        sys.exit(f"soak: the resumed run failed: {second.codes}\n{second.leader_log[-2000:]}")
    final = float(AUC.search(second.leader_log).group(1))  # type: ignore[union-attr]
    resumed = re.findall(r"resumed run \S+ at step (\d+)", second.leader_log)
    totals: dict[str, float] = {}
    for run in (first, second):
        for counters in run.counters.values():
            for name, value in counters.items():
                totals[name] = totals.get(name, 0.0) + value
    print("\n==> soak summary")
    print(f"network faults injected:  {sum(s.dropped for s in stats)} connections dropped, "
          f"{sum(s.cut for s in stats)} bodies cut, {sum(s.accepted for s in stats)} connections in all")
    print(f"resends (vfl_retries):    {sum(v for k, v in totals.items() if k.startswith('vfl_retries_total')):.0f}  "
          + ", ".join(f"{k.split('/')[-1]} {v:.0f}" for k, v in sorted(totals.items())
                      if k.startswith("vfl_retries_total/")))
    print("refusals (vfl_refusals):  " + (", ".join(f"{k.split('/')[-1]} {v:.0f}" for k, v in sorted(totals.items())
                                                   if k.startswith("vfl_refusals_total/")) or "none"))
    print(f"kill -9:                  follower at step {first.killed_at}; resumed at step "
          f"{', '.join(resumed) or '?'}")
    print(f"steps (both parties):     {totals.get('vfl_steps_total', 0):.0f} in the two runs, of "
          f"{2 * total_steps} without the crash")
    print(f"final test AUC:           {final:.6f} (uninterrupted, without the proxies: {reference:.6f})")
    print(f"wall time:                {time.perf_counter() - started:,.0f} s")
    if abs(final - reference) > 1e-6:
        sys.exit("soak: the final AUC differs from the reference")
    print("soak passed")


if __name__ == "__main__":
    main()
