"""Dense or sparse embedding gradients between a party's workers (issue 20: "replicated with their gradients
all-reduced unless measurement shows a sparse exchange pays").

Two gloo processes on 127.0.0.1, one thread each, hold the leader's gradients at the reference configuration: a
200,000 x 80 deep table whose rows are non-zero where that worker's shard (B / 2 rows, the benchmark's Zipf-like
ids over 20 fields, `benchmarks.train.zipf_ids`) touched them, plus the party's other 2,528,584 values (wide
table, MLP, top) dense. Each rep sums them three ways and checks all three give the same table:

- dense: what `Workers.sum_gradients` does (concatenate, one all_reduce, copy back);
- sparse, rows found in the gradient: non-zero rows of the table, all_gather of their indices and values,
  index_add into a zeroed buffer; the rest all-reduced;
- sparse, rows known from the batch: the same, with the touched rows handed over (the bottoms know their ids).

    python -m benchmarks.sparse_exchange [--reps 6] [--batch 16000]

Prints each way's median seconds (after one warm-up) and the bytes each worker receives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.train import free_port, zipf_ids

TABLE_ROWS, EMB, FIELDS = 200_000, 80, 20
OTHER_VALUES = 18_528_584 - TABLE_ROWS * EMB - 1  # the leader's other gradient values (docs/scale.md)
WORKERS = 2


def touched_rows(rank: int, shard_rows: int) -> torch.Tensor:
    rng = np.random.default_rng(rank)
    width = TABLE_ROWS // FIELDS
    ids = [field * width + zipf_ids(rng, shard_rows, width) for field in range(FIELDS)]
    return torch.from_numpy(np.unique(np.concatenate(ids)).astype(np.int64))


def dense(table: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.cat([table.reshape(-1), rest])
    dist.all_reduce(flat)
    return flat[:table.numel()].view_as(table).clone(), flat[table.numel():].clone()


def sparse(table: torch.Tensor, rest: torch.Tensor, rows: torch.Tensor | None,
           out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if rows is None:
        rows = table.abs().sum(1).nonzero().squeeze(1)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(WORKERS)]
    dist.all_gather(counts, torch.tensor([len(rows)]))
    most = max(int(c) for c in counts)
    mine = torch.zeros(most, EMB + 1)
    mine[:len(rows), 0] = rows.float()  # exact: row indices < 2^24
    mine[:len(rows), 1:] = table[rows]
    gathered = [torch.empty(most, EMB + 1) for _ in range(WORKERS)]
    dist.all_gather(gathered, mine)
    summed_rest = rest.clone()
    dist.all_reduce(summed_rest)
    out.zero_()
    for part, count in zip(gathered, counts, strict=True):
        n = int(count)
        out.index_add_(0, part[:n, 0].long(), part[:n, 1:])
    return out, summed_rest


def worker(rank: int, port: int, reps: int, batch: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    rows = touched_rows(rank, batch // WORKERS)
    generator = torch.Generator().manual_seed(rank)
    table = torch.zeros(TABLE_ROWS, EMB)
    table[rows] = torch.randn(len(rows), EMB, generator=generator)
    rest = torch.randn(OTHER_VALUES, generator=generator)
    out = torch.zeros_like(table)
    ways = {"dense": lambda: dense(table, rest), "sparse, rows found in the gradient": lambda: sparse(
        table, rest, None, out), "sparse, rows known from the batch": lambda: sparse(table, rest, rows, out)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(reps + 1):
        reference = None
        for name, way in ways.items():
            dist.barrier()
            started = time.perf_counter()
            summed_table, _ = way()
            dist.barrier()
            if rep:
                seconds[name].append(time.perf_counter() - started)
            reference = summed_table.clone() if reference is None else reference
            assert torch.allclose(summed_table, reference, atol=1e-6), name
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(WORKERS)]
    dist.all_gather(counts, torch.tensor([len(rows)]))
    if rank == 0:
        dense_mb = (TABLE_ROWS * EMB + OTHER_VALUES) * 4 / 1e6
        sparse_mb = (max(int(c) for c in counts) * (EMB + 1) + OTHER_VALUES) * 4 / 1e6
        print(f"2 workers, batch {batch} ({batch // WORKERS} rows each): the shards touch "
              f"{', '.join(f'{int(c):,}' for c in counts)} of {TABLE_ROWS:,} table rows; "
              f"each worker receives {dense_mb:.1f} MB dense, {sparse_mb:.1f} MB sparse")
        for name, times in seconds.items():
            print(f"  {name:36s} {statistics.median(times):.3f} s (median of {reps})")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6, help="timed reps after one warm-up (default 6)")
    parser.add_argument("--batch", type=int, default=16_000, help="global batch (default 16000)")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    mp.spawn(worker, args=(free_port(), args.reps, args.batch), nprocs=WORKERS, join=True)


if __name__ == "__main__":
    main()
