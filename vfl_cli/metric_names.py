"""Every task's metrics by name, primary first, with their titles and directions: what `vfl_cli.task` computes
and what metrics.jsonl, TensorBoard and `vfl report` show. Imports nothing (the report runs without torch)."""

from __future__ import annotations

TASK_METRICS: dict[str, tuple[str, ...]] = {  # the first selects the best epoch
    "binary": ("auc", "log_loss", "ks"),
    "multiclass": ("accuracy", "macro_f1", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}
TITLES = {"auc": "AUC", "log_loss": "log loss", "ks": "KS", "accuracy": "accuracy", "macro_f1": "macro-F1",
          "rmse": "RMSE", "mae": "MAE", "r2": "R²"}
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})
