"""The label party's task: the head's width, the loss, what a prediction is, the metrics, and which metric
picks the best epoch. The loop, model selection, baselines, telemetry, report and console ask the task;
nothing else branches on its kind.

    binary      head 1, sigmoid + BCE; predictions: P(y=1) [N]; AUC (selects), log loss, KS
    multiclass  head k, softmax + cross-entropy; predictions: P(class) [N, k]; accuracy (selects), macro-F1,
                log loss; the classes are the prepared data's (`meta.classes`), labels their indices
    regression  head 1, MSE on the label standardised with the training rows' mean and std; predictions in
                the label's own units [N]; RMSE (selects, lower is better), MAE, R²
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_prep.schema import Task as TaskKind
from vfl_cli import metrics
from vfl_cli.metric_names import LOWER_IS_BETTER, TASK_METRICS, TITLES


@dataclass(frozen=True)
class Metric:
    name: str  # key in metrics.jsonl and /metrics, e.g. "auc"
    title: str  # on the console, e.g. "AUC"
    compute: Callable[[np.ndarray, np.ndarray], float] = field(repr=False)
    higher_is_better: bool = True


def _defined(compute: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
    """NaN where the metric is undefined (one class in the labels, no rows) instead of an error."""

    def safe(labels: np.ndarray, predictions: np.ndarray) -> float:
        try:
            return compute(labels, predictions)
        except ValueError:
            return float("nan")

    return safe


COMPUTE: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auc": metrics.roc_auc, "log_loss": metrics.log_loss, "ks": metrics.ks_statistic,
    "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "rmse": metrics.rmse, "mae": metrics.mae,
    "r2": metrics.r2,
}


def _metric(task: str, name: str) -> Metric:
    compute = metrics.multiclass_log_loss if (task, name) == ("multiclass", "log_loss") else COMPUTE[name]
    return Metric(name, TITLES[name], _defined(compute), name not in LOWER_IS_BETTER)


METRICS: dict[str, tuple[Metric, ...]] = {  # the first is the primary one, which selects the best epoch
    task: tuple(_metric(task, name) for name in names) for task, names in TASK_METRICS.items()
}


def _beats(value: float, than: float, higher_is_better: bool) -> bool:
    return value > than if higher_is_better else value < than


def describe(scores: dict[str, float]) -> str:
    """`AUC 0.781234  log loss 0.452345  KS 0.412345` for the console, in the scores' order."""
    return "  ".join(f"{TITLES.get(name, name)} {value:.6f}" for name, value in scores.items())


@dataclass(frozen=True)
class Task:
    kind: TaskKind = "binary"
    classes: tuple[str, ...] = ()  # multiclass: the class names in index order
    label_mean: float = 0.0  # regression: the training labels' mean and std (the target is standardised)
    label_std: float = 1.0

    @classmethod
    def of(cls, kind: TaskKind, classes: tuple[str, ...] = (), train_labels: np.ndarray | None = None) -> Task:
        """The task of prepared data: `classes` from its meta, the regression scale from its training labels."""
        if kind == "multiclass" and len(classes) < 2:
            raise ValueError(f"a multiclass task needs at least 2 classes, the data has {len(classes)}")
        if kind == "regression" and train_labels is not None and len(train_labels):
            values = np.asarray(train_labels, dtype=np.float64)
            std = float(values.std())
            return cls(kind, (), float(values.mean()), std if std > 0 else 1.0)
        return cls(kind, tuple(classes))

    def scale_state(self) -> dict[str, float]:
        """What a checkpoint keeps of the task: the label scale fitted on the training rows (data to score later
        may have none to fit it on)."""
        return {"label_mean": self.label_mean, "label_std": self.label_std}

    def with_scale(self, state: dict[str, float] | None) -> Task:
        """This task with a checkpoint's `scale_state` (unchanged for a checkpoint written without one)."""
        if not state:
            return self
        return replace(self, label_mean=float(state["label_mean"]), label_std=float(state["label_std"]))

    @property
    def width(self) -> int:
        """The head's output width."""
        return len(self.classes) if self.kind == "multiclass" else 1

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS[self.kind]

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    @property
    def tiebreak(self) -> Metric:
        """What decides between epochs of equal primary score: the log loss (a small validation split's AUC or
        accuracy saturates and ties), for regression the MAE."""
        return next(m for m in self.metrics if m.name in ("log_loss", "mae"))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training loss of head outputs [B, width] against the prepared labels [B] (float32)."""
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels)
        if self.kind == "multiclass":
            return F.cross_entropy(logits, labels.long())
        return F.mse_loss(logits[:, 0], (labels - self.label_mean) / self.label_std)

    def predict(self, logits: Tensor) -> Tensor:
        """Head outputs [B, width] -> predictions: P(y=1) [B], P(class) [B, k], or values in label units [B]."""
        if self.kind == "binary":
            return torch.sigmoid(logits[:, 0])
        if self.kind == "multiclass":
            return torch.softmax(logits, dim=1)
        return logits[:, 0] * self.label_std + self.label_mean

    def empty_predictions(self) -> np.ndarray:
        return np.zeros((0, self.width) if self.kind == "multiclass" else 0, dtype=np.float32)

    def score(self, labels: np.ndarray | None, predictions: np.ndarray) -> dict[str, float]:
        """Every metric of the task (NaN where undefined: no labels, one class, no rows)."""
        if labels is None or len(labels) == 0:
            return {m.name: float("nan") for m in self.metrics}
        return {m.name: m.compute(np.asarray(labels), predictions) for m in self.metrics}

    def better(self, value: float, than: float | None, tie: float = math.nan, than_tie: float | None = None) -> bool:
        """Whether a primary-metric value beats `than` (None: nothing yet); NaN is never better. Equal values
        are decided by the tiebreak metric's `tie` against `than_tie` (the earlier epoch keeps a tie of both)."""
        if math.isnan(value):
            return than is None
        if than is None or math.isnan(than):
            return True
        if value == than:
            return than_tie is not None and _beats(tie, than_tie, self.tiebreak.higher_is_better)
        return _beats(value, than, self.primary.higher_is_better)


    def columns(self) -> list[str]:
        """The prediction columns `vfl infer` writes: probability, one per class, or value."""
        if self.kind == "binary":
            return ["probability"]
        if self.kind == "multiclass":
            return [f"p_{name}" for name in self.classes]
        return ["value"]
