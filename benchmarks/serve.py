"""`make bench-serve`: `vfl serve` latency and throughput at the reference model size, 1,000,000 customers per store.

    python -m benchmarks.serve [--work runs/bench-serve] [--rebuild] [--seconds 20] [--concurrency 1,16,64]
                               [--ids 1,100] [--backend torch|onnxruntime|both]

Set-up (reused from the work dir; `--rebuild` redoes it): jobs/criteo.yaml's parties, field split and model
(Wide&Deep, emb_dim 80, deep 1024-512-256-128), TLS with dev certificates, `serve:` with a token; per party
1,000,000 customers written straight as `vfl psi` publishes aligned data (store arrays, customer_ids.npy,
vocab.json, dense_max.json), in `vfl prep`'s id layout with a 200,000-id vocabulary per party (bench-train's
VOCAB_PER_PARTY); one untrained checkpoint per party (same run id and step). Latency does not depend on weights.

Per backend: the floor (a child process: both parties' `ServedPart` and `FeatureStore`, 1 torch thread, no HTTP,
no follower hop: lookup at each store, each cut, predict; 1 and 100 ids, concurrency 1), then `vfl serve` for the
follower and the leader, and a closed-loop client per concurrency x ids per request, random customers each
request, the first second of each row unrecorded. The client is one asyncio loop in this process speaking raw
HTTP/1.1 over keep-alive TLS connections (one per worker), far cheaper per request than httpx; it shares the
cores with both servers, so each row shows the cores used by client, leader and follower. Peak RSS: each server's
VmHWM just before it is stopped, the floor's from wait4. Loopback only. Writes <work>/bench-serve.json; exits 0
even when a target fails (a measurement), printing FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.serve_setup import build
from benchmarks.train import GIB, REPO, ROLES, VOCAB_PER_PARTY, free_port

TOKEN_ENV, TOKEN = "VFL_BENCH_SERVE_TOKEN", "bench-serve-token-0123456789abcdef"
WARMUP_S = 1.0  # unrecorded start of every row
TARGET_RSS = int(1.5 * GIB)
TARGET_RATE = 5_000  # predictions/s, 1-id requests at concurrency 64
TICK = os.sysconf("SC_CLK_TCK")


def backend_job(work: Path, base: Path, backend: str) -> Path:
    """The base job with a `serve:` section for `backend` and fresh loopback ports (neither is fingerprinted)."""
    spec: dict[str, Any] = yaml.safe_load(base.read_text())
    for party in spec["parties"].values():
        party["listen"] = f"127.0.0.1:{free_port()}"
    spec["serve"] = {"listen": f"127.0.0.1:{free_port()}", "token_env": TOKEN_ENV, "backend": backend}
    path = work / f"job-{backend}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def summary(latencies: list[float], ids: int, window_s: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    p50, p95, p99 = (float(v) for v in np.percentile(ms, [50, 95, 99]))
    return {"requests": len(latencies), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "predictions_per_s": len(latencies) * ids / window_s if window_s > 0 else 0.0}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def vm_hwm(pid: int) -> int:
    """Peak resident set size in bytes, as the kernel keeps it for a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024


# ------------------------------------------------------------------------------------------------ the floor


def floor_worker(job_path: Path, seconds: float, ids_list: list[int], result: Path) -> None:
    """Both parties' parts in this one process, scored directly (1 torch thread, as each server has)."""
    import torch

    from vfl_cli.job import load_job
    from vfl_cli.serve.feature_store import FeatureStore
    from vfl_cli.serve.model import ServedPart

    torch.set_num_threads(1)
    job = load_job(job_path)
    run_dir, backend = job.train.run_dir, job.serve.backend
    parts = {role: ServedPart.load(job, role, run_dir, None, backend) for role in ROLES}
    stores = {role: FeatureStore.open(job.data.dir / role) for role in ROLES}
    data = stores["leader"].data
    customers = [c.decode() for name in data.meta.splits for c in np.asarray(data.customer_ids(name))]

    def score(ids: list[str]) -> np.ndarray:  # the leader's own cut first, then the follower's: the job's order
        found = [stores[role].lookup(ids) for role in ROLES]
        return parts["leader"].predict([parts[role].cut(r.ids, r.vals) for role, r in zip(ROLES, found, strict=True)])

    rows = []
    for n in ids_list:
        started = time.perf_counter()
        latencies: list[float] = []
        while time.perf_counter() < started + WARMUP_S + seconds:
            ids = random.choices(customers, k=n)
            now = time.perf_counter()
            score(ids)
            if now >= started + WARMUP_S:
                latencies.append(time.perf_counter() - now)
        rows.append({"backend": backend, "concurrency": 1, "ids": n,
                     **summary(latencies, n, sum(latencies)), "errors": 0})
    result.write_text(json.dumps(rows))


