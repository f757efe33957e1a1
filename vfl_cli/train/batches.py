"""Batches: which rows go into which step, and the `Batch` a party feeds its bottom model.

Both parties compute the same batch order from the shared seed alone, so no row index ever crosses the
wire: with aligned data (same sample ids in the same order) step s means the same rows on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.store import PartyData, SplitArrays


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # int64 [B, F]
    vals: torch.Tensor  # float32 [B, F]
    labels: torch.Tensor | None  # float32 [B], leader only
    sample_ids: torch.Tensor  # int64 [B]

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def part(self, rows: slice) -> Batch:
        """Rows `rows` of this batch (a worker's shard)."""
        return Batch(self.ids[rows], self.vals[rows], None if self.labels is None else self.labels[rows],
                     self.sample_ids[rows])

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            ids=to_device(self.ids, device),
            vals=to_device(self.vals, device),
            labels=None if self.labels is None else to_device(self.labels, device),
            sample_ids=self.sample_ids,
        )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to a GPU from pinned host memory, without blocking (the copy overlaps the host's work
    until a kernel needs it)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


VALID_STREAM = 0x0A11D  # the validation carve's own random stream, apart from the batch order's (seed, epoch)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


@dataclass(frozen=True)
class Position:
    """Where a run stands: `step` training steps done since its start, i.e. `epoch` whole epochs and
    `epoch_step` steps of the next. The state "at step g" is the state after g steps."""

    step: int
    epoch: int
    epoch_step: int

    @classmethod
    def at(cls, step: int, steps_per_epoch: int) -> Position:
        epoch, epoch_step = divmod(step, steps_per_epoch)
        return cls(step, epoch, epoch_step)

    def __str__(self) -> str:
        """`step 40 (epoch 2 step 10)`, counted like the log lines; `step 30 (end of epoch 1)` at an epoch end."""
        if self.step == 0:
            return "step 0 (the start)"
        if self.epoch_step == 0:
            return f"step {self.step} (end of epoch {self.epoch - 1})"
        return f"step {self.step} (epoch {self.epoch} step {self.epoch_step})"


def checkpoint_due(step: int, steps_per_epoch: int, every: int) -> bool:
    """Whether the state after global `step` gets a mid-epoch checkpoint. An epoch's last step does not:
    its checkpoint comes after that epoch's test evaluation, so a resume never re-runs or skips an eval."""
    return step % every == 0 and step % steps_per_epoch != 0


def batch_rows(rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Row indices of each step. Shuffled from (seed, epoch) for training; in order for eval and infer.

    Indices inside a batch are sorted: the batch's loss does not depend on row order, and sorted reads
    from the memory-mapped arrays are much faster.
    """
    if shuffle:
        order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(rows)
    else:
        order = np.arange(rows)
    batches = [order[start : start + batch_size] for start in range(0, rows, batch_size)]
    return [np.sort(b) for b in batches] if shuffle else batches


def take_batch(split: SplitArrays, rows: np.ndarray) -> Batch:
    contiguous = rows.size > 0 and rows[-1] - rows[0] + 1 == rows.size
    index: slice | np.ndarray = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
    return Batch(
        ids=torch.from_numpy(np.asarray(split.ids[index], dtype=np.int64)),
        vals=torch.from_numpy(np.array(split.vals[index], dtype=np.float32)),
        labels=None if split.labels is None else torch.from_numpy(np.array(split.labels[index], dtype=np.float32)),
        sample_ids=torch.from_numpy(np.array(split.sample_ids[index], dtype=np.int64)),
    )


def iterate(
    split: SplitArrays | SplitView, batch_size: int, seed: int, epoch: int, shuffle: bool, start: int = 0
) -> Iterator[Batch]:
    """The epoch's batches from step `start` on. The order depends on (seed, epoch) alone, so a run resumed
    at step s gets the same batches as one that never stopped; the first s are skipped unread."""
    view = split if isinstance(split, SplitView) else SplitView(split)
    for rows in batch_rows(len(view), batch_size, seed, epoch, shuffle)[start:]:
        yield take_batch(view.arrays, view.stored(rows))


Carve = tuple[np.ndarray, np.ndarray]  # (train rows, valid rows) of a stored train split, each sorted


def carve_valid(rows: int, fraction: float, seed: int, split: str = "random") -> Carve:
    """(train rows, valid rows) of a stored training split of `rows` rows, each sorted: `fraction` of them
    (at least one) held out for validation, the same rows at both parties. `split` "random" draws them from the
    seed alone; "tail" takes the last rows in stored order (the input file's order after `vfl prep criteo`,
    customer-id order after a PSI), which for time-ordered data are the rows nearest to a later test file."""
    held_out = max(1, round(rows * fraction))
    if held_out >= rows:
        raise ValueError(f"data.valid_fraction {fraction} leaves no training rows of {rows}")
    if split == "tail":
        order = np.arange(rows)
        return order[: rows - held_out], order[rows - held_out :]
    order = np.random.Generator(np.random.PCG64([seed, VALID_STREAM])).permutation(rows)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


@dataclass(frozen=True)
class SplitView:
    """A stored split, or some of its rows (train and valid carved from the stored train split)."""

    arrays: SplitArrays
    rows: np.ndarray | None = None  # sorted indices into `arrays`; None = all of them

    def __len__(self) -> int:
        return len(self.arrays) if self.rows is None else len(self.rows)

    def stored(self, positions: np.ndarray) -> np.ndarray:
        """Indices into the stored arrays of the view's rows at `positions` (sorted in, sorted out)."""
        return positions if self.rows is None else self.rows[positions]

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.arrays.labels
        return None if labels is None else np.asarray(labels if self.rows is None else labels[self.rows])

    @property
    def sample_ids(self) -> np.ndarray:
        ids = self.arrays.sample_ids
        return np.asarray(ids if self.rows is None else ids[self.rows])


def view_of(party: PartyData, name: str, carve: Carve | None) -> SplitView:
    """The rows a run uses as split `name`: with a validation carve, "train" and "valid" are its two parts of the
    stored train split; any other split, or any split without a carve, is the stored one whole."""
    if carve is None or name not in ("train", "valid"):
        return SplitView(party.split(name))
    return SplitView(party.split("train"), carve[0] if name == "train" else carve[1])
