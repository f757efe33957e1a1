"""The ceiling of the label party's HTTP stack on this machine: `GET /healthz` (no body, no model, no follower hop)
from 1 and 64 closed-loop keep-alive TLS connections, against bench-serve's torch job. This is the most any
request to `vfl serve` can reach here; a predict does more. It is the evidence behind docs/serving-bench.md.

    python -m benchmarks.serve_ceiling [--work runs/bench-serve] [--seconds 8]   (after `make bench-serve`)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import time
from pathlib import Path

from benchmarks.serve import cpu_ticks, start_serve, stop, wait_healthy, wait_serving
from benchmarks.train import REPO
from vfl_cli.job import load_job


async def healthz_rate(host: str, port: int, context: ssl.SSLContext, concurrency: int, seconds: float) -> float:
    """GET /healthz answered per second by `concurrency` closed-loop connections."""
    connections = [await asyncio.open_connection(host, port, ssl=context) for _ in range(concurrency)]
    loop = asyncio.get_running_loop()
    until, answered = loop.time() + seconds, 0
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while loop.time() < until:
            writer.write(request)
            headers = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(headers.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]))
            answered += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(*connection) for connection in connections))
    return answered / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-serve")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    job_path = args.work / "job-torch.yaml"
    if not job_path.exists():
        raise SystemExit(f"{job_path}: run `make bench-serve` first")
    job = load_job(job_path)
    processes = {}
    try:
        for party in ("follower", "leader"):
            processes[party] = start_serve(job_path, party, args.work)
            wait_serving(processes[party], args.work / f"serve-{job_path.stem}-{party}.out")
        wait_healthy(job)
        host, port = job.serve.listen.rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(job.tls.ca))
        for concurrency in (1, 64):
            before = cpu_ticks(processes["leader"].pid)
            rate = asyncio.run(healthz_rate(host, int(port), context, concurrency, args.seconds))
            cores = (cpu_ticks(processes["leader"].pid) - before) / os.sysconf("SC_CLK_TCK") / args.seconds
            print(f"GET /healthz, concurrency {concurrency}: {rate:,.0f} requests/s, the label party at {cores:.2f} "
                  f"cores, {cores / rate * 1e6:.0f} us of CPU per request")
    finally:
        for process in processes.values():
            stop(process)


if __name__ == "__main__":
    main()