def run_floor(job_path: Path, backend: str, seconds: float, ids_list: list[int], work: Path) -> tuple[list, int]:
    result = work / f"floor-{backend}.json"
    command = [sys.executable, "-m", "benchmarks.serve", "--floor-worker", str(job_path), "--seconds", str(seconds),
               "--ids", ",".join(map(str, ids_list)), "--result", str(result)]
    process = subprocess.Popen(command, cwd=REPO, env=env())
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        stop(process)
        raise
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the {backend} floor exited {process.returncode}")
    return json.loads(result.read_text()), usage.ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ servers


def env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: TOKEN, "VFL_NO_PROGRESS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def start_serve(job_path: Path, party: str, work: Path) -> subprocess.Popen[bytes]:
    with (work / f"serve-{job_path.stem}-{party}.out").open("wb") as log:  # a file, not a pipe: nothing can stall
        return subprocess.Popen([sys.executable, "-m", "vfl_cli.app", "serve", "--job", str(job_path), "--party",
                                 party], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env())


def wait_serving(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if " serving run " in text:
            return
        if process.poll() is not None:
            raise RuntimeError(f"{log.name}: vfl serve exited {process.returncode}: {text[-1500:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{log.name}: vfl serve did not start within {timeout_s:g} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by its PID, then kill after 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(job: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(verify=ssl.create_default_context(cafile=str(job.tls.ca)), trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"https://{job.serve.listen}/healthz").json()["status"] == "ok":
                    return
            time.sleep(0.2)
    raise RuntimeError("the leader's /healthz did not say ok")


# ------------------------------------------------------------------------------------------------ the client


async def closed_loop(host: str, port: int, context: ssl.SSLContext, customers: list[bytes], concurrency: int,
                      n: int, seconds: float) -> dict[str, Any]:
    """`concurrency` workers, each on its own keep-alive connection, each sending its next request as soon as the
    last is answered; latencies of the requests started after the warm-up and answered 200 with n predictions."""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\n").encode()
    latencies: list[float] = []
    errors: dict[str, int] = {}  # HTTP status (or "connection") -> count
    # One at a time: the listener lets transport.max_unauthenticated (32) connections handshake at once.
    connections = [await asyncio.open_connection(host, port, ssl=context) for _ in range(concurrency)]
    loop = asyncio.get_running_loop()
    begin = loop.time()
    record_from, until = begin + WARMUP_S, begin + WARMUP_S + seconds

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while loop.time() < until:
            body = b'{"ids":["' + b'","'.join(random.choices(customers, k=n)) + b'"]}'
            recorded, sent = loop.time() >= record_from, time.perf_counter()
            try:
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                headers = await reader.readuntil(b"\r\n\r\n")
                length = int(headers.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                answer = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError, ValueError):
                if recorded:
                    errors["connection"] = errors.get("connection", 0) + 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
                continue
            done = time.perf_counter()
            if not recorded:
                continue
            if headers[9:12] == b"200" and answer.count(b'"probability"') == n:
                latencies.append(done - sent)
            else:
                status = headers[9:12].decode()
                errors[status] = errors.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(worker(*connection) for connection in connections))
    window = loop.time() - record_from
    return {**summary(latencies, n, window), "errors": sum(errors.values()), "errors_by_status": errors}


def counters(job: Any) -> dict[str, float]:
    """The leader's batch-size and follower round-trip sums and counts, from its GET /metrics."""
    with httpx.Client(verify=ssl.create_default_context(cafile=str(job.tls.ca)), trust_env=False) as client:
        text = client.get(f"https://{job.serve.listen}/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    wanted = ("vfl_serve_batch_ids_sum", "vfl_serve_batch_ids_count", "vfl_serve_follower_seconds_sum",
              "vfl_serve_follower_seconds_count")
    return {line.split("{")[0].split()[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(wanted)}


def served_row(job: Any, context: ssl.SSLContext, customers: list[bytes], pids: dict[str, int],
               concurrency: int, n: int, seconds: float) -> dict[str, Any]:
    host, port = job.serve.listen.rsplit(":", 1)
    before, ticks = counters(job), {key: cpu_ticks(pid) for key, pid in pids.items()}
    own, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    row = asyncio.run(closed_loop(host, int(port), context, customers, concurrency, n, seconds))
    wall, after = time.perf_counter() - wall, counters(job)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    mine = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"client": (mine.ru_utime + mine.ru_stime - own.ru_utime - own.ru_stime) / wall}
    cpu |= {key: (cpu_ticks(pid) - ticks[key]) / TICK / wall for key, pid in pids.items()}
    return {"backend": job.serve.backend, "concurrency": concurrency, "ids": n, **row, "cpu": cpu,
            "ids_per_batch": delta["vfl_serve_batch_ids_sum"] / max(delta["vfl_serve_batch_ids_count"], 1),
            "follower_ms": 1e3 * delta["vfl_serve_follower_seconds_sum"]
            / max(delta["vfl_serve_follower_seconds_count"], 1)}


def bench_backend(work: Path, base: Path, backend: str, args: argparse.Namespace, customers: list[bytes],
                  out: dict[str, Any]) -> None:
    from vfl_cli.job import load_job

    job_path = backend_job(work, base, backend)
    job = load_job(job_path)
    floor, floor_rss = run_floor(job_path, backend, args.seconds, sorted(set(args.ids) | {1}), work)
    out["floor"] += floor
    out["rss"][f"{backend} floor process"] = floor_rss
    print(f"{backend} floor: " + "; ".join(f"{r['ids']} id(s) p99 {r['p99_ms']:.2f} ms" for r in floor), flush=True)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for party in ("follower", "leader"):
            processes[party] = start_serve(job_path, party, work)
            wait_serving(processes[party], work / f"serve-{job_path.stem}-{party}.out")
        context = ssl.create_default_context(cafile=str(job.tls.ca))
        wait_healthy(job)
        pids = {key: p.pid for key, p in processes.items()}
        for n in args.ids:
            for concurrency in args.concurrency:
                row = served_row(job, context, customers, pids, concurrency, n, args.seconds)
                out["rows"].append(row)
                print(f"{backend} c={concurrency} ids={n}: p99 {row['p99_ms']:.2f} ms, "
                      f"{row['predictions_per_s']:,.0f} predictions/s, {row['errors']} errors"
                      + (f" {row['errors_by_status']}" if row["errors"] else ""), flush=True)
        for key, pid in pids.items():
            out["rss"][f"{backend} {key}"] = vm_hwm(pid)
    finally:
        for process in processes.values():
            stop(process)


# ------------------------------------------------------------------------------------------------ report


def find(rows: list[dict[str, Any]], backend: str, concurrency: int, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if (r["backend"], r["concurrency"], r["ids"]) == (backend, concurrency, n)), None)


