"""Baselines without federation, same hyperparameters and batches as the split run:

    central      one Wide&Deep over both parties' fields (pooled data: the ceiling)
    leader-only  one Wide&Deep over the leader's fields alone (what the leader has without a partner)

logit = wide + deep of a single bottom (`CentralWideDeep`). They show what vertical federation gains and what it costs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.store import PartyData, SplitArrays, open_party
from vfl_cli.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec
from vfl_cli.model.wide_deep import CentralWideDeep, build_optimizers, part_generator
from vfl_cli.train.batches import Batch, batch_rows, steps_per_epoch, take_batch
from vfl_cli.train.loop import EvalResult, Reporter, log_line, score


@dataclass(frozen=True)
class BaselineData:
    """The parties' prepared data side by side; the follower's ids shifted past the leader's vocabulary."""

    parties: list[PartyData]
    offsets: list[int]

    @property
    def vocab_size(self) -> int:
        return self.offsets[-1] + self.parties[-1].meta.vocab_size

    @property
    def num_fields(self) -> int:
        return sum(len(p.meta.fields) for p in self.parties)

    def batches(self, split: str, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
        splits: list[SplitArrays] = [p.split(split) for p in self.parties]
        for rows in batch_rows(len(splits[0]), batch_size, seed, epoch, shuffle):
            parts = [take_batch(s, rows) for s in splits]
            yield Batch(
                ids=torch.cat([part.ids + offset for part, offset in zip(parts, self.offsets, strict=True)], dim=1),
                vals=torch.cat([part.vals for part in parts], dim=1),
                labels=parts[0].labels,
                sample_ids=parts[0].sample_ids,
            )


def open_baseline_data(job: JobSpec, kind: str) -> BaselineData:
    leader = open_party(job.data.dir, "leader")
    parties = [leader]
    if kind == "central":
        follower = open_party(job.data.dir, "follower")
        for split in leader.meta.splits:
            if leader.fingerprint(split) != follower.fingerprint(split):
                raise DataError(f"{job.data.dir}: leader and follower {split} rows are not aligned")
        parties.append(follower)
    offsets = [0]
    for party in parties[:-1]:
        offsets.append(offsets[-1] + party.meta.vocab_size)
    return BaselineData(parties, offsets)


def build_model(job: JobSpec, data: BaselineData) -> CentralWideDeep:
    generator = part_generator(job.seed, "central")
    return CentralWideDeep(data.vocab_size, data.num_fields, job.model.emb_dim, job.model.deep_layers, generator)


@torch.no_grad()
def evaluate_baseline(model: CentralWideDeep, data: BaselineData, job: JobSpec, split: str) -> EvalResult:
    model.eval()
    probabilities = []
    for batch in data.batches(split, job.train.batch_size, job.seed, 0, shuffle=False):
        probabilities.append(torch.sigmoid(model(batch.ids, batch.vals)))
    return score(data.parties[0].split(split), torch.cat(probabilities).numpy())


def train_baseline(job: JobSpec, kind: str, reporter: Reporter) -> list[tuple[int, float, EvalResult | None]]:
    data = open_baseline_data(job, kind)
    model = build_model(job, data)
    optimizers = build_optimizers(
        model.wide_parameters(), model.deep_parameters(), job.train.wide_optimizer, job.train.deep_optimizer
    )
    rows = data.parties[0].meta.splits["train"].rows
    total = steps_per_epoch(rows, job.train.batch_size)
    results: list[tuple[int, float, EvalResult | None]] = []
    for epoch in range(job.train.epochs):
        model.train()
        reporter.begin(f"{kind} epoch {epoch}", rows)
        started = time.perf_counter()
        for step, batch in enumerate(data.batches("train", job.train.batch_size, job.seed, epoch, shuffle=True)):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            assert batch.labels is not None  # the leader's split always has labels
            loss = F.binary_cross_entropy_with_logits(model(batch.ids, batch.vals), batch.labels)
            l2 = model.l2_penalty(job.train.l2_coef)
            (loss + l2).backward()
            for optimizer in optimizers:
                optimizer.step()
            reporter.advance(len(batch))
            if (step + 1) % job.train.log_every == 0 or step + 1 == total:
                reporter.log(log_line(epoch, step + 1, total, loss.item(), loss.item() + l2.item()))
        reporter.end()
        samples_per_s = rows / max(time.perf_counter() - started, 1e-9)
        results.append((epoch, samples_per_s, evaluate_baseline(model, data, job, "test")))
        state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}
        save_checkpoint(checkpoint_path(job.train.run_dir, kind), state, job.fingerprint(), epoch + 1)
    return results


def evaluate_baseline_checkpoint(job: JobSpec, kind: str, run_dir: Path, split: str) -> EvalResult:
    data = open_baseline_data(job, kind)
    model = build_model(job, data)
    payload = load_checkpoint(checkpoint_path(run_dir, kind), job.fingerprint())
    model.load_state_dict(payload["state"]["model"])
    return evaluate_baseline(model, data, job, split)
