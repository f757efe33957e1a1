"""Where a party's training step goes, at the reference configuration, on one thread (what each party has in a
two-party run on this 2-core machine).

Runs the leader's and the follower's step as the training loop does (`leader_train_step` / `follower_train_step`
through a `LocalGrid.star("leader", ("follower",))` whose other end is played by this script with precomputed
tensors, so only the party's own work is timed), under `torch.profiler`, and groups the time of the top-level
operators into buckets:

    GEMM (the MLP's matmuls, forward and backward) · embedding gather · embedding backward (dense grad) ·
    L2 term · Adam · FTRL · other autograd/elementwise · data (reading the batch) · outside torch (Python, wire)

    python -m benchmarks.profile_step [--steps 4] [--role leader|follower] [--threads 1] [--precision bf16]
                                      [--gemm auto|mkl|onednn]

`--gemm` sets the party's `parties.<key>.gemm` (`vfl_cli.model.kernels`): mkl is torch's own F.linear, onednn
the oneDNN linear (`OneDnnLinearFunction` forward, `OneDnnLinearFunctionBackward` backward; both in GEMM).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.train import BENCH_DIR, write_data, write_job
from data_prep.store import open_party
from vfl_cli.grid import LocalGrid
from vfl_cli.job import load_job
from vfl_cli.protocol import BatchKey
from vfl_cli.reporter import SilentReporter
from vfl_cli.telemetry import Telemetry
from vfl_cli.train.batches import iterate
from vfl_cli.train.loop import PartyRun, follower_train_step, leader_train_step
from vfl_cli.train.parties import build_party

BUCKETS = (
    ("GEMM", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "OneDnnLinearFunction")),
    ("ReLU", ("aten::relu", "aten::relu_")),
    ("embedding gather", ("aten::embedding", "aten::index_select", "aten::embedding_bag")),
    ("embedding backward", ("aten::embedding_backward", "aten::embedding_dense_backward",
                            "aten::index_add_", "aten::embedding_dense_backward_cpu")),
    ("Adam", ("Optimizer.step#Adam.step",)),
    ("FTRL", ("Optimizer.step#Ftrl.step",)),
    ("zero_grad", ("Optimizer.zero_grad#Adam.zero_grad", "Optimizer.zero_grad#Ftrl.zero_grad")),
)


BACKWARD_BUCKETS = (  # autograd runs each backward node as a top-level "evaluate_function: <Node>" event
    ("GEMM", ("AddmmBackward", "MmBackward", "OneDnnLinearFunctionBackward")),
    ("embedding backward", ("EmbeddingBackward", "EmbeddingBagBackward")),
    ("L2 term", ("SumBackward", "PowBackward", "MulBackward0", "SquareBackward")),
    ("ReLU backward", ("ReluBackward", "ThresholdBackward")),
    ("bf16 casts", ("ToCopyBackward",)),
)


def bucket_of(name: str) -> str:
    for bucket, names in BUCKETS:
        if name in names:
            return bucket
    if name.startswith("autograd::engine::evaluate_function"):
        for bucket, markers in BACKWARD_BUCKETS:
            if any(marker in name for marker in markers):
                return bucket
        return "other backward"
    return "other torch ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--role", choices=("leader", "follower"), default="leader")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--gemm", choices=("auto", "mkl", "onednn"), default="auto",
                        help="the party's GEMM path (parties.<key>.gemm; default auto)")
    parser.add_argument("--top", type=int, default=0, help="also list the N largest top-level operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
        workdir = Path(tmp)
        job = load_job(write_job(workdir, "profile", None))
        job = job.model_copy(update={"train": job.train.model_copy(update={"precision": args.precision})})
        parties = {key: party.model_copy(update={"gemm": args.gemm}) for key, party in job.parties.items()}
        job = job.model_copy(update={"parties": parties})
        warmup = 2
        write_data(job, train_rows=(warmup + args.steps) * job.train.batch_size)
        data = open_party(job.data.dir, args.role)
        party = build_party(job, args.role, data.meta, torch.device("cpu"))
        choice = party.gemm
        other = "follower" if args.role == "leader" else "leader"
        grids = LocalGrid.star("leader", ("follower",), 60)
        mine, theirs = grids[args.role], grids[other]
        run = PartyRun(job, args.role, data, party, mine, SilentReporter(), workdir / "run", Telemetry(args.role))
        batch_size = job.train.batch_size
        # The other party, played with fixed tensors: it answers each message at once.
        stop = threading.Event()

        def other_side() -> None:
            fake = {"wide": torch.randn(batch_size, 1) * 0.01, "deep": torch.randn(batch_size, 1) * 0.01}
            step = 0
            while not stop.is_set():
                key = BatchKey("train", 0, step)
                try:
                    if args.role == "leader":
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
        step_fn = leader_train_step if args.role == "leader" else follower_train_step
        wall: list[float] = []
        data_s = 0.0
        totals: dict[str, float] = defaultdict(float)
        names: dict[str, float] = defaultdict(float)
        for step in range(warmup + args.steps):
            started = time.perf_counter()
            batch = next(batches)
            loaded = time.perf_counter()
            profiling = step >= warmup
            if profiling:
                data_s += loaded - started
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    step_fn(run, batch, BatchKey("train", 0, step))
                for event in prof.events():
                    # Top-level operators only: their times already include the ops they call.
                    if event.cpu_parent is None:
                        totals[bucket_of(event.name)] += event.cpu_time_total / 1e6
                        names[event.name] += event.cpu_time_total / 1e6
                wall.append(time.perf_counter() - loaded)
            else:
                step_fn(run, batch, BatchKey("train", 0, step))
        stop.set()
        mine.abort("done")
        steps = args.steps
        step_s = sum(wall) / steps
        print(f"{args.role}, {args.precision}, {args.threads} thread(s), batch {batch_size}, {steps} profiled steps: "
              f"{step_s:.3f} s per step (profiled; the profiler adds a little)")
        if choice is not None:
            print(choice.describe())
        print(f"{'bucket':<22} {'s/step':>7} {'share':>6}")
        accounted = 0.0
        for bucket, seconds in sorted(totals.items(), key=lambda item: -item[1]):
            accounted += seconds / steps
            print(f"{bucket:<22} {seconds / steps:>7.3f} {seconds / steps / step_s:>6.1%}")
        print(f"{'outside torch ops':<22} {step_s - accounted:>7.3f} {(step_s - accounted) / step_s:>6.1%}")
        print(f"{'data (read batch)':<22} {data_s / steps:>7.3f}  (before the step, not in the share)")
        if args.top:
            print("\nlargest top-level operators:")
            for name, seconds in sorted(names.items(), key=lambda item: -item[1])[: args.top]:
                print(f"  {seconds / steps:7.3f}  {name[:100]}")


if __name__ == "__main__":
    main()