def targets(out: dict[str, Any], b: str) -> list[tuple[str, bool | None]]:
    """The issue's three targets for backend `b` (None: not measured in this run)."""
    served, floor, fast = find(out["rows"], b, 1, 1), find(out["floor"], b, 1, 1), find(out["rows"], b, 64, 1)
    rss = {k.split()[1]: v for k, v in out["rss"].items() if k in (f"{b} leader", f"{b} follower")}
    if not (served and floor and fast and rss):
        return [(f"{b}: the targets (they need the 1-id rows at c=1 and c=64)", None)]
    p99, bound, rate, worst = served["p99_ms"], 3 * floor["p99_ms"] + 5, fast["predictions_per_s"], max(rss.values())
    return [(f"{b}: 1 id, c=1: p99 {p99:.2f} ms <= 3 x floor p99 {floor['p99_ms']:.2f} ms + 5 ms = {bound:.2f} ms "
             f"(ratio {p99 / bound:.2f})", p99 <= bound),
            (f"{b}: 1 id, c=64: {rate:,.0f} predictions/s >= {TARGET_RATE:,} (ratio {rate / TARGET_RATE:.2f})",
             rate >= TARGET_RATE),
            (f"{b}: peak RSS per party " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in rss.items())
             + f" GiB <= 1.50 GiB (ratio {worst / TARGET_RSS:.2f})", worst <= TARGET_RSS)]


