"""`vfl audit`: what a curious follower learns about the labels, and what each defence costs.

An audit trains the job as `vfl train --role local` does (every party in this process, the real loop, the job's
`privacy:` defences, its validation carve and model selection: the run a user would get) while each follower's end of
the grid keeps a copy of every training gradient it receives, which is exactly what that curious follower holds: the
gradients of its own cut, never another follower's. After the run, each follower is attacked on its own gradients
alone: every attack of `vfl_cli.privacy.leakage` (unsupervised, per batch and pooled; with 1% and 5% of the labels
known; each averaged over every epoch kept so far) is scored against the leader's true labels, and that follower's
leak is the strongest of them, named. The defences guard each follower's cut separately and draw each follower's
noise from its own stream (the follower's key is part of every generator's seed, `vfl_cli.privacy.cut_layer`), so
two followers never see the same noise. The audit holds every party's data, so it is a tool for a simulation or a
joint review, not something any party runs alone. The test score is the run's own final figure in the task's
primary metric (AUC, accuracy): the selected epoch's with validation, the last epoch's without.

By task: a binary label is attacked as above (leak AUC, 0.5 = nothing learnt). A multiclass label is attacked by
clustering each batch's gradients into one group per class (`vfl_cli.privacy.multiclass_leak`): the leak is the
label-inference accuracy, against the largest class's share (what guessing the majority class gets). A regression
label is refused at the start, before any training: these attacks infer classes.

`AuditResult.epochs` (and `audit.json`'s top level) are the first follower's, the only one of a two-party job;
`AuditResult.followers` holds every follower's epochs by key, and `AuditResult.of(key)` one follower's result. With
more than one follower, `audit.json` adds `"followers": {key: {"strongest": ..., "epochs": [...]}}` and each
follower's attack inputs lie in a folder of its own; a two-party audit writes exactly what it always did.

The sweep (binary jobs: it includes Marvell, a binary defence) repeats that for a fixed list of settings plus the
leader-only baseline, and writes a table, a CSV and a plot of test AUC against the strongest attack's leak AUC: with
more than one follower, the strongest over every follower (`AuditResult.leakiest`, the follower named), and the CSV
has a line per setting, follower and epoch.

    <out>/<setting>/run/                      the audit run's checkpoints (never the job's own run_dir)
    <out>/<setting>/epoch-E.npz               gradients [N, k] as received, labels [N], batch [N], rows [N]: the
                                              attacks' inputs (two-party job)
    <out>/<setting>/<follower>/epoch-E.npz    the same, per follower (more than one follower)
    <out>/<setting>/audit.json                per-epoch figures, every attack
    <out>/sweep.csv, sweep.png                the sweep
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfl_cli.errors import JobError
from vfl_cli.grid import Grid, LocalGrid, run_all
from vfl_cli.job import JobSpec, PrivacySpec
from vfl_cli.party import PartyContext
from vfl_cli.privacy.cut_layer import CutLayerDefences
from vfl_cli.privacy.leakage import EpochLeak, Received, epoch_leaks
from vfl_cli.privacy.multiclass_leak import check_classes, inference_accuracy
from vfl_cli.protocol import BatchKey, Hello, Kind, Reply, WireTensors
from vfl_cli.reporter import Reporter, SilentReporter
from vfl_cli.train.batches import batch_rows
from vfl_cli.train.loop import TrainOutcome
from vfl_cli.train.session import open_run, train_session

# The sweep: (name, privacy section). Gradient noise is scaled to each batch's largest row norm (Li et al.'s
# isotropic baseline); Marvell's power is a multiple of the squared distance between the class means.
SWEEP: tuple[tuple[str, dict[str, Any]], ...] = (
    ("none", {}),
    ("label_dp eps=0.5", {"label_dp": {"eps": 0.5}}),
    ("label_dp eps=1", {"label_dp": {"eps": 1.0}}),
    ("label_dp eps=2", {"label_dp": {"eps": 2.0}}),
    ("gradient_noise x1", {"gradient_noise": {"noise_ratio": 1.0}}),
    ("gradient_noise x4", {"gradient_noise": {"noise_ratio": 4.0}}),
    ("gradient_noise x16", {"gradient_noise": {"noise_ratio": 16.0}}),
    ("marvell power=4", {"marvell": {"power": 4.0}}),
    ("marvell power=16", {"marvell": {"power": 16.0}}),
    ("marvell power=32", {"marvell": {"power": 32.0}}),
    ("marvell power=64", {"marvell": {"power": 64.0}}),
    ("marvell power=4 + label_dp eps=1", {"marvell": {"power": 4.0}, "label_dp": {"eps": 1.0}}),
    ("marvell power=16 + label_dp eps=2", {"marvell": {"power": 16.0}, "label_dp": {"eps": 2.0}}),
    ("embedding_dp sigma=1", {"embedding_dp": {"clip_norm": 1.0, "sigma": 1.0}}),
    ("quantize 6-bit", {"quantize": {"embeddings": 6, "gradients": 6}}),
)
LEADER_ONLY = "leader-only (no follower)"
CLUSTERING = "k-means per batch"  # the multiclass attack's name (`multiclass_leak`)
MEASURES = {"binary": "leak_auc", "multiclass": "inference_accuracy"}  # what a leak figure is, by task


@dataclass(frozen=True)
class AuditEpoch:
    epoch: int
    scored: float  # the epoch's validation score in the task's primary metric (its test score without validation)
    leaks: dict[str, float]  # attack -> leak AUC (binary) or inference accuracy (multiclass); empty: leader-only
    majority: float = math.nan  # multiclass: the largest class's share of the attacked rows
    floor: float = math.nan  # multiclass: the clustering's accuracy against the labels shuffled per batch

    @property
    def strongest(self) -> tuple[str, float]:
        return EpochLeak(self.epoch, self.leaks).strongest


@dataclass(frozen=True)
class AuditResult:
    setting: str
    test_score: float  # the run's final test score in `metric`: the selected epoch's with validation, else the last
    epochs: list[AuditEpoch]
    metric: str = "auc"  # the task's primary metric: auc (binary) or accuracy (multiclass)
    task: str = "binary"
    # every follower's epochs by key, in job order (the first's are `epochs`); empty: leader-only
    followers: dict[str, list[AuditEpoch]] = field(default_factory=dict)

    def of(self, follower: str) -> AuditResult:
        """The result as that one follower's attacks found it (its epochs; `followers` empty)."""
        return replace(self, epochs=self.followers[follower], followers={})

    @property
    def leakiest(self) -> tuple[str, str, float, int]:
        """(follower, attack, leak, epoch) of the strongest attack over every follower and epoch; ("-", "-", nan,
        -1) without gradients."""
        best = ("-", "-", float("nan"), -1)
        for key in self.followers:
            name, leak, epoch = self.of(key).strongest
            if leak == leak and not leak <= best[2]:
                best = (key, name, leak, epoch)
        return best

    @property
    def measure(self) -> str:
        """What a leak figure is: leak_auc or inference_accuracy."""
        return MEASURES[self.task]

    @property
    def strongest(self) -> tuple[str, float, int]:
        """(attack, leak AUC, epoch) of the strongest attack over every epoch; ("-", nan, -1) without gradients."""
        best = ("-", float("nan"), -1)
        for e in self.epochs:
            name, leak = e.strongest
            if leak == leak and not leak <= best[1]:
                best = (name, leak, e.epoch)
        return best


