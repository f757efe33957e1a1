"""A party's workers: W processes that train one model together, each on its shard of every batch.

    parties.<key>.workers: W      `vfl train --party KEY` starts W copies of itself (`vfl_cli.train.launcher`)
    torchrun ... vfl train ...    each process is one worker already (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR)

Worker i takes rows `shard_bounds(B, W)[i:i+2]` of every global batch of B rows (every party computes the same
batches from the seed, so shard i is the same customers at every party) and pairs with worker i of each peer:
its own HTTPS listener on the `listen` port + i, its own handshake, its own cut tensors
(`PartyContext.for_worker`). Inside the party the workers sum their gradients after every backward
(`sum_gradients`: one all-reduce over every parameter's gradient, gloo on CPU, NCCL on CUDA); the leader scales
each shard's loss by its share of the batch, so the sum is the whole batch's gradient and W workers train the
model one worker trains, up to float summation order. Embedding tables are replicated and their gradients
summed densely with the rest: a sparse exchange of the touched rows was timed no faster unless the bottoms
hand it their ids, and then ~4% of a step at W = 2 (`benchmarks.sparse_exchange`, docs/scale.md).

Rank 0 alone speaks for the party: it agrees where training stands, writes the checkpoints (after the step's
all-reduce, so they hold the party's one state), the metrics and the console, and runs every evaluation. It
sends the agreed start, and the checkpoint's bytes, to the other workers (`broadcast_start`); they wait for
rank 0 at each epoch end (`broadcast_flag`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from vfl_cli.errors import JobError, WorkerLost

# How long a worker waits for the others in one collective. Generous: the other workers wait here while rank 0
# evaluates a whole split. A worker that dies is seen at once (its sockets close), not after this.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
RUN_ID_BYTES = 64


def shard_bounds(rows: int, count: int) -> list[int]:
    """The start of each of `count` shards of `rows` rows, then `rows`: as even as can be, the larger first."""
    base, extra = divmod(rows, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


@dataclass
class Workers:
    """This process's place among its party's workers; `Workers()` is a party of one (nothing to reduce)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that speaks for the party (checkpoints, metrics, evaluations, the agreement)."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def shard(self, rows: int) -> slice:
        """This worker's rows of a batch of `rows`."""
        bounds = shard_bounds(rows, self.size)
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def hello_extra(self) -> dict[str, str]:
        """What every Hello of a worker carries, so that parties with different W, or workers paired across ranks,
        stop at the handshake; nothing for a party of one (its Hello is as before)."""
        return {"workers": str(self.size), "worker": str(self.rank)} if self.many else {}

    def sum_gradients(self, optimizers: Sequence[torch.optim.Optimizer], loss_share: float = 0.0) -> float:
        """Sum every parameter's gradient over the workers (a parameter without one adds zeros), and the workers'
        `loss_share`s with them; returns that sum (the whole batch's loss at the leader). One all-reduce."""
        if not self.many:
            return loss_share
        params = parameters_of(optimizers)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([*(g.reshape(-1).float() for g in grads),
                          torch.tensor([loss_share], dtype=torch.float32, device=grads[0].device)])
        flat = flat.to(self.device)  # no copy where they are the same device
        with self.collective("the gradient sum"):
            dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        return float(flat[-1])

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` at every worker (an early stop, say)."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        with self.collective("waiting for worker 0"):
            dist.broadcast(value, 0)
        return bool(value.item())

    def broadcast_start(self, run_id: str, step: int, checkpoint: bytes | None) -> tuple[str, int, bytes | None]:
        """Rank 0's agreed (run id, step, the bytes of that step's checkpoint file or None at step 0), at every
        worker; what the others pass is ignored."""
        if not self.many:
            return run_id, step, checkpoint
        header = torch.zeros(RUN_ID_BYTES + 2, dtype=torch.int64, device=self.device)
        if self.is_main:
            encoded = run_id.encode()[:RUN_ID_BYTES]
            header[:len(encoded)] = torch.tensor(list(encoded), dtype=torch.int64)
            header[RUN_ID_BYTES] = step
            header[RUN_ID_BYTES + 1] = -1 if checkpoint is None else len(checkpoint)
        with self.collective("the start"):
            dist.broadcast(header, 0)
        values = header.tolist()
        run_id = bytes(c for c in values[:RUN_ID_BYTES] if c).decode()
        step, length = values[RUN_ID_BYTES], values[RUN_ID_BYTES + 1]
        if length < 0:
            return run_id, step, None
        data = (torch.frombuffer(bytearray(checkpoint), dtype=torch.uint8) if self.is_main and checkpoint
                else torch.empty(length, dtype=torch.uint8))
        data = data.to(self.device)
        with self.collective("the checkpoint"):
            dist.broadcast(data, 0)
        return run_id, step, data.cpu().numpy().tobytes()

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """One collective of the party's workers: a worker lost on the way (its sockets closed) is one line."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            reason = re.sub(r"^\[[^]]*\]\s*", "", first)  # without gloo's [file:line]
            reason = reason.split(". This is typically")[0][:160]
            raise WorkerLost(f"worker {self.rank} of {self.size}: another worker of this party stopped during "
                             f"{what} ({reason})") from exc

    def close(self) -> None:
        if self.many and dist.is_initialized():
            dist.destroy_process_group()


def launched_worker() -> bool:
    """Whether this process is one worker of several (started by `vfl train` itself or by torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_workers(expected: int, device: torch.device) -> Workers:
    """This worker's place, from the environment torchrun (or `vfl train`) sets, with the party's process group
    joined; `Workers()` for a process that is not one of several. JobError where the count is not the job's."""
    if not launched_worker():
        return Workers()
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise JobError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from exc
    if size != expected:
        raise JobError(f"{size} workers were started (WORLD_SIZE), but the job gives this party workers: {expected}")
    if not 0 <= rank < size:
        raise JobError(f"RANK {rank} is not a worker of {size}")
    if size == 1:
        return Workers()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    workers = Workers(rank, size, local_rank, device)
    with workers.collective("the start of the party's process group"):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT)
    return workers


def parameters_of(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