def decide(out: dict[str, Any], backends: list[str]) -> list[str]:
    """Which backend is faster at 1 id: c=1 p99 (lower) and c=64 predictions/s (higher)."""
    lines = []
    for what, c, key, unit, best in (("1 id, c=1 p99", 1, "p99_ms", "ms", min),
                                     ("1 id, c=64 throughput", 64, "predictions_per_s", "predictions/s", max)):
        got = {b: r[key] for b in backends if (r := find(out["rows"], b, c, 1))}
        if len(got) == 2:
            lines.append(f"faster at {what}: {best(got, key=got.__getitem__)} ("
                         + " vs ".join(f"{b} {v:,.2f} {unit}" for b, v in got.items()) + ")")
    return lines


def report(out: dict[str, Any], work: Path) -> None:
    header = (f"{'backend':<17} {'conc':>4} {'ids/req':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'predictions/s':>13} {'errors':>6} {'ids/batch':>9} {'f ms':>5}  cores: client / leader / follower")
    print("\n" + header + "\n" + "-" * len(header))
    for r in out["rows"] + out["floor"]:
        floor = "cpu" not in r
        errors, batch, hop, note = ("-", "-", "-", "one process, no HTTP, no follower hop") if floor else (
            r["errors"], f"{r['ids_per_batch']:.1f}", f"{r['follower_ms']:.1f}",
            " / ".join(f"{r['cpu'][k]:.2f}" for k in ("client", "leader", "follower")))
        print(f"{r['backend'] + (' floor' if floor else ''):<17} {r['concurrency']:>4} {r['ids']:>7} "
              f"{r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['predictions_per_s']:>13,.0f} "
              f"{errors:>6} {batch:>9} {hop:>5}  {note}")
    print("\npeak RSS (VmHWM): " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in out["rss"].items()))
    load = out["config"]["load_average_before"][0], out["config"]["load_average_after"][0]
    print(f"notes: untrained weights (latency does not depend on their values); client, leader and follower share "
          f"this machine's {os.cpu_count()} cores; {WARMUP_S:g} s warm-up per row unrecorded; errors = non-200 or "
          f"fewer predictions than ids; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after")
    print("ids/batch: mean ids per micro-batch at the leader; f ms: its mean round trip to the follower per batch")
    print("\n".join(["", *out["decision"], "", "targets:"]))
    for text, ok in out["targets"]:
        print(f"  {text}: {'PASS' if ok else 'not measured' if ok is None else 'FAIL'}")
    path = work / "bench-serve.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


def counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-serve")
    parser.add_argument("--rebuild", action="store_true", help="redo the data, certificates and checkpoints")
    parser.add_argument("--seconds", type=float, default=20.0, help="recorded seconds per row (default 20)")
    parser.add_argument("--concurrency", type=counts, default=[1, 16, 64])
    parser.add_argument("--ids", type=counts, default=[1, 100], help="ids per request (default 1,100)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "both"), default="both")
    parser.add_argument("--floor-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_worker:
        floor_worker(args.floor_worker, args.seconds, args.ids, args.result)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    if os.getloadavg()[0] > 0.5:  # the client and both servers share these cores with whatever else runs
        print(f"warning: 1-min load average {os.getloadavg()[0]:.2f} before the run; figures may be low", flush=True)
    work = args.work.resolve()
    base = work / "job-base.yaml"
    if args.rebuild or not (work / "built.json").exists():
        base = build(work)
    else:
        print(f"bench-serve: reusing {work} (--rebuild to redo it)", flush=True)
    from data_prep.store import PartyData

    data = PartyData(work / "data" / "leader")
    customers = [bytes(c) for name in data.meta.splits for c in np.asarray(data.customer_ids(name))]
    backends = ["torch", "onnxruntime"] if args.backend == "both" else [args.backend]
    out: dict[str, Any] = {"config": {"customers": len(customers), "vocab_per_party": VOCAB_PER_PARTY,
                                      "seconds": args.seconds, "warmup_s": WARMUP_S, "cores": os.cpu_count(),
                                      "load_average_before": os.getloadavg()},
                           "rows": [], "floor": [], "rss": {}}
    for backend in backends:
        bench_backend(work, base, backend, args, customers, out)
    out["config"]["load_average_after"] = os.getloadavg()
    out["targets"] = [check for backend in backends for check in targets(out, backend)]
    out["decision"] = decide(out, backends)
    report(out, work)


if __name__ == "__main__":
    main()
