"""Evaluation metrics of a binary click model: exact ROC AUC and log loss, on numpy arrays or torch tensors.

Both are computed in float64 on the whole set at once (no binning), so they match scikit-learn's
`roc_auc_score` and `log_loss` to rounding; the trainer calls them on the gathered test predictions.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

ArrayLike = npt.ArrayLike | torch.Tensor


def _as_float64(values: ArrayLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def _pair(labels: ArrayLike, scores: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = _as_float64(labels, "labels")
    s = _as_float64(scores, what)
    if y.shape != s.shape:
        raise ValueError(f"labels and {what} differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, exact: the Mann-Whitney U statistic with tied scores given their mean rank.

    O(n log n) (one sort). Raises ValueError when the labels hold only one class, where AUC is undefined.
    """
    y, s = _pair(labels, scores, "scores")
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        only = "positive" if negatives == 0 else "negative"
        raise ValueError(f"ROC AUC is undefined when every label is {only} ({y.size} samples)")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # Each run of equal scores shares the mean of the 1-based ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], s.size]
    mean_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_ranks, ends - starts)
    rank_sum = ranks[y == 1.0].sum()
    u = rank_sum - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross entropy of predicted probabilities, clipped to [eps, 1 - eps] so it stays finite."""
    y, p = _pair(labels, probs, "probabilities")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
