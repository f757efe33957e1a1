"""Workers per party at the reference configuration: per step and per worker, the compute, the all-reduce bytes
and time, the cut-layer bytes, and the epoch time on full Criteo they imply for W = 1, 2, 4, 8 (issue 20).

In one run (`python -m benchmarks.scale`, about two minutes here):

1. Builds the leader's and the follower's party at the reference configuration (`benchmarks.train.write_job`,
   `write_data`, `vfl_cli.train.parties.build_party`) and counts the values one `Workers.sum_gradients` reduces:
   every parameter of the party's optimisers (embedding tables included: their gradients are dense) plus the
   loss share, fp32. A ring all-reduce of N bytes sends, and receives, 2(W-1)/W x N bytes per worker.
   Cut-layer bytes per worker per step: the tensors of `job.cut_widths` for that worker's B/W rows, fp32, both
   directions (follower -> leader embeddings, leader -> follower gradients), as the msgpack body
   `vfl_cli.transport.codec.encode` writes (the payload and the body's framing; HTTP headers and TLS records
   not counted).
2. Measures each party's step on one thread (`torch.set_num_threads(1)`), as `benchmarks.profile_step` runs it:
   `leader_train_step` / `follower_train_step` through a `LocalGrid` whose other end is a thread answering at once
   with fixed tensors, on rows B/W of every batch of B (worker 0's shard; the leader's loss scaled by the
   shard's share, as in a run of W workers); median of `--steps` steps after `--warmup`. The step here has no
   all-reduce (a party of one): that is measured apart.
3. Measures `Workers.sum_gradients` (concatenate every gradient, one gloo `all_reduce`, copy back) between 2
   processes on 127.0.0.1 (`GLOO_SOCKET_IFNAME=lo`), with tensors of the leader's and the follower's parameter
   shapes, one thread each; and the bare `dist.all_reduce` of the flat buffer alone; median of `--reps`.
   Bus bandwidth = 2(W-1)/W x N / t (= N / t at W = 2). W = 4 and 8 are extrapolated: the concatenate/copy-back
   overhead measured at W = 2 plus 2(W-1)/W x N at that bus bandwidth (no per-hop latency term; on this 2-core
   machine 4 or 8 processes would only share the cores, so they are not run).
4. Prints the table: implied step time per party = its compute (measured) + its all-reduce (measured at W = 2,
   extrapolated at 4 and 8); implied step = the larger party's; implied epoch on full Criteo =
   ceil(train rows / B) steps x implied step, assuming every worker has a core of its own. Left out: the
   HTTPS hop of the cut tensors (`make bench-train` measures it at W = 1: a few ms per step) and the time the
   parties wait for each other beyond the slower one's step.

    python -m benchmarks.scale [--steps 5] [--warmup 2] [--reps 5] [--workers 1,2,4,8] [--rows 45840617]
                               [--device cpu|cuda] [--skip-allreduce]

`--device cuda` times the parties' compute on the GPU (CUDA synchronised around every step) and the
all-reduce with NCCL between 2 GPUs where there are 2, else skips it; not run on this machine (no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.train import BENCH_DIR, free_port, write_data, write_job
from data_prep.store import open_party
from vfl_cli.grid import LocalGrid
from vfl_cli.job import JobSpec, load_job
from vfl_cli.protocol import BatchKey
from vfl_cli.reporter import SilentReporter
from vfl_cli.telemetry import Telemetry
from vfl_cli.train.batches import iterate
from vfl_cli.train.loop import PartyRun, follower_train_step, leader_train_step
from vfl_cli.train.parties import build_party
from vfl_cli.train.workers import Workers, parameters_of, shard_bounds
from vfl_cli.transport.codec import TensorMessage, encode

# Full Criteo (Kaggle Display Advertising Challenge, Criteo Labs 2014): train.txt has 45,840,617 labelled rows
# (`wc -l train.txt`), the figure the Criteo benchmarks quote.
CRITEO_TRAIN_ROWS = 45_840_617
ROLES = ("leader", "follower")
MB = 1e6
FP32 = 4


def ring_factor(workers: int) -> float:
    """What a ring all-reduce of N bytes sends (and receives) per worker, as a multiple of N."""
    return 2 * (workers - 1) / workers


# ------------------------------------------------------------------------------------------ bytes


def gradient_values(party: Any) -> int:
    """The values one `Workers.sum_gradients` reduces: every parameter of the optimisers, and the loss share."""
    return sum(p.numel() for p in parameters_of(party.optimizers)) + 1


def cut_body_bytes(job: JobSpec, rows: int) -> dict[str, int]:
    """The msgpack body of one cut-layer message of `rows` rows, per kind (a 16-hex session id, as a run's)."""
    widths = job.cut_widths("follower")
    sizes = {}
    for kind in ("embeddings", "gradients"):
        tensors = {name: torch.zeros(rows, width) for name, width in widths.items()}
        message = TensorMessage("0" * 16, kind, BatchKey("train", 0, 10_000), 10_000, tensors)
        sizes[kind] = len(encode(message, job.fingerprint()))
    return sizes


# ---------------------------------------------------------------------------------------- compute


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_party(job: JobSpec, role: str, workers: list[int], warmup: int, steps: int, workdir: Path,
               device: torch.device) -> tuple[dict[int, list[float]], int]:
    """Seconds per step of `role` on worker 0's shard of every batch, for each W; and the values it reduces."""
    data = open_party(job.data.dir, role)
    party = build_party(job, role, data.meta, device)
    other = "follower" if role == "leader" else "leader"
    widths = job.cut_widths("follower")
    batch_size = job.train.batch_size
    seconds: dict[int, list[float]] = {}
    for w in workers:
        rows = shard_bounds(batch_size, w)[1]
        grids = LocalGrid.star("leader", ("follower",), 60)
        mine, theirs = grids[role], grids[other]
        run = PartyRun(job, role, data, party, mine, SilentReporter(), workdir / f"run-{role}-{w}", Telemetry(role))
        stop = threading.Event()

        def other_side(rows: int = rows, theirs: Any = theirs, stop: threading.Event = stop) -> None:
            fake = {name: torch.randn(rows, width) * 0.01 for name, width in widths.items()}
            step = 0
            while not stop.is_set():
                key = BatchKey("train", 0, step)
                try:
                    if role == "leader":
                        theirs.send("leader", "embeddings", key, fake)
                        theirs.receive("leader", "gradients", key)
                    else:
                        theirs.receive("follower", "embeddings", key)
                        theirs.send("follower", "gradients", key, {k: v * 1e-4 for k, v in fake.items()})
                except Exception:
                    return
                step += 1

        helper = threading.Thread(target=other_side, daemon=True)
        helper.start()
        batches = iterate(data.split("train"), batch_size, job.seed, 0, shuffle=True)
        times = []
        for step in range(warmup + steps):
            batch = next(batches).part(slice(0, rows)).to(device)
            key = BatchKey("train", 0, step)
            synchronize(device)
            started = time.perf_counter()
            if role == "leader":
                leader_train_step(run, batch, key, batch_size)
            else:
                follower_train_step(run, batch, key)
            synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - started)
        stop.set()
        mine.abort("done")
        helper.join(timeout=5)
        seconds[w] = times
        print(f"  {role:<8} W={w} ({rows:>6} rows): median {statistics.median(times):.3f} s "
              f"(steps {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    return seconds, gradient_values(party)


# -------------------------------------------------------------------------------------- all-reduce


def party_shapes(job: JobSpec, role: str) -> list[tuple[int, ...]]:
    data = open_party(job.data.dir, role)
    party = build_party(job, role, data.meta, torch.device("cpu"))
    return [tuple(p.shape) for p in parameters_of(party.optimizers)]


def allreduce_worker(rank: int, size: int, port: int, shapes: dict[str, list[tuple[int, ...]]], reps: int,
                     out: str, cuda: bool) -> None:
    """One of `size` processes: `Workers.sum_gradients` and the bare all_reduce, for each party's shapes."""
    torch.set_num_threads(1)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    workers = Workers(rank, size, rank, device)
    results: dict[str, Any] = {}
    for role, role_shapes in shapes.items():
        params = [torch.nn.Parameter(torch.zeros(shape, device=device)) for shape in role_shapes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        optimizer = torch.optim.SGD(params, lr=0.0)
        flat = torch.ones(sum(p.numel() for p in params) + 1, device=device)
        full, bare = [], []
        for rep in range(reps + 1):  # the first is a warm-up
            dist.barrier()
            synchronize(device)
            started = time.perf_counter()
            workers.sum_gradients([optimizer], 0.5)
            synchronize(device)
            middle = time.perf_counter()
            dist.barrier()
            synchronize(device)
            again = time.perf_counter()
            dist.all_reduce(flat)
            synchronize(device)
            ended = time.perf_counter()
            if rep:
                full.append(middle - started)
                bare.append(ended - again)
        results[role] = {"values": flat.numel(), "sum_gradients_s": full, "all_reduce_s": bare}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure_allreduce(shapes: dict[str, list[tuple[int, ...]]], reps: int, workdir: Path,
                      cuda: bool) -> dict[str, Any]:
    out = workdir / "allreduce.json"
    mp.spawn(allreduce_worker, args=(2, free_port(), shapes, reps, str(out), cuda), nprocs=2, join=True)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ table


def linear_fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b x (a = the mean and b = 0 with one point)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    return mean_y - b * mean_x, b


def epoch_s(rows: int, batch_size: int, step_s: float) -> float:
    return math.ceil(rows / batch_size) * step_s


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per party and W (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed all-reduces per party (median)")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--rows", type=int, default=CRITEO_TRAIN_ROWS, help="train rows of an epoch")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip-allreduce", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    device = torch.device(args.device)
    torch.set_num_threads(1)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
        workdir = Path(tmp)
        job = load_job(write_job(workdir, "scale", None))
        batch_size = job.train.batch_size
        write_data(job, train_rows=(args.warmup + args.steps) * batch_size)
        print(f"reference job: batch {batch_size}, emb {job.model.emb_dim}, MLP {job.model.deep_layers}, "
              f"cut widths {job.cut_widths('follower')}; {args.device}, 1 thread per party", flush=True)
        compute: dict[str, dict[int, float]] = {}
        values: dict[str, int] = {}
        for role in ROLES:
            times, values[role] = time_party(job, role, counts, args.warmup, args.steps, workdir, device)
            compute[role] = {w: statistics.median(t) for w, t in times.items()}
        reduce: dict[str, Any] = {}
        can_reduce = not args.skip_allreduce and (device.type == "cpu" or torch.cuda.device_count() >= 2)
        if can_reduce:
            shapes = {role: party_shapes(job, role) for role in ROLES}
            reduce = measure_allreduce(shapes, args.reps, workdir, device.type == "cuda")
        backend = "nccl" if device.type == "cuda" else "gloo"

        for role in ROLES:
            a, b = linear_fit([shard_bounds(batch_size, w)[1] for w in counts], [compute[role][w] for w in counts])
            print(f"{role} compute ~ {a:.3f} s + {b * 1e6:.1f} us x rows (least squares over W; the first term does "
                  f"not shrink with W: the optimisers over the whole tables, the dense embedding gradient, Python)")
        print("\ngradient values per all-reduce (fp32, + 1 for the loss share): "
              + ", ".join(f"{role} {values[role]:,} = {values[role] * FP32 / MB:.1f} MB" for role in ROLES))
        fit: dict[str, tuple[float, float]] = {}  # role -> (overhead s, bus bytes/s) from W = 2
        for role in ROLES:
            if role not in reduce:
                continue
            n_bytes = reduce[role]["values"] * FP32
            full = statistics.median(reduce[role]["sum_gradients_s"])
            bare = statistics.median(reduce[role]["all_reduce_s"])
            bus = ring_factor(2) * n_bytes / bare
            fit[role] = (max(full - bare, 0.0), bus)
            print(f"{backend} all-reduce, 2 processes on 127.0.0.1, {role}'s {n_bytes / MB:.1f} MB: sum_gradients "
                  f"median {full:.3f} s (reps {', '.join(f'{t:.3f}' for t in reduce[role]['sum_gradients_s'])}); "
                  f"bare all_reduce {bare:.3f} s = {bus / 1e9:.2f} GB/s bus bandwidth; "
                  f"concatenate + copy back {full - bare:.3f} s", flush=True)
        body = {w: cut_body_bytes(job, shard_bounds(batch_size, w)[1]) for w in counts}

        steps_per_epoch = math.ceil(args.rows / batch_size)
        print(f"\nper step, per worker; epoch = {steps_per_epoch:,} steps ({args.rows:,} rows / {batch_size}); "
              f"M = measured, X = extrapolated (ring formula at the measured W=2 bandwidth), "
              f"I = implied (sum of the figures); one core (or GPU) per worker assumed")
        header = (f"{'W':>2} {'rows/wkr':>8} | {'leader s':>9} {'follower s':>10} | {'AR MB L/F':>11} "
                  f"{'AR sent MB L/F':>15} {'AR s L/F':>15} | {'cut MB/step':>11} | {'step s':>8} "
                  f"{'epoch':>10} {'speed-up':>8}")
        print(header)
        print("-" * len(header))
        base = None
        for w in counts:
            rows = shard_bounds(batch_size, w)[1]
            parts = []
            step = 0.0
            mark = "M" if w <= 2 else "X"
            for role in ROLES:
                if w == 1:
                    seconds = 0.0
                elif role in fit and w == 2:
                    seconds = statistics.median(reduce[role]["sum_gradients_s"])
                elif role in fit:
                    overhead, bus = fit[role]
                    seconds = overhead + ring_factor(w) * values[role] * FP32 / bus
                else:
                    seconds = math.nan
                parts.append(seconds)
                step = max(step, compute[role][w] + seconds)
            cut_mb = (body[w]["embeddings"] + body[w]["gradients"]) / MB
            epoch = epoch_s(args.rows, batch_size, step)
            base = base or epoch
            ar_mb = "/".join(f"{values[r] * FP32 / MB:.1f}" for r in ROLES) if w > 1 else "0"
            sent = "/".join(f"{ring_factor(w) * values[r] * FP32 / MB:.1f}" for r in ROLES) if w > 1 else "0"
            ar_s = "/".join(f"{s:.3f}" for s in parts) + (f" {mark}" if w > 1 else "")
            print(f"{w:>2} {rows:>8} | {compute['leader'][w]:>7.3f} M {compute['follower'][w]:>8.3f} M | "
                  f"{ar_mb:>11} {sent:>15} {ar_s:>15} | {cut_mb:>11.3f} | {step:>6.3f} I "
                  f"{fmt_duration(epoch):>10} {base / epoch:>7.2f}x")
        print(f"\ncut MB/step: both directions between worker i and its peer, msgpack body (payload "
              f"{sum(job.cut_widths('follower').values())} fp32 values per row per direction); HTTPS hop not "
              f"in the step time. all-reduce: 'AR MB' the buffer, 'AR sent MB' what a ring sends (and receives) "
              f"per worker, 2(W-1)/W x buffer.")


if __name__ == "__main__":
    main()
