"""Training throughput at the reference configuration: plain torch vs `--role local` vs two parties over HTTPS,
in fp32 and bf16, and one label party with 1, 2 and 3 followers over HTTPS.

What it measures (one run, one table, figures also in runs/bench/train.json):

1. `plain torch fp32` / `bf16`: `SplitModel` (both bottoms + top in one module) trained as a torch user would
   write it: FTRL on the wide parameters, `torch.optim.Adam` (its default loop over tensors) on the rest, the
   L2 term on both deep tables in the loss, a plain loop, `torch.set_num_threads(2)`, batches read from the same
   prepared arrays with the trainer's own `iterate`; bf16 is the same loop under `torch.autocast` bfloat16.
   This row is the yardstick the ratios are taken against; it keeps the plain optimiser and L2 on purpose.
2. `local`: `run_local(job, train_session)`: both parties in one process, two threads joined by `LocalGrid`,
   1 torch thread, as `vfl train --role local` sets for two 1-thread parties (each party thread computes on its
   own core). Speed from the step timestamps
   the leader writes to metrics.jsonl (log_every 1).
3. `two-party HTTPS fp32` / `bf16` / `fp32 6-bit`: two real processes, `python -m vfl_cli.app train --role
   leader|follower`, on 127.0.0.1 with mutual TLS (certificates from `vfl certs`), `threads: 1` each, with
   `train.precision` fp32 or bf16, and one row with both cut-layer tensors quantised to 6 bits. Speed from the
   leader's metrics.jsonl; bytes per step from the processes' final `... sent X MB, received Y MB` lines.

4. `k follower(s) HTTPS fp32` (k = 1, 2, 3; `--followers`): one label party and k followers, k + 1 processes
   `python -m vfl_cli.app train --party KEY` (leader, follower1..k) on 127.0.0.1 with mutual TLS, fp32,
   `threads: 1` each. The leader keeps its 20 fields; the two-party follower's 19 fields are divided between
   the k followers (19; 10+9; 7+6+6), with the same data as the two-party rows (same draws and labels, each
   follower's id slices rebased, so the followers' vocabularies add up to the follower's 200,000 ids and the
   model is the same size in every row). Per row: samples/s as the two-party rows measure it (leader's
   metrics.jsonl, timed steps only), its ratio to the two-party HTTPS fp32 row of the same run, the leader's
   wait per step for the slowest follower's cut (mean `cut_wait_s` of its step records over the timed steps),
   and peak RSS (the leader's, and the largest follower's). On a 2-core machine 2 and 3 followers mean 3 and 4
   one-thread processes sharing 2 cores. Printed as a table of their own after the main one.
   `--only followers` runs just these rows and, as their reference in the same run, the two-party HTTPS fp32
   row (without the plain row, the "x plain" ratios are "-").

First-step latency: from the start of training (after the handshake; the loop's start for plain torch) to the
end of the first step, i.e. what a user waits before the first step is done.

Every row runs in its own child process, so each peak RSS (`os.wait4` rusage `ru_maxrss`) is that row's alone.
Samples/s count only the timed steps: the clock starts at the end of the last warm-up step and stops at the
end of the last timed step, so warm-up, the checkpoint and the end-of-epoch eval are excluded in every row.

GEMM: before the rows, both GEMM paths (`vfl_cli.model.kernels`: torch's F.linear = mkl, and onednn) are timed
once at the leader's first layer ([batch, fields x emb_dim] x [.., first width]), 1 thread, fp32 and bf16; each
row's `gemm GFLOP/s` column names its path (`auto>PATH`: the parties' `gemm: auto`, with the path each party
picked, from the `gemm` of its metrics.jsonl start record) and that path's figure.

Data: synthetic prepared arrays written straight in the store format (`data_prep.store`) under a temp dir
in runs/bench/: per field, ids drawn Zipf-like within the field's slice of a 200,000-id vocabulary per
party, vals 1.0 for categorical fields and uniform for dense ones, labels from a planted rule on both
parties' fields. The test split is one small batch, because each epoch ends with an eval.

    python -m benchmarks.train [--steps 12] [--warmup 2] [--skip-two-party] [--only followers]
                               [--followers 1,2,3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_prep.schema import PartySchema
from data_prep.store import PartyMeta, write_meta, write_split
from vfl_cli.job import JobSpec, load_job
from vfl_cli.report.records import read_records

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "runs" / "bench"
REFERENCE_JOB = REPO / "jobs" / "criteo.yaml"
VOCAB_PER_PARTY = 200_000
TEST_ROWS = 2_000  # one small eval batch: every epoch ends with an eval, which is not what we time
ZIPF_A = 1.2  # Criteo's categorical value counts fall off roughly like this
ROLES = ("leader", "follower")
GIB = 1 << 30

TARGET_FP32_RATIO = 1.25  # two-party HTTPS fp32 vs plain torch fp32 (MindSpore Federated: 1.23-1.24x)
TARGET_BF16_RATIO = 2.5  # two-party HTTPS bf16 vs plain torch fp32 (2x MindSpore's ratio)
TARGET_RSS_BYTES = int(1.5 * GIB)  # per party (MindSpore Federated: 3.9-4.1 GiB)
# MindSpore 2.0.0 + MindSpore Federated 0.1.0, CPU, splitnn_criteo unchanged, on this machine; measured outside
# this project and reported in issue 10 (not re-measured here).
MINDSPORE = "MindSpore Federated 7,650-7,770 samples/s = 1.23-1.24x its run's plain torch, 3.9-4.1 GiB per party"
QUANTIZED_BITS = 6  # the extra two-party row: 6-bit cut-layer tensors, 0.75 byte per value instead of 4
TWO_PARTY_DEADLINE_S = 600.0  # both processes must be done by then, or they are killed


@dataclass
class Row:
    """One line of the table; RSS in bytes per process (the local row's one process holds both parties)."""

    name: str
    samples_per_s: float | None = None  # timed samples / timed wall time
    first_step_s: float | None = None  # start of training to the end of step 1
    median_samples_per_s: float | None = None  # batch / median step time: robust to a busy neighbour
    peak_rss: dict[str, int] = field(default_factory=dict)
    bytes_per_step: dict[str, float] = field(default_factory=dict)  # "follower->leader", "leader->follower"
    bytes_note: str = ""  # measured or computed, and what the count includes
    note: str = ""
    followers: int | None = None  # the star rows: how many followers share the two-party follower's columns
    cut_wait_s: float | None = None  # the star rows: the leader's mean `cut_wait_s` over the timed steps
    gemm: str = ""  # the GEMM path of its dense layers and its GFLOP/s at the first layer (`gemm_figures`)
    gemm_picks: dict[str, str] = field(default_factory=dict)  # each party's `gemm: auto` pick, from its metrics


# ------------------------------------------------------------------------------------------- GEMM paths


def first_layer(job: JobSpec) -> tuple[int, int, int]:
    """The leader's first dense layer: batch rows x its input width (fields x emb_dim) -> the first MLP width."""
    return job.train.batch_size, len(job.leader.fields) * job.model.emb_dim, job.model.deep_layers[0]


def gemm_figures(job: JobSpec) -> dict[str, Any]:
    """Both GEMM paths' GFLOP/s (forward + backward of one layer, 1 thread, best of 2) at the first layer's
    shape in fp32 and bf16, measured once per run, and the path `gemm: auto` picks from its own short timing."""
    import torch

    from vfl_cli.model.kernels import choose_gemm, gemm_gflops

    shape = first_layer(job)
    figures: dict[str, Any] = {"shape": list(shape), "threads": 1}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        figures[precision] = {path: gemm_gflops(path, shape, dtype, reps=2, threads=1).step
                              for path in ("mkl", "onednn")}
        figures[precision]["auto"] = choose_gemm("auto", shape, 1, precision == "bf16").path
    return figures


def gemm_label(figures: dict[str, Any], precision: str, setting: str, picks: dict[str, str] | None = None) -> str:
    """What a row ran: `mkl` (torch's own F.linear, the in-process rows) or `auto>PATH` (the parties' `gemm: auto`:
    each party's pick from its metrics.jsonl, `auto>KEY PATH, ...` where they differ; without picks, this
    process's own pick), and that path's GFLOP/s at the leader's first layer."""
    if setting != "auto":
        return f"{setting} {figures[precision][setting]:.0f}"
    paths = sorted(set((picks or {}).values())) or [figures[precision]["auto"]]
    if len(paths) == 1:
        return f"auto>{paths[0]} {figures[precision][paths[0]]:.0f}"
    return "auto>" + ", ".join(f"{key} {path}" for key, path in sorted((picks or {}).items()))


def gemm_picks(run_dir: Path) -> dict[str, str]:
    """Each party's GEMM path as its training start (or resume) record in <run_dir>/<key>/metrics.jsonl says."""
    return {metrics.parent.name: record["gemm"] for metrics in sorted(run_dir.glob("*/metrics.jsonl"))
            for record in read_records(metrics) if record.get("event") in ("start", "resume") and "gemm" in record}


def print_gemm_header(figures: dict[str, Any]) -> None:
    rows, d_in, d_out = figures["shape"]
    cells = "; ".join(f"{precision} mkl {figures[precision]['mkl']:.0f}, onednn {figures[precision]['onednn']:.0f} "
                      f"(auto picks {figures[precision]['auto']})" for precision in ("fp32", "bf16"))
    print(f"GEMM at the first layer [{rows}, {d_in}] x [{d_in}, {d_out}], 1 thread, forward + backward, GFLOP/s: "
          f"{cells}. The plain and joint rows run torch's F.linear (mkl); the parties run `gemm: auto` and time it "
          f"themselves at start; the gemm column shows each party's pick (its metrics.jsonl start record).",
          flush=True)


# ------------------------------------------------------------------------------------------------ data


def zipf_ids(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """Ranks 0..size-1, heavy-headed like real categorical values; the tail past `size` folds back in."""
    return ((rng.zipf(ZIPF_A, rows) - 1) % size).astype(np.int32)


def party_columns(
    rng: np.random.Generator, schema: PartySchema, rows: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """ids int32 [rows, F] (each field in its own id slice), vals float32 [rows, F], field offsets."""
    fields = schema.fields
    width = VOCAB_PER_PARTY // len(fields)
    offsets = {name: i * width for i, name in enumerate(fields)}
    ids = np.empty((rows, len(fields)), dtype=np.int32)
    vals = np.ones((rows, len(fields)), dtype=np.float32)
    for column, name in enumerate(fields):
        ids[:, column] = offsets[name] + zipf_ids(rng, rows, width)
        if schema.kinds[name] == "numeric":
            vals[:, column] = rng.random(rows, dtype=np.float32)
    return ids, vals, offsets


def planted_labels(rng: np.random.Generator, leader: np.ndarray, follower: np.ndarray) -> np.ndarray:
    """Clicks from a rule that needs both parties: head values of one categorical field each, plus noise."""
    # Column 7 is C1 at the leader and C14 at the follower; rank 0..2 of a field is its commonest values.
    logit = 1.2 * (leader[:, 7] % 7 < 2) - 1.2 * (follower[:, 6] % 5 < 2) - 1.0
    return (rng.random(len(logit)) < 1 / (1 + np.exp(-logit))).astype(np.float32)


def two_party_columns(
    job: JobSpec, train_rows: int, seed: int = 0
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, dict[str, int]]], np.ndarray]:
    """The two-party job's columns (ids, vals, field offsets) by role, and the labels, train rows then test."""
    rng = np.random.default_rng(seed)
    rows = train_rows + TEST_ROWS
    columns = {role: party_columns(rng, job.table_schema(role), rows) for role in ROLES}
    return columns, planted_labels(rng, columns["leader"][0], columns["follower"][0])


def write_data(job: JobSpec, train_rows: int, seed: int = 0) -> None:
    """Both parties' prepared data, aligned (same sample ids, same order), in the job's data.dir."""
    columns, labels = two_party_columns(job, train_rows, seed)
    write_parties(job, columns, labels, train_rows, {role: VOCAB_PER_PARTY for role in ROLES})


def write_parties(job: JobSpec, columns: dict[str, tuple[np.ndarray, np.ndarray, dict[str, int]]],
                  labels: np.ndarray, train_rows: int, vocab: dict[str, int]) -> None:
    """Every party's prepared data (columns by party key), aligned, in the job's data.dir."""
    rows = train_rows + TEST_ROWS
    sample_ids = np.arange(rows, dtype=np.int64)
    for role, (ids, vals, offsets) in columns.items():
        leader = job.is_leader(role)
        splits = {}
        for split, part in (("train", slice(0, train_rows)), ("test", slice(train_rows, rows))):
            arrays = {"ids": ids[part], "vals": vals[part], "sample_ids": sample_ids[part]}
            if leader:
                arrays["labels"] = labels[part]
            splits[split] = write_split(
                job.data.dir / role / split, arrays["ids"], arrays["vals"], arrays.get("labels"), arrays["sample_ids"]
            )
        meta = PartyMeta(
            role=role, fields=job.party(role).fields, has_labels=leader, vocab_size=vocab[role],
            field_offsets=offsets, threshold=job.data.threshold, source="benchmarks.train synthetic",
            splits=splits, kinds=tuple(kind for _, kind in job.table_schema(role).columns),
            task=job.table_schema(role).task,
        )
        write_meta(job.data.dir / role, meta)


# ------------------------------------------------------------------------------------------------ jobs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 all free on 127.0.0.1 (worker i of a party listens on its port + i)."""
    while True:
        base = free_port()
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        if base + count <= 65536:
            return base


def write_job(workdir: Path, row: str, certs: Path | None, privacy: dict[str, Any] | None = None,
              precision: str = "fp32", workers: int = 1, device: str = "cpu") -> Path:
    """jobs/criteo.yaml with this run's paths: one epoch, a step record every step, fresh loopback ports (`workers`
    free ports from each party's), on `device`."""
    spec: dict[str, Any] = yaml.safe_load(REFERENCE_JOB.read_text())
    if privacy is not None:
        spec["privacy"] = privacy
    spec["data"]["dir"] = str(workdir / "data")
    spec["train"] |= {"epochs": 1, "log_every": 1, "run_dir": str(workdir / f"run-{row}"), "precision": precision}
    spec["transport"] |= {"timeout_s": 300, "connect_timeout_s": 120}
    for role in ROLES:
        party = spec["parties"][role]
        party["listen"] = f"127.0.0.1:{free_ports(workers)}"
        party["workers"], party["device"] = workers, device
        party.pop("key_password_env", None)  # dev keys without a password: nothing secret in a benchmark
        party["cert"], party["key"] = str((certs or workdir) / f"{role}.pem"), str((certs or workdir) / f"{role}.key")
    spec["tls"]["ca"] = str((certs or workdir) / "ca.pem")
    path = workdir / f"job-{row}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------- in-process rows


def timed_rate(step_ends: list[float], warmup: int, batch_size: int) -> float:
    """Samples/s between the end of the last warm-up step and the end of the last step."""
    timed = len(step_ends) - warmup
    return timed * batch_size / (step_ends[-1] - step_ends[warmup - 1])


def median_rate(step_ends: list[float], warmup: int, batch_size: int) -> float:
    """Samples/s of the median timed step; other engineers' jobs on the same 2 cores inflate single steps."""
    durations = np.diff(step_ends[warmup - 1 :])
    return batch_size / float(np.median(durations))


def rates(step_ends: list[float], warmup: int, steps: int, batch_size: int) -> tuple[float, float]:
    ends = step_ends[: warmup + steps]
    if len(ends) < warmup + 1:
        raise RuntimeError(f"only {len(ends)} step records, need more than {warmup} warm-up steps")
    return timed_rate(ends, warmup, batch_size), median_rate(ends, warmup, batch_size)


def plain_forward(model: Any, leader: Any, follower: Any) -> Any:
    """SplitModel's logits [B] as the plain torch formulation writes them (and vfl did before issue 10):
    nn.Embedding lookups times values, out-of-place ReLU. Same weights, same values as the model's forward."""
    import torch

    def bottom(part: Any, ids: Any, vals: Any) -> dict[str, Any]:
        wide = (part.wide_embedding(ids).squeeze(-1) * vals).sum(dim=1, keepdim=True) + part.wide_bias
        x = (part.deep_embedding(ids) * vals.unsqueeze(-1)).view(len(ids), -1)
        for layer in part.deep_mlp:
            x = torch.relu(x) if isinstance(layer, torch.nn.ReLU) else layer(x)
        return {"wide": wide, "deep": x}

    leader_out = bottom(model.leader, leader.ids, leader.vals)
    return model.top([leader_out, bottom(model.followers[0], follower.ids, follower.vals)])[:, 0]


def plain_torch(job: JobSpec, warmup: int, steps: int) -> dict[str, Any]:
    """The yardstick: the whole model in one module, trained as a torch user writes it (and as vfl did before
    issue 10): `plain_forward`, torch.optim.Adam's default loop over tensors, the L2 term in the loss."""
    return joint_torch(job, warmup, steps, plain=True)


def joint_optimised(job: JobSpec, warmup: int, steps: int) -> dict[str, Any]:
    """The same single process with vfl's kernels (embedding_bag forward, fused Adam, L2 as weight decay): what
    the two-party run would be compared with if the yardstick were as tuned as vfl."""
    return joint_torch(job, warmup, steps, plain=False)


def joint_torch(job: JobSpec, warmup: int, steps: int, plain: bool) -> dict[str, Any]:
    from contextlib import nullcontext

    import torch
    import torch.nn.functional as F

    from data_prep.store import open_party
    from vfl_cli.model.build import SplitModel
    from vfl_cli.model.ftrl import Ftrl
    from vfl_cli.model.optimizers import build_optimizers
    from vfl_cli.train.batches import iterate
    from vfl_cli.train.parties import pick_device

    torch.set_num_threads(2)
    device = pick_device(job.leader.device)  # cuda under make bench-gpu
    data = {role: open_party(job.data.dir, role) for role in ROLES}
    model = SplitModel.build(job.model, job.seed, {role: (data[role].meta.vocab_size, data[role].meta.kinds)
                                                   for role in ROLES}).to(device)
    ftrl, adam = job.train.wide_optimizer, job.train.deep_optimizer
    if plain:
        optimizers = [
            Ftrl(model.wide_parameters(), lr=ftrl.lr, l1=ftrl.l1, l2=ftrl.l2,
                 initial_accumulator=ftrl.initial_accumulator),
            torch.optim.Adam(model.deep_parameters(), lr=adam.lr, eps=adam.eps),
        ]
    else:
        optimizers = build_optimizers(model.wide_parameters(), model.deep_parameters(), ftrl, adam,
                                      job.train.l2_coef, model.embedding_tables())
    bf16 = job.train.precision == "bf16"
    batches = [iterate(data[role].split("train"), job.train.batch_size, job.seed, 0, shuffle=True) for role in ROLES]
    start = time.perf_counter()
    step_ends: list[float] = []
    for leader, follower in zip(*batches, strict=True):
        leader, follower = leader.to(device), follower.to(device)
        assert leader.labels is not None
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            if plain:
                logits = plain_forward(model, leader, follower).float()  # (B,)
            else:
                logits = model(leader.ids, leader.vals, follower.ids, follower.vals)[:, 0].float()
        loss = F.binary_cross_entropy_with_logits(logits, leader.labels)
        if plain:
            loss = loss + sum(b.l2_penalty(job.train.l2_coef) for b in model.bottoms())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        loss.item()  # what the split loop does for its log line
        step_ends.append(time.perf_counter())
        if len(step_ends) == warmup + steps:
            break
    return {"step_ends": step_ends, "start": start}


def step_times(metrics: Path) -> tuple[float, list[float]]:
    """The leader's training start and the wall-clock times of its step records, in step order."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = sorted((r["step"], r["time"]) for r in records if r.get("event") == "step")
    start = next(r["time"] for r in records if r.get("event") == "start")
    return start, [t for _, t in steps]


def local_mode(job: JobSpec, warmup: int, steps: int) -> dict[str, Any]:
    """`vfl train --role local` without the console: both parties in this process, joined by LocalGrid."""
    import torch

    from vfl_cli.train.session import local_threads, run_local, train_session

    torch.set_num_threads(local_threads(job) or 2)  # as the CLI does
    run_local(job, train_session)
    start, ends = step_times(job.train.run_dir / "leader" / "metrics.jsonl")
    return {"step_ends": ends, "start": start}


WORKERS = {"plain": plain_torch, "joint": joint_optimised, "local": local_mode}


def run_worker(kind: str, job_path: Path, warmup: int, steps: int, workdir: Path) -> tuple[dict[str, Any], int]:
    """Run one in-process row in a child process; returns its result and its peak RSS in bytes."""
    result = workdir / f"result-{kind}.json"
    command = [sys.executable, "-m", "benchmarks.train", "--worker", kind, "--job", str(job_path),
               "--warmup", str(warmup), "--steps", str(steps), "--result", str(result)]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()  # never leave a child behind (Ctrl-C included)
        os.waitpid(process.pid, 0)
        raise
    process.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; tell Popen
    if process.returncode != 0:
        raise RuntimeError(f"{kind} worker failed with exit code {process.returncode}")
    return json.loads(result.read_text()), usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


# --------------------------------------------------------------------------------------- two-party row


def make_certs(job_path: Path, out: Path) -> None:
    command = [sys.executable, "-m", "vfl_cli.app", "certs", "--job", str(job_path), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"vfl certs failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")


def start_party(role: str, job_path: Path, workdir: Path, flag: str = "--role",
                out: str | None = None) -> subprocess.Popen[bytes]:
    """`vfl train <flag> <role>` (`--role` for the two-party rows, `--party KEY` for the star rows), its output
    in <workdir>/<out or role>.out."""
    log = (workdir / f"{out or role}.out").open("wb")
    # A wide terminal for rich, so the final traffic line is never wrapped.
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vfl_cli.app", "train", flag, role, "--job", str(job_path)]
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def reaped(processes: dict[str, subprocess.Popen[Any]], deadline: float = math.inf,
           poll_s: float = 0.2) -> Iterator[tuple[str, int]]:
    """Each process as it ends (its returncode set), with its peak RSS in bytes (wait4's, so measured to the end);
    TimeoutError once `deadline` (monotonic) passes with any still running."""
    done: set[str] = set()
    while len(done) < len(processes):
        for key, process in processes.items():
            if key in done:
                continue
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == 0:
                continue
            done.add(key)
            process.returncode = os.waitstatus_to_exitcode(status)
            yield key, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
        if len(done) < len(processes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{', '.join(sorted(set(processes) - done))} still running at the deadline")
            time.sleep(poll_s)


def wait_all(processes: dict[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, int]:
    """Reap every party; the first failure or the deadline raises (the caller kills the others). Peak RSS by key."""
    rss: dict[str, int] = {}
    try:
        for role, peak in reaped(processes, deadline):
            rss[role] = peak
            if processes[role].returncode != 0:
                raise RuntimeError(f"the {role} exited with code {processes[role].returncode}")
    except TimeoutError as exc:
        raise RuntimeError(f"two-party run still going after {TWO_PARTY_DEADLINE_S:g} s") from exc
    return rss


def run_parties(keys: Sequence[str], job_path: Path, workdir: Path, flag: str, prefix: str) -> dict[str, int]:
    """`vfl train <flag> KEY` for every party, each its own process with output in <workdir>/<prefix><key>.out;
    waits for all (peak RSS by key). On any failure every process is killed and each one's output tail printed."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for key in keys:
            processes[key] = start_party(key, job_path, workdir, flag=flag, out=f"{prefix}{key}")
        return wait_all(processes, time.monotonic() + TWO_PARTY_DEADLINE_S)
    except BaseException:
        kill_all(processes)
        for key in processes:
            tail = (workdir / f"{prefix}{key}.out").read_text(errors="replace")[-1500:]
            print(f"--- {key} output (tail) ---\n{tail}", file=sys.stderr)
        raise


def kill_all(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.returncode is None:
            process.kill()
            os.waitpid(process.pid, 0)
            process.returncode = -9


TRAFFIC = re.compile(r"(leader|follower) sent ([\d,.]+) MB, received ([\d,.]+) MB")


def traffic_per_step(workdir: Path, train_steps: int, batch_size: int) -> tuple[dict[str, float], str]:
    """Bytes per training step each way, from the final output lines; computed from the shapes if absent."""
    sent: dict[str, float] = {}
    for role in ROLES:
        match = TRAFFIC.search((workdir / f"{role}.out").read_text(errors="replace"))
        if match:
            sent[role] = float(match.group(2).replace(",", "")) * 1e6
    if len(sent) == len(ROLES):
        per_step = {"follower->leader": sent["follower"] / train_steps,
                    "leader->follower": sent["leader"] / train_steps}
        return per_step, "measured: msgpack request bodies of the whole run (handshake, eval too) / train steps"
    payload = 2 * batch_size * 4.0  # two float32 [B, 1] tensors; headers not counted
    return {"follower->leader": payload, "leader->follower": payload}, "computed: 2 x B x 4 bytes, no overhead"


def two_party(name: str, workdir: Path, warmup: int, steps: int, batch_size: int, precision: str = "fp32",
              bits: int | None = None, workers: int = 1, device: str = "cpu") -> Row:
    """Two `vfl train` commands over mutual TLS; with `bits`, both cut-layer tensors travel quantised; with
    `workers`, each command starts that many worker processes (peak RSS: the largest of them)."""
    certs = workdir / "certs"
    row = f"two-party-{precision}" + ("" if bits is None else f"-q{bits}") + ("" if workers == 1 else f"-w{workers}")
    privacy = None if bits is None else {"quantize": {"embeddings": bits, "gradients": bits}}
    job_path = write_job(workdir, row, certs, privacy, precision, workers, device)
    if not (certs / "ca.pem").exists():
        make_certs(job_path, certs)
    rss = run_parties(ROLES, job_path, workdir, "--role", "")
    job = load_job(job_path)
    start, times = step_times(job.train.run_dir / "leader" / "metrics.jsonl")
    per_step, note = traffic_per_step(workdir, len(times), batch_size)
    rate, median = rates(times, warmup, steps, batch_size)
    what = ("2 processes, 1 thread each, mutual TLS" if workers == 1 else
            f"2 parties x {workers} worker processes, 1 thread each, gloo inside a party, mutual TLS between pairs")
    what += "" if bits is None else f", cut layer in {bits} bits"
    return Row(name, rate, times[0] - start, median, rss, per_step, bytes_note=note, note=what,
               gemm_picks=gemm_picks(job.train.run_dir))


# ------------------------------------------------------------------------------------ star rows (k followers)


FOLLOWER_COUNTS = (1, 2, 3)  # the star rows: one label party and k followers


def star_name(k: int) -> str:
    return f"{k} follower{'s' if k > 1 else ''} HTTPS fp32"


def follower_split(fields: tuple[str, ...], k: int) -> list[tuple[str, ...]]:
    """The two-party follower's fields in k contiguous parts, the larger first (19 fields: 19; 10+9; 7+6+6)."""
    return [tuple(part) for part in np.array_split(np.array(fields, dtype=object), k)]


def write_star_job(workdir: Path, k: int, certs: Path) -> Path:
    """jobs/criteo.yaml with the follower's fields divided between follower1..k (each `threads: 1`, as the
    follower is), with this run's paths as `write_job` sets them, fp32."""
    spec: dict[str, Any] = yaml.safe_load(REFERENCE_JOB.read_text())
    row = f"star-{k}"
    spec["data"]["dir"] = str(workdir / f"data-{row}")
    spec["train"] |= {"epochs": 1, "log_every": 1, "run_dir": str(workdir / f"run-{row}"), "precision": "fp32"}
    spec["transport"] |= {"timeout_s": 300, "connect_timeout_s": 120}
    follower = spec["parties"]["follower"]
    parties = {"leader": spec["parties"]["leader"]}
    for i, fields in enumerate(follower_split(tuple(follower["fields"]), k), start=1):
        parties[f"follower{i}"] = {**follower, "name": f"follower{i}", "fields": list(fields)}
    for key, party in parties.items():
        party["listen"] = f"127.0.0.1:{free_port()}"
        party.pop("key_password_env", None)
        party["cert"], party["key"] = str(certs / f"{key}.pem"), str(certs / f"{key}.key")
    spec["parties"] = parties
    spec["tls"]["ca"] = str(certs / "ca.pem")
    path = workdir / f"job-{row}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_star_data(two_party_job: JobSpec, job: JobSpec, train_rows: int) -> None:
    """The two-party rows' data exactly (same draws, same labels), the follower's columns divided between the
    star job's followers: each keeps its fields' id slices, rebased to start at 0, so the followers' vocabularies
    add up to the two-party follower's (200,000 ids) and the whole model is the same size in every row."""
    columns, labels = two_party_columns(two_party_job, train_rows)
    ids, vals, offsets = columns["follower"]
    fields = two_party_job.party("follower").fields
    out = {job.label_party: columns["leader"]}
    vocab = {job.label_party: VOCAB_PER_PARTY}
    first = 0
    for i, key in enumerate(job.followers):
        mine = job.party(key).fields
        assert mine == fields[first : first + len(mine)], "the followers' fields must be the follower's, in order"
        end = first + len(mine)
        base = offsets[mine[0]]
        out[key] = (np.ascontiguousarray(ids[:, first:end] - base), np.ascontiguousarray(vals[:, first:end]),
                    {name: offsets[name] - base for name in mine})
        vocab[key] = (VOCAB_PER_PARTY if i == len(job.followers) - 1 else offsets[fields[end]]) - base
        first = end
    write_parties(job, out, labels, train_rows, vocab)


def step_waits(metrics: Path) -> list[float]:
    """The leader's `cut_wait_s` of each step record, in step order (log_every 1: one per step)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = sorted((r["step"], r["cut_wait_s"]) for r in records if r.get("event") == "step")
    return [wait for _, wait in steps]


def star_traffic(workdir: Path, k: int, keys: tuple[str, ...], leader: str, train_steps: int) -> dict[str, float]:
    """Bytes per training step, all followers -> leader and leader -> all followers, from each process's final
    `<key> sent X MB, received Y MB` line; {} when a line is missing."""
    sent: dict[str, float] = {}
    for key in keys:
        text = (workdir / f"star-{k}-{key}.out").read_text(errors="replace")
        match = re.search(rf"\b{re.escape(key)} sent ([\d,.]+) MB, received ([\d,.]+) MB", text)
        if match:
            sent[key] = float(match.group(1).replace(",", "")) * 1e6
    if len(sent) != len(keys):
        return {}
    return {"followers->leader": sum(v for k, v in sent.items() if k != leader) / train_steps,
            "leader->followers": sent[leader] / train_steps}


def star(k: int, two_party_job: JobSpec, workdir: Path, warmup: int, steps: int, batch_size: int) -> Row:
    """One label party and k followers, k + 1 `vfl train --party KEY` processes over mutual TLS, fp32."""
    certs = workdir / f"certs-star-{k}"
    job_path = write_star_job(workdir, k, certs)
    job = load_job(job_path)
    write_star_data(two_party_job, job, (warmup + steps) * batch_size)
    make_certs(job_path, certs)
    keys = tuple(job.parties)
    rss = run_parties(keys, job_path, workdir, "--party", f"star-{k}-")
    metrics = job.train.run_dir / job.label_party / "metrics.jsonl"
    start, times = step_times(metrics)
    rate, median = rates(times, warmup, steps, batch_size)
    waits = step_waits(metrics)[warmup : warmup + steps]
    per_step = star_traffic(workdir, k, keys, job.label_party, len(times))
    sizes = "+".join(str(len(job.party(key).fields)) for key in job.followers)
    note = (f"{k + 1} processes, 1 thread each, mutual TLS; follower fields {sizes}; "
            f"{len(job.leader.fields)} at the leader")
    return Row(star_name(k), rate, times[0] - start, median, rss, per_step,
               bytes_note="measured: msgpack request bodies of the whole run / train steps" if per_step else "",
               note=note, followers=k, cut_wait_s=float(np.mean(waits)), gemm_picks=gemm_picks(job.train.run_dir))


# ------------------------------------------------------------------------------------------------ report


def fmt_rss(rss: dict[str, int]) -> str:
    return " / ".join(f"{role[0]} {value / GIB:.2f}" for role, value in rss.items()) if rss else "-"


def fmt_bytes(row: Row) -> str:
    if not row.bytes_per_step:
        return "-"
    return " / ".join(f"{value / 1e3:,.0f}" for value in row.bytes_per_step.values())


def plain_base(rows: list[Row]) -> float | None:
    """The yardstick's samples/s, None when the plain fp32 row did not run (`--only followers`)."""
    plain = _row(rows, PLAIN_FP32)
    return plain.samples_per_s if plain is not None else None


def print_table(rows: list[Row], batch_size: int) -> None:
    base = plain_base(rows)
    header = (f"{'row':<24} {'samples/s':>9} {'x plain':>7} {'s/step':>6} {'median/s':>8} {'1st step':>8}  "
              f"{'kB/step f>l / l>f':<17} {'peak RSS GiB':<16} {'gemm GFLOP/s':<16} note")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        if row.samples_per_s is None:
            print(f"{row.name:<24} {'-':>9} {'-':>7} {'-':>6} {'-':>8} {'-':>8}  {'-':<17} {'-':<16} {'-':<16} "
                  f"{row.note}")
            continue
        ratio = f"{row.samples_per_s / base:.2f}x" if base else "-"
        step = batch_size / row.samples_per_s
        median = f"{row.median_samples_per_s:,.0f}" if row.median_samples_per_s else "-"
        first = f"{row.first_step_s:.2f} s" if row.first_step_s is not None else "-"
        print(f"{row.name:<24} {row.samples_per_s:>9,.0f} {ratio:>7} {step:>6.2f} {median:>8} {first:>8}  "
              f"{fmt_bytes(row):<17} {fmt_rss(row.peak_rss):<16} {row.gemm or '-':<16} {row.note}")
    print(f"anchor (issue 10, measured outside this project): {MINDSPORE}")
    notes = {row.bytes_note for row in rows if row.bytes_note}
    for note in sorted(notes):
        print(f"bytes per step: {note}; float32 payload 2 x B x 4 = {8 * batch_size / 1e3:,.1f} kB each way")


def print_star_table(rows: list[Row], reference: Row | None, batch_size: int) -> None:
    """The star rows: one label party and k followers at the two-party row's columns, against that row."""
    base = reference.samples_per_s if reference is not None else None
    header = (f"{'row':<24} {'samples/s':>9} {'x 2-party':>9} {'s/step':>6} {'median/s':>8} {'1st step':>8} "
              f"{'wait ms/step':>12} {'wait %':>6}  {'kB/step f>l / l>f':<17} {'leader RSS':>10} "
              f"{'max f RSS':>9}  {'gemm GFLOP/s':<16} note")
    print("\n" + header + "\n" + "-" * len(header))
    if reference is not None and reference.samples_per_s is not None:
        print(f"{reference.name:<24} {reference.samples_per_s:>9,.0f} {'1.00x':>9} "
              f"{batch_size / reference.samples_per_s:>6.2f} {reference.median_samples_per_s or 0:>8,.0f} "
              f"{reference.first_step_s or 0:>6.2f} s {'-':>12} {'-':>6}  {fmt_bytes(reference):<17} "
              f"{reference.peak_rss.get('leader', 0) / GIB:>10.2f} {reference.peak_rss.get('follower', 0) / GIB:>9.2f}"
              f"  {reference.gemm or '-':<16} the two-party row (--role leader|follower), same run")
    for row in rows:
        if row.samples_per_s is None:
            print(f"{row.name:<24} {'-':>9} {'-':>9} {'-':>6} {'-':>8} {'-':>8} {'-':>12} {'-':>6}  {'-':<17} "
                  f"{'-':>10} {'-':>9}  {'-':<16} {row.note}")
            continue
        ratio = f"{row.samples_per_s / base:.2f}x" if base else "-"
        step = batch_size / row.samples_per_s
        wait = row.cut_wait_s or 0.0
        followers = [v for key, v in row.peak_rss.items() if key != "leader"]
        print(f"{row.name:<24} {row.samples_per_s:>9,.0f} {ratio:>9} {step:>6.2f} "
              f"{row.median_samples_per_s or 0:>8,.0f} {row.first_step_s or 0:>6.2f} s {wait * 1e3:>12,.1f} "
              f"{wait / step:>6.1%}  {fmt_bytes(row):<17} {row.peak_rss.get('leader', 0) / GIB:>10.2f} "
              f"{max(followers, default=0) / GIB:>9.2f}  {row.gemm or '-':<16} {row.note}")
    print(f"star rows: the two-party follower's 19 fields divided between k followers (same data, same total "
          f"vocabulary), every process threads: 1, all on this machine's {os.cpu_count()} cores: with 2 followers "
          f"3 processes and with 3 followers 4 processes share them. wait = the leader's mean cut_wait_s over the "
          f"timed steps (its wait for the slowest follower's cut); wait % = its share of the step; RSS in GiB; "
          f"kB/step summed over the followers.")


def _row(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name and r.samples_per_s is not None), None)


def target_checks(rows: list[Row]) -> dict[str, bool | None]:
    """The targets, judged on the two-party rows against the plain fp32 row (None when a row did not run)."""
    plain, fp32, bf16 = _row(rows, PLAIN_FP32), _row(rows, TWO_PARTY_FP32), _row(rows, TWO_PARTY_BF16)

    def ratio(row: Row | None, target: float) -> bool | None:
        if row is None or plain is None or row.samples_per_s is None or plain.samples_per_s is None:
            return None
        return row.samples_per_s >= target * plain.samples_per_s

    parties = [r for r in (fp32, bf16) if r is not None]
    return {
        f"two-party fp32 >= {TARGET_FP32_RATIO}x plain fp32": ratio(fp32, TARGET_FP32_RATIO),
        f"two-party bf16 >= {TARGET_BF16_RATIO}x plain fp32": ratio(bf16, TARGET_BF16_RATIO),
        "peak RSS <= 1.5 GiB per party": all(v <= TARGET_RSS_BYTES for r in parties for v in r.peak_rss.values())
        if parties else None,
    }


def print_targets(checks: dict[str, bool | None]) -> None:
    marks = {True: "met", False: "MISSED", None: "not measured"}
    print("\ntargets: " + "; ".join(f"{name}: {marks[ok]}" for name, ok in checks.items()))


def write_json(rows: list[Row], checks: dict[str, bool | None], config: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    base = plain_base(rows)
    reference = _row(rows, TWO_PARTY_FP32)
    out = BENCH_DIR / "train.json"
    body = {
        "config": config,
        "rows": [asdict(r) | {"ratio_to_plain_fp32": r.samples_per_s / base if r.samples_per_s and base else None}
                 | ({"ratio_to_two_party_fp32": r.samples_per_s / reference.samples_per_s
                     if r.samples_per_s and reference is not None and reference.samples_per_s else None}
                    if r.followers is not None else {})
                 for r in rows],
        "targets": checks,
        "anchor": MINDSPORE,
    }
    out.write_text(json.dumps(body, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per row (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2, at least 1)")
    parser.add_argument("--skip-two-party", action="store_true",
                        help="skip the multi-process HTTPS rows (two-party and star)")
    parser.add_argument("--only", choices=("followers",),
                        help="followers: only the star rows (1 label party + k followers) and, as their reference "
                             "in the same run, the two-party HTTPS fp32 row")
    parser.add_argument("--followers", default=",".join(map(str, FOLLOWER_COUNTS)),
                        help="follower counts of the star rows, comma-separated (default 1,2,3)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, jobs, logs) in runs/bench/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every row computes (make bench-gpu: cuda; the W=2 row then needs 2 GPUs)")
    # Internal: one in-process row in a child process, so that its peak RSS is its own.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    try:
        args.followers = tuple(int(k) for k in args.followers.split(","))
    except ValueError:
        parser.error("--followers: comma-separated counts, e.g. 1,2,3")
    if not args.followers or not all(1 <= k <= 19 for k in args.followers):
        parser.error("--followers: counts from 1 to 19 (the follower's fields)")
    if args.only and args.skip_two_party:
        parser.error("--only followers runs processes over HTTPS; it cannot be combined with --skip-two-party")
    return args


def worker_main(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](load_job(args.job), args.warmup, args.steps)
    args.result.write_text(json.dumps(result))


PLAIN_FP32, PLAIN_BF16 = "plain torch fp32", "plain torch bf16"
TWO_PARTY_FP32, TWO_PARTY_BF16 = "two-party HTTPS fp32", "two-party HTTPS bf16"
TWO_PARTY_W2 = "two-party HTTPS fp32, 2 workers each"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def bench(args: argparse.Namespace, workdir: Path, figures: dict[str, Any]) -> list[Row]:
    """The rows, each in its own process(es), one after the other; the first is the yardstick."""
    data_job = load_job(write_job(workdir, "data", None, device=args.device))
    batch = data_job.train.batch_size
    write_data(data_job, train_rows=(args.warmup + args.steps) * batch)
    rows: list[Row] = []
    in_process = ((PLAIN_FP32, "plain", "fp32", "1 process, 2 threads: the yardstick"),
                  (PLAIN_BF16, "plain", "bf16", "1 process, 2 threads, autocast bfloat16"),
                  ("joint torch fp32, tuned", "joint", "fp32", "1 process, 2 threads, vfl's kernels and optimiser"),
                  ("local fp32", "local", "fp32", "1 process, both parties, 1 torch thread each"))
    for name, kind, precision, note in in_process if not args.only else ():
        job_path = write_job(workdir, f"{kind}-{precision}", None, precision=precision, device=args.device)
        result, rss = run_worker(kind, job_path, args.warmup, args.steps, workdir)
        rate, median = rates(result["step_ends"], args.warmup, args.steps, batch)
        first = result["step_ends"][0] - result["start"]
        picks = gemm_picks(load_job(job_path).train.run_dir) if kind == "local" else None
        rows.append(Row(name, rate, first, median, peak_rss={"process": rss}, note=note))
        rows[-1].gemm = gemm_label(figures, precision, "auto" if kind == "local" else "mkl", picks)
        print(f"{name}: {rate:,.0f} samples/s, peak RSS {rss / GIB:.2f} GiB", flush=True)
    two_party_rows = ((TWO_PARTY_FP32, "fp32", None, 1), (TWO_PARTY_BF16, "bf16", None, 1),
                      (f"two-party fp32 {QUANTIZED_BITS}-bit", "fp32", QUANTIZED_BITS, 1),
                      (TWO_PARTY_W2, "fp32", None, 2))
    if args.only == "followers":
        two_party_rows = two_party_rows[:1]  # the star rows' reference, measured in the same run
    for name, precision, bits, workers in two_party_rows:
        if args.skip_two_party:
            rows.append(Row(name, note="skipped (--skip-two-party)"))
            continue
        if args.device == "cuda" and workers > gpu_count():
            rows.append(Row(name, note=f"skipped ({workers} workers need {workers} GPUs)"))
            continue
        try:
            rows.append(two_party(name, workdir, args.warmup, args.steps, batch, precision, bits, workers,
                                  args.device))
            rows[-1].gemm = gemm_label(figures, precision, "auto", rows[-1].gemm_picks)
            print(f"{name}: {rows[-1].samples_per_s:,.0f} samples/s", flush=True)
        except Exception as exc:  # still print and save the rows we have; main exits non-zero
            print(f"{name} failed: {exc}", file=sys.stderr)
            rows.append(Row(name, note=f"FAILED: {exc}"))
    for k in args.followers:
        if args.skip_two_party:
            rows.append(Row(star_name(k), note="skipped (--skip-two-party)", followers=k))
            continue
        try:
            rows.append(star(k, data_job, workdir, args.warmup, args.steps, batch))
            rows[-1].gemm = gemm_label(figures, "fp32", "auto", rows[-1].gemm_picks)
            print(f"{star_name(k)}: {rows[-1].samples_per_s:,.0f} samples/s, leader wait "
                  f"{(rows[-1].cut_wait_s or 0) * 1e3:,.0f} ms/step", flush=True)
        except Exception as exc:
            print(f"{star_name(k)} failed: {exc}", file=sys.stderr)
            rows.append(Row(star_name(k), note=f"FAILED: {exc}", followers=k))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()  # the machine is shared: a busy one makes every row slower and noisier
    if load_before[0] > 0.5:
        print(f"warning: 1-min load average {load_before[0]:.2f} before the run; figures may be low", flush=True)
    job = load_job(REFERENCE_JOB)
    figures = gemm_figures(job)  # before the rows, in this process: the machine as the rows will find it
    print_gemm_header(figures)
    workdir = Path(tempfile.mkdtemp(prefix="train-", dir=BENCH_DIR))
    try:
        rows = bench(args, workdir, figures)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    config = {"batch_size": job.train.batch_size, "emb_dim": job.model.emb_dim,
              "deep_layers": list(job.model.deep_layers), "vocab_per_party": VOCAB_PER_PARTY,
              "fields": {role: len(job.party(role).fields) for role in ROLES},
              "warmup_steps": args.warmup, "timed_steps": args.steps, "cores": os.cpu_count(),
              "only": args.only, "follower_counts": list(args.followers),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "gemm_gflops": figures}
    print_gemm_header(figures)
    print_table([r for r in rows if r.followers is None], job.train.batch_size)
    star_rows = [r for r in rows if r.followers is not None]
    if star_rows:
        print_star_table(star_rows, _row(rows, TWO_PARTY_FP32), job.train.batch_size)
    checks = target_checks(rows)
    print_targets(checks)
    print(f"\nwrote {write_json(rows, checks, config).relative_to(REPO)}")
    if any(row.note.startswith("FAILED") for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
