"""Evaluation metrics, on numpy arrays or torch tensors: binary (exact ROC AUC, log loss, KS), multiclass
(accuracy, macro-F1, log loss) and regression (RMSE, MAE, R²).

All are computed in float64 on the whole set at once (no binning), so they match scikit-learn's metrics
to rounding (tests/test_metrics.py checks them against it); `vfl_cli.task` calls them on gathered predictions.
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


def ks_statistic(labels: ArrayLike, scores: ArrayLike) -> float:
    """Kolmogorov-Smirnov: the largest gap between the positives' and the negatives' score distributions (the
    credit-scoring separation figure); ties are stepped over together."""
    y, s = _pair(labels, scores, "scores")
    positives = y.sum()
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("KS is undefined when the labels hold one class")
    order = np.argsort(-s, kind="mergesort")
    ends = np.r_[np.flatnonzero(s[order][1:] != s[order][:-1]), s.size - 1]  # last index of each tie run
    true_positive = np.cumsum(y[order])[ends] / positives
    false_positive = np.cumsum(1.0 - y[order])[ends] / negatives
    return float(np.max(np.abs(true_positive - false_positive)))


def _classes(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Class indices [N] and class probabilities [N, k], checked."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)
    y = _as_float64(labels, "labels")
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probabilities must be [N, k] for {y.size} labels, got {list(p.shape)}")
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    if not np.isin(y, np.arange(p.shape[1])).all():
        raise ValueError(f"labels must be class indices 0..{p.shape[1] - 1}")
    return y.astype(np.int64), p


def accuracy(labels: ArrayLike, probs: ArrayLike) -> float:
    """Share of rows whose most probable class is the label (ties: the lowest class index)."""
    y, p = _classes(labels, probs)
    return float(np.mean(p.argmax(axis=1) == y))


def macro_f1(labels: ArrayLike, probs: ArrayLike) -> float:
    """F1 per class of the most probable class, averaged over the classes present in labels or predictions
    (scikit-learn's `f1_score(average="macro")`)."""
    y, p = _classes(labels, probs)
    predicted = p.argmax(axis=1)
    scores = []
    for c in np.union1d(y, predicted):
        true_positive = np.sum((predicted == c) & (y == c))
        scores.append(2 * true_positive / (np.sum(predicted == c) + np.sum(y == c)))
    return float(np.mean(scores))


def multiclass_log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean cross entropy of the labels' predicted probabilities, clipped to [eps, 1]."""
    y, p = _classes(labels, probs)
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], eps, 1.0))))


def _values(targets: ArrayLike, predictions: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, v = _as_float64(targets, "targets"), _as_float64(predictions, "predictions")
    if y.shape != v.shape:
        raise ValueError(f"targets and predictions differ in length: {y.size} vs {v.size}")
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    return y, v


def rmse(targets: ArrayLike, predictions: ArrayLike) -> float:
    y, v = _values(targets, predictions)
    return float(np.sqrt(np.mean((y - v) ** 2)))


def mae(targets: ArrayLike, predictions: ArrayLike) -> float:
    y, v = _values(targets, predictions)
    return float(np.mean(np.abs(y - v)))


def r2(targets: ArrayLike, predictions: ArrayLike) -> float:
    """1 - residual sum of squares / total sum of squares; NaN when the targets are all equal."""
    y, v = _values(targets, predictions)
    total = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if total == 0 else 1.0 - float(np.sum((y - v) ** 2)) / total
