"""The report's three PNG plots (matplotlib, drawn to files only): losses per step, the run's primary metric
(AUC, accuracy or RMSE) per epoch with the selected epoch marked, train samples/s per epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfl_cli.report.records import RunMetrics

PLOTS = ("loss.png", "metric.png", "speed.png")
LOSSES = {"auc": "log loss", "accuracy": "cross-entropy", "rmse": "MSE of the standardised label"}  # by task


def _values(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]  # NaN: a gap in the line


def write_plots(run: RunMetrics, out: Path, title: str) -> None:
    """loss.png, metric.png and speed.png into `out`; an empty plot says what is missing rather than being
    skipped, so the page's images always load."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    def figure(file: str, name: str, draw: Callable[[Any], bool]) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        if not draw(ax):
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)

    def loss(ax: Any) -> bool:
        x, task_loss = [s.global_step for s in run.steps], LOSSES.get(run.metric, "the task's loss")
        ax.plot(x, _values([s.wide_loss for s in run.steps]), label=f"wide_loss ({task_loss})")
        ax.plot(x, _values([s.deep_loss for s in run.steps]), label=f"deep_loss ({task_loss} + L2)", linestyle="--")
        ax.set_xlabel("global step")
        ax.set_ylabel("training loss")
        return _legend(ax, bool(x))

    def metric(ax: Any) -> bool:
        name, label = run.metric, run.title
        x = [e.epoch for e in run.epochs]
        drawn = False
        for split, values, marker in (("validation", [e.valid.get(name) for e in run.epochs], "o"),
                                      ("test", [e.test.get(name) for e in run.epochs], "s")):
            if any(v is not None for v in values):
                ax.plot(x, _values(values), marker=marker, label=f"{split} {label}")
                drawn = True
        final = run.final_test
        if final is not None and final.scores.get(name) is not None and final.epoch is not None:
            ax.plot([final.epoch], [final.scores[name]], marker="*", markersize=14, linestyle="none",
                    color="black", label=f"final test {label}")
            drawn = True
        if run.selected is not None:
            ax.axvline(run.selected.epoch, color="grey", linestyle=":")
            ax.text(run.selected.epoch, 0.02, f" selected: epoch {run.selected.epoch}", color="dimgrey",
                    transform=ax.get_xaxis_transform())  # x in epochs, y in axes fractions: the line's foot
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        return _legend(ax, drawn)

    def speed(ax: Any) -> bool:
        points = [(e.epoch, e.samples_per_s) for e in run.epochs if e.samples_per_s is not None]
        ax.bar([p[0] for p in points], [p[1] for p in points], color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train samples/s")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return bool(points)

    figure("loss.png", "training loss per step", loss)
    figure("metric.png", f"{run.title} per epoch", metric)
    figure("speed.png", "train samples/s per epoch", speed)


def _legend(ax: Any, drawn: bool) -> bool:
    if drawn:
        ax.legend(fontsize=9)
    return drawn
