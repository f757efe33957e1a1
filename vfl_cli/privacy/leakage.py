"""Every label attack of a curious follower on what it received, epoch by epoch, and the strongest one named.

Input: for each epoch, the training gradients the follower received [N, k], the true labels of their rows [N]
(the audit's, to score the attacks; no attack reads them except through `known_labels`' known rows), the step
each came in [N] and the training row each belongs to [N] (the follower knows its own batches).

Per epoch e the suite runs, and reports as `{attack name: leak AUC}`:
    <scorer> per batch             each unsupervised scorer of `attacks`, per batch, averaged over the batches
    <scorer> pooled                the same scores made comparable across batches, one AUC over the epoch
    <model>, <f> known             each model of `known_labels` fitted on the f = 1% and 5% known rows, scored
                                   on the rest (pooled over the epoch)
    <pooled attack>, epochs 0-e    a row's standardised score averaged over every epoch so far (a follower keeps
                                   them all; fresh noise each epoch averages out), for every pooled attack above
The defence's leak at that epoch is the maximum over all of them (`EpochLeak.strongest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vfl_cli.privacy.attacks import leak_auc, per_batch_leak, unsupervised_scores, zscore
from vfl_cli.privacy.known_labels import batch_frame, known_label_scores, known_rows

KNOWN_FRACTIONS = (0.01, 0.05)


@dataclass(frozen=True)
class Received:
    """One epoch of training gradients as the follower got them, joined with what the audit knows of their rows."""

    gradients: np.ndarray  # [N, k] as received (dequantised)
    labels: np.ndarray  # [N] true 0/1 labels of the rows
    batch: np.ndarray  # [N] step of each row
    rows: np.ndarray  # [N] training row id of each row


@dataclass(frozen=True)
class EpochLeak:
    epoch: int
    leaks: dict[str, float]  # attack -> leak AUC (0.5 nothing, 1.0 every label)

    @property
    def strongest(self) -> tuple[str, float]:
        """The attack with the highest leak AUC, and that AUC (NaN attacks ignored; ("-", nan) if none ran)."""
        finite = {name: leak for name, leak in self.leaks.items() if leak == leak}
        if not finite:
            return "-", float("nan")
        name = max(finite, key=lambda n: finite[n])
        return name, finite[name]


@dataclass
class _History:
    """What the follower accumulates over epochs: each pooled attack's summed standardised score per row."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, np.ndarray] | None = None
    frame: np.ndarray | None = None


def epoch_leaks(epochs: list[Received], seed: int = 0) -> list[EpochLeak]:
    """Every attack on each epoch (see the module docstring); epochs in training order."""
    out: list[EpochLeak] = []
    history = _History()
    total_rows = max(int(r.rows.max()) for r in epochs) + 1 if epochs else 0
    row_label = np.zeros(total_rows)
    for epoch, got in enumerate(epochs):
        leaks: dict[str, float] = {}
        pooled, history.axes = unsupervised_scores(got.gradients, got.batch, history.axes)
        for name, scores in pooled.items():
            leaks[f"{name} per batch"] = per_batch_leak(scores, got.labels, got.batch)
        scored = {f"{name} pooled": (scores, np.ones(len(scores), dtype=bool)) for name, scores in pooled.items()}
        coords, history.frame = batch_frame(got.gradients, got.batch, history.frame)
        for fraction in KNOWN_FRACTIONS:
            known = known_rows(got.rows, fraction, seed)
            for name, scores in known_label_scores(coords, got.labels, known, seed).items():
                scored[f"{name}, {fraction:.0%} known"] = (scores, ~known)
        row_label[got.rows] = got.labels
        for name, (scores, judged) in scored.items():
            leaks[name] = leak_auc(scores[judged], got.labels[judged])
            total = history.sums.setdefault(name, np.zeros(total_rows))
            total[got.rows] += zscore(scores)
            if epoch > 0:
                mask = np.zeros(total_rows, dtype=bool)
                mask[got.rows[judged]] = True
                leaks[f"{name}, epochs 0-{epoch}"] = leak_auc(total[mask], row_label[mask])
        out.append(EpochLeak(epoch, leaks))
    return out
