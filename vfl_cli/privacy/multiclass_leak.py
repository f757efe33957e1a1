"""How much of a multiclass label a curious follower reads from its gradients, knowing no label at all.

For a softmax top, the gradient a row's cut outputs receive is W^T (p - onehot(y)) / B: each class pulls its rows
towards its own direction, so a batch's gradient rows fall into one group per class. The attack clusters them:

    per batch        standardise the rows [B, d] (each column to mean 0, std 1 within the batch: a batch shares one
                     scale), k-means into k = number of classes groups (k-means++ starts, a few seeded restarts, the
                     lowest within-cluster sum of squares kept)
    score            the accuracy of the best one-to-one mapping of clusters to classes (the Hungarian assignment on
                     the batch's cluster-by-class counts; the follower cannot name the clusters, but one known label
                     per class, or the classes' sizes, names them for every later batch): the share of the batch's
                     rows whose class the attacker then reads
    inference acc.   the batches' scores weighted by their rows
    majority share   the largest class's share of the same rows: what guessing the majority class gets
    shuffled floor   the same clusters scored against the batch's labels shuffled (one seeded shuffle a batch):
                     what the attack reads from gradients that carry no label at all

So the leak is the inference accuracy against the majority share; 1.0 is every label. The mapping is chosen
with the true labels, so even an uninformative clustering scores above 1/k on small batches (the best of k!
mappings of noise: measured on random rows with 3 classes, about 0.43 in batches of 64 and 0.36 in batches of
512), and with unbalanced classes it can score below the majority share; the shuffled floor is that figure for
the batches at hand. Batches with no more rows than classes (a clustering there is trivially perfect) are left
out of every figure.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

RESTARTS = 4
ITERATIONS = 50
MAX_PERMUTED = 8  # without scipy, the assignment is brute force over k! mappings: at most 8 classes


@dataclass(frozen=True)
class MulticlassLeak:
    accuracy: float  # label-inference accuracy of the clustering attack (NaN: no batch to score)
    majority: float  # the largest class's share of the same rows
    floor: float  # the same clusters' accuracy against the labels shuffled within each batch
    rows: int  # rows scored (batches with more rows than classes)

    @property
    def above_majority(self) -> float:
        return self.accuracy - self.majority


def standardised(rows: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and std 1 over the batch; a constant column to 0."""
    x = np.asarray(rows, dtype=np.float64)
    centred = x - x.mean(axis=0)
    spread = x.std(axis=0)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ starting centres [k, d]: each next one drawn with probability ~ squared distance to the nearest."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        nearest = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(axis=2), axis=1)
        total = nearest.sum()
        pick = rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))
        centres.append(x[pick])
    return np.asarray(centres)


def _lloyd(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
    """Lloyd's iterations from `centres`: (cluster of each row [B], within-cluster sum of squares)."""
    for _ in range(ITERATIONS):
        distances = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)  # (B, k)
        assign = distances.argmin(axis=1)
        moved = np.array([x[assign == c].mean(axis=0) if np.any(assign == c) else centres[c]
                          for c in range(len(centres))])
        if np.allclose(moved, centres):
            break
        centres = moved
    distances = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)
    return distances.argmin(axis=1), float(distances.min(axis=1).sum())


def kmeans(rows: np.ndarray, k: int, seed: int, restarts: int = RESTARTS) -> np.ndarray:
    """The cluster [B] of each row of `rows` [B, d] into k groups: the restart with the lowest inertia."""
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(rows), dtype=np.int64), np.inf
    for _ in range(restarts):
        assign, inertia = _lloyd(rows, _plus_plus(rows, k, rng))
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def check_classes(k: int) -> None:
    """ValueError when the cluster-to-class assignment of k classes cannot be computed here (no scipy, k > 8)."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        if k > MAX_PERMUTED:
            raise ValueError(f"{k} classes: the cluster-to-class assignment needs scipy (pip install scipy) beyond "
                             f"{MAX_PERMUTED} classes") from None


def matched(clusters: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Rows the best one-to-one mapping of the k clusters to the k classes labels correctly."""
    counts = np.zeros((k, k), dtype=np.int64)  # (cluster, class)
    np.add.at(counts, (clusters, labels), 1)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        check_classes(k)
        return max(int(counts[np.arange(k), list(p)].sum()) for p in itertools.permutations(range(k)))
    row, column = linear_sum_assignment(counts, maximize=True)
    return int(counts[row, column].sum())


def inference_accuracy(gradients: np.ndarray, labels: np.ndarray, batch: np.ndarray, classes: int,
                       seed: int = 0) -> MulticlassLeak:
    """The clustering attack on one epoch: gradient rows [N, d], class indices [N], step of each row [N]."""
    labels = np.asarray(labels).astype(np.int64)
    shuffler = np.random.default_rng(seed)
    right = chance = scored = 0
    counts = np.zeros(classes, dtype=np.int64)
    for index in np.unique(batch):  # np.unique sorts: step order
        rows = batch == index
        if rows.sum() <= classes:
            continue
        clusters = kmeans(standardised(gradients[rows]), classes, seed + int(index))
        right += matched(clusters, labels[rows], classes)
        chance += matched(clusters, shuffler.permutation(labels[rows]), classes)
        scored += int(rows.sum())
        counts += np.bincount(labels[rows], minlength=classes)
    if scored == 0:
        return MulticlassLeak(float("nan"), float("nan"), float("nan"), 0)
    return MulticlassLeak(right / scored, float(counts.max()) / scored, chance / scored, scored)
