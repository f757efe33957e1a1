"""`vfl audit`: what a curious follower learns about the labels, and what each defence costs.

An audit trains the job as `vfl train --role local` does (both parties in this process, the real loop and the
job's `privacy:` defences; nothing about the run changes) while the follower's end of the pipe keeps a copy of
every training gradient it receives, which is exactly what a curious follower holds. After the run, each
epoch's gradients go through the attacks of `vfl_cli.privacy.attacks` and are scored against the leader's
true labels (the audit holds both parties' data, so it is a tool for a simulation or a joint review, not
something either party runs alone). Per epoch it reports the leader's test AUC and both attacks' leak AUC
(a job's validation carve and early stopping are left out: see `audited`).

The sweep repeats that for a fixed list of settings plus the leader-only baseline, and writes a table, a CSV
and a plot of test AUC against leak AUC.

    <out>/<setting>/run/           the audit run's checkpoints (never the job's own run_dir)
    <out>/<setting>/epoch-E.npz    gradients [N, 2] as received, labels [N], batch [N]: the attack's inputs
    <out>/<setting>/audit.json     per-epoch figures
    <out>/sweep.csv, sweep.png     the sweep
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfl_cli.errors import JobError
from vfl_cli.job import JobSpec, PrivacySpec
from vfl_cli.peer import BatchKey, Hello, Kind, LocalPeer, Peer, WireTensors, run_both
from vfl_cli.privacy.attacks import Leak, epoch_leak
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.train.batches import batch_rows
from vfl_cli.train.loop import Reporter, SilentReporter, TrainOutcome
from vfl_cli.train.session import open_run, train_session

# The sweep: (name, privacy section). Gradient noise is scaled to each batch's largest row norm (Li et al.'s
# isotropic baseline); Marvell's power is a multiple of the squared distance between the class means.
SWEEP: tuple[tuple[str, dict[str, Any]], ...] = (
    ("none", {}),
    ("label_dp eps=0.5", {"label_dp": {"eps": 0.5}}),
    ("label_dp eps=1", {"label_dp": {"eps": 1.0}}),
    ("label_dp eps=2", {"label_dp": {"eps": 2.0}}),
    ("label_dp eps=4", {"label_dp": {"eps": 4.0}}),
    ("gradient_noise x1", {"gradient_noise": {"noise_ratio": 1.0}}),
    ("gradient_noise x4", {"gradient_noise": {"noise_ratio": 4.0}}),
    ("gradient_noise x16", {"gradient_noise": {"noise_ratio": 16.0}}),
    ("marvell power=4", {"marvell": {"power": 4.0}}),
    ("marvell power=16", {"marvell": {"power": 16.0}}),
    ("embedding_dp sigma=1", {"embedding_dp": {"clip_norm": 1.0, "sigma": 1.0}}),
    ("embedding_rr eps=2", {"embedding_rr": {"eps": 2.0}}),
    ("quantize 6-bit", {"quantize": {"embeddings": 6, "gradients": 6}}),
    ("quantize 2-bit", {"quantize": {"embeddings": 2, "gradients": 2}}),
)
LEADER_ONLY = "leader-only (no follower)"


@dataclass(frozen=True)
class AuditEpoch:
    epoch: int
    test_auc: float
    direction_leak: float  # mean per-batch max(AUC, 1 - AUC) of the direction attack; nan without gradients
    norm_leak: float


class GradientRecorder(Peer):
    """The follower's end of the pipe, keeping what a curious follower keeps: every training gradient."""

    def __init__(self, inner: Peer) -> None:
        self.inner = inner
        self.received: dict[tuple[int, int], np.ndarray] = {}  # (epoch, step) -> [B, 2] as the follower reads it

    def handshake(self, mine: Hello) -> Hello:
        return self.inner.handshake(mine)

    def send(self, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        self.inner.send(kind, key, tensors)

    def receive(self, kind: Kind, key: BatchKey) -> WireTensors:
        tensors = self.inner.receive(kind, key)
        if kind == "gradients" and key.phase == "train":
            floats = CutLayerDefences.received(tensors)
            self.received[(key.epoch, key.step)] = torch.cat([floats["wide"], floats["deep"]], dim=1).numpy().copy()
        return tensors

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)


def with_privacy(job: JobSpec, privacy: dict[str, Any]) -> JobSpec:
    """The job with another privacy section."""
    return job.model_copy(update={"privacy": PrivacySpec.model_validate(privacy)})


def audited(job: JobSpec, run_dir: Path) -> JobSpec:
    """The job as an audit trains it: into run_dir (never the job's own checkpoints), on every training row,
    scoring the test split after each epoch (no validation carve, no early stopping), so that each epoch's
    AUC is comparable across settings and each recorded gradient joins the label of a stored training row."""
    data = job.data.model_copy(update={"valid_fraction": 0.0})
    train = job.train.model_copy(update={"run_dir": run_dir, "early_stopping": None})
    return job.model_copy(update={"data": data, "train": train})