class GradientRecorder(Grid):
    """A follower's end of the grid, keeping what a curious follower keeps: every training gradient."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.peers, self.is_leader = inner.peers, inner.is_leader
        self.received: dict[tuple[int, int], np.ndarray] = {}  # (epoch, step) -> [B, k] as the follower reads it

    def handshake(self, mine: Hello, reply: Reply) -> dict[str, Hello]:
        return self.inner.handshake(mine, reply)

    def send(self, dst: str, kind: Kind, key: BatchKey, tensors: WireTensors) -> None:
        self.inner.send(dst, kind, key, tensors)

    def receive(self, src: str, kind: Kind, key: BatchKey) -> WireTensors:
        tensors = self.inner.receive(src, kind, key)
        if kind == "gradients" and key.phase == "train":
            floats = CutLayerDefences.received(tensors)
            rows = torch.cat(list(floats.values()), dim=1)  # the cut tensors in the sender's order (wide, deep)
            self.received[(key.epoch, key.step)] = rows.numpy().copy()
        return tensors

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)


def check_auditable(job: JobSpec, sweep: bool = False) -> None:
    """JobError before any training where the audit measures nothing: a regression label, a sweep of a job that
    is not binary."""
    task = job.leader.task
    if task == "regression":
        raise JobError("vfl audit: label-inference attacks are measured for binary and multiclass tasks only; "
                       "this job's task is regression")
    if sweep and task != "binary":
        raise JobError(f"vfl audit --sweep: the defences sweep is for binary jobs (it includes Marvell, a binary "
                       f"defence); this job's task is {task}: audit it without --sweep")


def with_privacy(job: JobSpec, privacy: dict[str, Any]) -> JobSpec:
    """The job with another privacy section."""
    return job.model_copy(update={"privacy": PrivacySpec.model_validate(privacy)})


def audited(job: JobSpec, run_dir: Path) -> JobSpec:
    """The job as an audit trains it: exactly as the user's job (validation, model selection, early stopping),
    from scratch, into run_dir (never the job's own checkpoints)."""
    return job.model_copy(update={"train": job.train.model_copy(update={"run_dir": run_dir})})


def audit_run(job: JobSpec, out: Path, reporter: Reporter | None = None, setting: str | None = None) -> AuditResult:
    """Train `job` from scratch with every party here, recording each follower's gradients; attack each follower's
    on their own, write the audit (files under `out`, see the module docstring) and return it."""
    check_auditable(job)
    job = audited(job, out / "run")
    grids = LocalGrid.star(job.label_party, job.followers, job.transport.timeout_s)
    recorders = {key: GradientRecorder(grids[key]) for key in job.followers}
    leader = open_run(PartyContext.of(job, job.label_party), grids[job.label_party], reporter)
    followers = {key: open_run(PartyContext.of(job, key), recorder) for key, recorder in recorders.items()}
    if leader.task.kind == "multiclass":
        try:
            check_classes(leader.task.width)  # before training, not after
        except ValueError as exc:
            raise JobError(f"vfl audit: {exc}") from exc
    outcome: TrainOutcome = run_all({
        job.label_party: (partial(train_session, leader, True), leader.grid),
        **{key: (partial(train_session, run, True), run.grid) for key, run in followers.items()},
    }, job.label_party)[job.label_party]
    labels = np.asarray(leader.view("train").labels, dtype=np.float64)  # the rows the run trains on, carve applied
    scored = {epoch: result.score if result else math.nan for epoch, _, result in outcome.epochs}
    attacked = {key: follower_epochs(recorder.received, labels, job, scored, leader.task.kind, leader.task.width,
                                     out if len(recorders) == 1 else out / key)
                for key, recorder in recorders.items()}
    first = attacked[job.followers[0]]
    result = AuditResult(setting or (", ".join(job.privacy.enabled) or "none"), final_test_score(outcome), first,
                         leader.task.primary.name, leader.task.kind, attacked)
    write_json(result, job, out / "audit.json")
    return result


def follower_epochs(received: dict[tuple[int, int], np.ndarray], labels: np.ndarray, job: JobSpec,
                    scored: dict[int, float], task: str, classes: int, save_in: Path) -> list[AuditEpoch]:
    """One follower's recorded gradients attacked, epoch by epoch (`scored`: epoch -> its score, in training
    order); their attack inputs saved in `save_in`."""
    save_in.mkdir(parents=True, exist_ok=True)
    got = [received_in_epoch(received, labels, job, epoch, save_in / f"epoch-{epoch}.npz") for epoch in scored]
    if task == "multiclass":
        return clustering_epochs(got, scored, classes, job.seed)
    return [AuditEpoch(epoch, score, leak.leaks)
            for (epoch, score), leak in zip(scored.items(), epoch_leaks(got, seed=job.seed), strict=True)]


def clustering_epochs(received: list[Received], scored: dict[int, float], classes: int, seed: int
                      ) -> list[AuditEpoch]:
    """The multiclass attack on each epoch's gradients (`scored`: epoch -> its score, in training order):
    inference accuracy, majority share, shuffled floor."""
    out = []
    for got, (epoch, score) in zip(received, scored.items(), strict=True):
        leak = inference_accuracy(got.gradients, got.labels, got.batch, classes, seed + 1000 * epoch)
        out.append(AuditEpoch(epoch, score, {CLUSTERING: leak.accuracy}, leak.majority, leak.floor))
    return out


def final_test_score(outcome: TrainOutcome) -> float:
    """The run's own test score (its task's primary metric): the selected epoch's with validation, else the last
    epoch's (NaN without one)."""
    final = outcome.final_test if outcome.final_test is not None else outcome.epochs[-1][2]
    return final.score if final is not None else math.nan


def primary_metric(outcome: TrainOutcome) -> str:
    """The name of the metric the outcome's scores are in (auc without any)."""
    results = [outcome.final_test, *(result for _, _, result in outcome.epochs)]
    return next((r.primary for r in results if r is not None), "auc")


def received_in_epoch(received: dict[tuple[int, int], np.ndarray], labels: np.ndarray, job: JobSpec, epoch: int,
                      save_to: Path) -> Received:
    """Join one epoch's recorded gradients with their training rows and those rows' true labels (the batch order
    is the seed's), and save the attacks' inputs."""
    rows_of_step = batch_rows(len(labels), job.train.batch_size, job.seed, epoch, shuffle=True)
    steps = sorted(step for e, step in received if e == epoch)
    rows = np.concatenate([rows_of_step[step] for step in steps])
    got = Received(gradients=np.concatenate([received[(epoch, step)] for step in steps]), labels=labels[rows],
                   batch=np.concatenate([np.full(len(rows_of_step[step]), step) for step in steps]), rows=rows)
    np.savez(save_to, gradients=got.gradients, labels=got.labels, batch=got.batch, rows=got.rows)
    return got


def write_json(result: AuditResult, job: JobSpec, path: Path) -> None:
    """The audit's figures, named by the task's metric (`test_auc` / `test_accuracy`, `scored_...`) and each
    measured leak (`leak_auc` / `inference_accuracy`); a multiclass epoch adds its majority share and shuffled floor.
    The top level is the first follower's; with more than one follower, `followers` has each one's, by key."""
    metric = result.metric

    def epoch_json(e: AuditEpoch) -> dict[str, Any]:
        extra = {"majority_share": e.majority, "shuffled_floor": e.floor} if result.task == "multiclass" else {}
        return {"epoch": e.epoch, f"scored_{metric}": e.scored, "leaks": e.leaks, **extra}

    def strongest_json(one: AuditResult) -> dict[str, Any]:
        name, leak, epoch = one.strongest
        return {"attack": name, one.measure: leak, "epoch": epoch}

    report: dict[str, Any] = {
        "job": job.name, "task": result.task, "metric": metric, "setting": result.setting,
        "privacy": job.privacy.model_dump(mode="json"), f"test_{metric}": result.test_score,
        "strongest": strongest_json(result), "epochs": [epoch_json(e) for e in result.epochs],
    }
    if len(result.followers) > 1:
        report["followers"] = {key: {"strongest": strongest_json(result.of(key)),
                                     "epochs": [epoch_json(e) for e in epochs]}
                               for key, epochs in result.followers.items()}
    path.write_text(json.dumps(report, indent=1) + "\n")


def sweep(job: JobSpec, out: Path, progress: Callable[[int, int, str], Reporter] | None = None,
          settings: tuple[tuple[str, dict[str, Any]], ...] = SWEEP) -> list[AuditResult]:
    """Audit each setting (the job's own privacy section is replaced), then the leader-only baseline."""
    from vfl_cli.train.baseline import train_baseline

    check_auditable(job, sweep=True)
    rows = []
    total = len(settings) + 1
    for index, (name, privacy) in enumerate(settings):
        reporter = progress(index + 1, total, name) if progress else SilentReporter()
        rows.append(audit_run(with_privacy(job, privacy), out / slug(name), reporter, setting=name))
    reporter = progress(total, total, LEADER_ONLY) if progress else SilentReporter()
    baseline = train_baseline(audited(job, out / "leader-only"), "leader-only", reporter, restart=True)
    rows.append(AuditResult(LEADER_ONLY, final_test_score(baseline),
                            [AuditEpoch(e, r.score if r else math.nan, {}) for e, _, r in baseline.epochs],
                            primary_metric(baseline)))
    write_csv(rows, out / "sweep.csv")
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name).strip("-")


