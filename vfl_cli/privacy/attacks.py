"""The curious follower's label attacks: scores computed from the gradients it receives, and their leak AUC.

The follower gets, for every training row, the gradient of the leader's loss w.r.t. its two cut-layer outputs,
a row g in R^2. With a linear top that row is w * (p - y) / B, so all of a batch's rows lie on one line and
the side of the origin a row lies on is its label (p < 1 always). Two attacks from Li et al., "Label Leakage and
Protection in Two-party Split Learning" (ICLR 2022), adapted to using nothing but the batch itself:

- direction: project each row on the batch's principal axis (top right-singular vector of the uncentred B x 2
  matrix). Without noise the projection's sign is the label; the paper's cosine attack against one known
  positive row does the same given that row.
- norm: |g|. Positives are rarer and predicted lower, so |p - y| is larger for them.

Leak AUC is the AUC of a score against the true labels, computed per batch (a batch shares one w and one scale)
and averaged over the epoch's batches. Each batch counts as max(AUC, 1 - AUC): which end of the axis is positive
is one bit the follower can learn once (from the class balance, or one customer it knows clicked), so the
defender should not count on it guessing wrong. 0.5 is no leak, 1.0 is every label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vfl_cli.metrics import roc_auc


def direction_scores(rows: np.ndarray) -> np.ndarray:
    """Projection of each row of one batch's gradients [B, k] on the batch's principal axis -> [B]."""
    if not np.any(rows):
        return np.zeros(len(rows))
    _, _, right = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    return rows.astype(np.float64) @ right[0]


def norm_scores(rows: np.ndarray) -> np.ndarray:
    """L2 norm of each gradient row [B, k] -> [B]."""
    return np.linalg.norm(rows.astype(np.float64), axis=1)


def leak_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """max(AUC, 1 - AUC) of `scores` against 0/1 `labels`; NaN when a class is missing."""
    positives = int(np.sum(labels))
    if positives == 0 or positives == len(labels):
        return float("nan")
    auc = roc_auc(labels, scores)
    return max(auc, 1.0 - auc)


@dataclass(frozen=True)
class Leak:
    direction: float  # mean over batches of the direction attack's leak AUC
    norm: float  # mean over batches of the norm attack's leak AUC
    batches: int  # batches that had both classes (the others say nothing)


def epoch_leak(gradients: np.ndarray, labels: np.ndarray, batch: np.ndarray) -> Leak:
    """Both attacks over one epoch: gradients [N, k] as received, true labels [N], batch index [N] of each row."""
    direction, norm = [], []
    for index in np.unique(batch):
        rows = batch == index
        d = leak_auc(direction_scores(gradients[rows]), labels[rows])
        if not np.isnan(d):
            direction.append(d)
            norm.append(leak_auc(norm_scores(gradients[rows]), labels[rows]))
    if not direction:
        return Leak(float("nan"), float("nan"), 0)
    return Leak(float(np.mean(direction)), float(np.mean(norm)), len(direction))