def audit_run(job: JobSpec, out: Path, reporter: Reporter | None = None) -> list[AuditEpoch]:
    """Train `job` from scratch in both roles here, recording the follower's gradients; write and return
    the per-epoch audit (files under `out`, see the module docstring)."""
    job = audited(job, out / "run")
    leader_peer, follower_peer = LocalPeer.pair(job.transport.timeout_s)
    recorder = GradientRecorder(follower_peer)
    leader = open_run(job, "leader", leader_peer, reporter)
    follower = open_run(job, "follower", recorder)
    outcome: TrainOutcome = run_both({
        "leader": (partial(train_session, leader, True), leader_peer),
        "follower": (partial(train_session, follower, True), recorder),
    })["leader"]
    train_split = leader.data.split("train")
    labels = np.asarray(train_split.labels, dtype=np.float64)
    epochs = []
    for epoch, _, result in outcome.epochs:
        leak = leak_of_epoch(recorder.received, labels, job, epoch, out / f"epoch-{epoch}.npz")
        epochs.append(AuditEpoch(epoch, result.auc if result else math.nan, leak.direction, leak.norm))
    (out / "audit.json").write_text(json.dumps({"job": job.name, "privacy": job.privacy.model_dump(mode="json"),
                                                "epochs": [asdict(e) for e in epochs]}, indent=1) + "\n")
    return epochs


def leak_of_epoch(received: dict[tuple[int, int], np.ndarray], labels: np.ndarray, job: JobSpec, epoch: int,
                  save_to: Path) -> Leak:
    """Join one epoch's recorded gradients with the true labels of their rows (the batch order is the seed's),
    save the attack's inputs, and run both attacks."""
    rows_of_step = batch_rows(len(labels), job.train.batch_size, job.seed, epoch, shuffle=True)
    steps = sorted(step for e, step in received if e == epoch)
    gradients = np.concatenate([received[(epoch, step)] for step in steps])
    row_labels = np.concatenate([labels[rows_of_step[step]] for step in steps])
    batch = np.concatenate([np.full(len(rows_of_step[step]), step) for step in steps])
    np.savez(save_to, gradients=gradients, labels=row_labels, batch=batch)
    return epoch_leak(gradients, row_labels, batch)


@dataclass(frozen=True)
class SweepRow:
    setting: str
    epochs: list[AuditEpoch]

    @property
    def final(self) -> AuditEpoch:
        return self.epochs[-1]

    @property
    def worst_direction(self) -> float:
        return max(e.direction_leak for e in self.epochs)

    @property
    def worst_norm(self) -> float:
        return max(e.norm_leak for e in self.epochs)


def sweep(job: JobSpec, out: Path, progress: Callable[[int, int, str], Reporter] | None = None,
          settings: tuple[tuple[str, dict[str, Any]], ...] = SWEEP) -> list[SweepRow]:
    """Audit each setting (the job's own privacy section is replaced), then the leader-only baseline."""
    from vfl_cli.train.baseline import train_baseline

    rows = []
    total = len(settings) + 1
    for index, (name, privacy) in enumerate(settings):
        reporter = progress(index + 1, total, name) if progress else SilentReporter()
        folder = out / slug(name)
        rows.append(SweepRow(name, audit_run(with_privacy(job, privacy), folder, reporter)))
    reporter = progress(total, total, LEADER_ONLY) if progress else SilentReporter()
    baseline = train_baseline(audited(job, out / "leader-only"), "leader-only", reporter, restart=True)
    rows.append(SweepRow(LEADER_ONLY, [AuditEpoch(e, r.auc if r else math.nan, math.nan, math.nan)
                                       for e, _, r in baseline.epochs]))
    write_csv(rows, out / "sweep.csv")
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name).strip("-")


def write_csv(rows: list[SweepRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "epoch", "test_auc", "direction_leak_auc", "norm_leak_auc"])
        for row in rows:
            for e in row.epochs:
                writer.writerow([row.setting, e.epoch, f"{e.test_auc:.6f}", f"{e.direction_leak:.6f}",
                                 f"{e.norm_leak:.6f}"])


def plot(rows: list[SweepRow], path: Path, title: str) -> None:
    """Test AUC (x) against leak AUC (y) at the final epoch: one colour per setting, one marker per attack."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    defended = [r for r in rows if r.setting != LEADER_ONLY]
    if not defended:
        raise JobError("nothing to plot: the sweep has no settings")
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    colours = plt.get_cmap("tab20")
    for index, r in enumerate(defended):
        colour = colours(index % 20)
        ax.scatter([r.final.test_auc], [r.final.direction_leak], marker="o", s=50, color=colour, label=r.setting)
        ax.scatter([r.final.test_auc], [r.final.norm_leak], marker="^", s=50, color=colour)
    none = next((r for r in defended if r.setting == "none"), None)
    if none is not None:
        ax.axvline(none.final.test_auc - 0.01, color="grey", linestyle=":", label="no defence - 0.01 AUC")
    leader_only = next((r for r in rows if r.setting == LEADER_ONLY), None)
    if leader_only is not None:
        ax.axvline(leader_only.final.test_auc, color="red", linestyle="--", label="leader-only test AUC")
    ax.axhline(0.6, color="grey", linestyle="--", label="leak AUC 0.60")
    ax.set_xlabel("leader's test AUC (final epoch)")
    ax.set_ylabel("label leak AUC (final epoch; 0.5 = none, 1 = every label)\n"
                  "circle: direction attack, triangle: norm attack")
    ax.set_title(title)
    ax.set_ylim(0.45, 1.03)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