def write_csv(rows: list[AuditResult], path: Path) -> None:
    """One line per setting and epoch: the run's test score (`test_<metric>`, auc for the binary sweep), the
    epoch's, the epoch's strongest attack, then every attack. With more than one follower, one line per setting,
    follower and epoch, the follower in a `follower` column (each follower's attacks on its own gradients)."""
    attacks = sorted({name for r in rows for epochs in (r.followers or {"": r.epochs}).values()
                      for e in epochs for name in e.leaks})
    metric = rows[0].metric if rows else "auc"
    several = any(len(r.followers) > 1 for r in rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", *(["follower"] if several else []), f"test_{metric}", "epoch",
                         f"scored_{metric}", "strongest_attack", "strongest_leak_auc", *attacks])
        for row in rows:
            for key, epochs in (row.followers if several and row.followers else {"-": row.epochs}).items():
                for e in epochs:
                    name, leak = e.strongest
                    writer.writerow([row.setting, *([key] if several else []), f"{row.test_score:.6f}", e.epoch,
                                     f"{e.scored:.6f}", name, f"{leak:.6f}",
                                     *(f"{e.leaks.get(a, math.nan):.6f}" for a in attacks)])


def plot(rows: list[AuditResult], path: Path, title: str) -> None:
    """Test AUC (x) against the strongest attack's leak AUC (y), over every follower: one point per setting."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    defended = [r for r in rows if r.setting != LEADER_ONLY]
    if not defended:
        raise JobError("nothing to plot: the sweep has no settings")
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    colours = plt.get_cmap("tab20")
    for index, r in enumerate(defended):
        follower, attack, leak, _ = r.leakiest if r.followers else ("-", *r.strongest)
        at = f"{follower}: {attack}" if len(r.followers) > 1 else attack
        ax.scatter([r.test_score], [leak], marker="o", s=50, color=colours(index % 20), label=f"{r.setting} ({at})")
    none = next((r for r in defended if r.setting == "none"), None)
    if none is not None:
        ax.axvline(none.test_score - 0.01, color="grey", linestyle=":", label="no defence - 0.01 AUC")
    leader_only = next((r for r in rows if r.setting == LEADER_ONLY), None)
    if leader_only is not None:
        ax.axvline(leader_only.test_score, color="red", linestyle="--", label="leader-only test AUC")
    ax.axhline(0.6, color="grey", linestyle="--", label="leak AUC 0.60")
    ax.set_xlabel("leader's test AUC (the run's final figure, as the job runs)")
    ax.set_ylabel("label leak AUC of the strongest attack, any follower\n(0.5 = none, 1 = every label)")
    ax.set_title(title)
    ax.set_ylim(0.45, 1.03)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
