"""`make bench-quality`: vfl on FATE's own vertically split tables, against its baselines and scikit-learn.

For each data set in ../shared/data/fate/ and each seed, the two CSVs are split 80/20 by
`train_test_split(test_size=0.2, random_state=seed, stratify=y)` (stratified for classification; the split
the README of ../shared/data/fate/ uses for its reference figures). The 80% go through the flow a user runs,
each step a `vfl` process: `vfl init` -> `vfl prep table` per party -> `vfl psi` -> `vfl train --role local`,
`--role central`, `--role leader-only`. The 20% held out are prepared with the trained vocabulary and scaling
(`prep table --vocab-from`), aligned (`vfl psi --out`), scored (`vfl infer`, and the baselines' checkpoints)
and compared with their labels. For seed 0, the split run is repeated as two processes over mutual TLS
(`vfl train --role leader` / `--role follower`, then `vfl infer` the same way) and its predictions are checked
equal to `--role local`'s to 1e-6. References on the same split: scikit-learn on the pooled columns
(LogisticRegression / Ridge, HistGradientBoosting*, default settings).

vfl carves its validation split (model selection, early stopping) and its own test split out of the 80%, so it
trains on fewer rows than scikit-learn does. FATE scores its benchmarks on the training rows; these are
held-out rows.

    python -m benchmarks.quality [--sets breast,default_credit,...] [--seeds 5] [--work runs/bench-quality]

Prints one table (mean ± std over the seeds per cell) and writes it as Markdown to <work>/quality.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FATE = ROOT.parent / "shared" / "data" / "fate"
SETS = {  # name -> task, as ../shared/data/fate/README.md describes them
    "breast": "binary",
    "default_credit": "binary",
    "vehicle_scale": "multiclass",
    "student": "regression",
}
ROWS = ("split (local)", "central", "leader-only", "sklearn linear, pooled", "sklearn boosting, pooled")


@dataclass(frozen=True)
class Paths:
    work: Path  # the data set and seed's directory; every `vfl` command runs here
    job: Path

    def __str__(self) -> str:
        return str(self.work)


def vfl(paths: Paths, *args: str, env: dict[str, str] | None = None) -> str:
    """One `vfl` command in the work directory; its stdout, or the run stops with its stderr."""
    command = [sys.executable, "-m", "vfl_cli.app", *args]
    done = subprocess.run(command, cwd=paths.work, capture_output=True, text=True, env=env or child_env())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {paths}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true"}


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def split_files(name: str, seed: int, work: Path, label_only: bool = False) -> dict[str, float]:
    """Write leader/follower train and held-out CSVs; return the held-out labels by customer id. With
    `label_only` the leader keeps only id and label, and the follower holds every feature column of both files."""
    from sklearn.model_selection import train_test_split

    guest_header, guest = read_csv(FATE / f"{name}_hetero_guest.csv")
    host_header, host = read_csv(FATE / f"{name}_hetero_host.csv")
    label = guest_header.index("y")
    by_id = {row[0]: row for row in host}
    if label_only:
        host = [[g[0], *(c for i, c in enumerate(g) if i not in (0, label)), *by_id[g[0]][1:]] for g in guest]
        host_header = ["id", *(f"guest_{c}" for i, c in enumerate(guest_header) if i not in (0, label)),
                       *(f"host_{c}" for c in host_header[1:])]
        guest, guest_header, label = [[g[0], g[label]] for g in guest], ["id", "y"], 1
        by_id = {row[0]: row for row in host}
    labels = [row[label] for row in guest]
    stratify = labels if SETS[name] != "regression" else None
    train, test = train_test_split(np.arange(len(guest)), test_size=0.2, random_state=seed, stratify=stratify)
    without_label = [c for i, c in enumerate(guest_header) if i != label]
    for part, rows in (("train", train), ("test", test)):
        leader_rows = [guest[i] for i in rows]
        if part == "test":  # new customers arrive without their label
            leader_rows = [[c for i, c in enumerate(row) if i != label] for row in leader_rows]
        write_csv(work / f"leader_{part}.csv", guest_header if part == "train" else without_label, leader_rows)
        write_csv(work / f"follower_{part}.csv", host_header, [by_id[guest[i][0]] for i in rows])
    return {guest[i][0]: float(guest[i][label]) for i in test}


def prepare(name: str, seed: int, root: Path, label_only: bool = False) -> tuple[Paths, dict[str, float]]:
    work = root / (f"{name}-label-only" if label_only else name) / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    truth = split_files(name, seed, work, label_only)
    paths = Paths(work, work / "job.yaml")
    vfl(paths, "init", "--leader", "leader_train.csv", "--follower", "follower_train.csv", "--id", "id",
        "--label", "y", "--name", f"{name}-s{seed}", "--out", "job.yaml", "--force")
    set_seed(paths.job, seed)
    if len(truth) < 100:  # student: 79 held-out customers, under the default psi.min_intersection of 100
        with paths.job.open("a") as job:
            job.write(f"psi:\n  min_intersection: {len(truth)}  # bench-quality: the held-out rows are scored too\n")
    for role in ("leader", "follower"):
        vfl(paths, "prep", "table", "--job", "job.yaml", "--role", role, "--input", f"{role}_train.csv")
    vfl(paths, "psi", "--job", "job.yaml", "--role", "local")
    return paths, truth


def set_seed(job: Path, seed: int) -> None:
    """The job's seed (`vfl init` writes 0): initial weights, batch order and the job's own carves."""
    text = job.read_text()
    job.write_text(text.replace("\nseed: 0\n", f"\nseed: {seed}\n", 1))


def held_out(paths: Paths, name: str) -> Path:
    """The held-out rows, encoded with the trained vocabulary and scaling and aligned: <work>/new."""
    data = paths.work / "runs" / name / "data"
    for role in ("leader", "follower"):
        vfl(paths, "prep", "table", "--job", "job.yaml", "--role", role, "--input", f"{role}_test.csv",
            "--vocab-from", str(data / role), "--out", f"new-tables/{role}")
    vfl(paths, "psi", "--job", "job.yaml", "--role", "local", "--table", "new-tables", "--out", "new")
    return paths.work / "new"


def read_predictions(path: Path) -> dict[str, list[float]]:
    header, rows = read_csv(path)
    assert header[0] == "id", header
    return {row[0]: [float(v) for v in row[1:]] for row in rows}


def score(task: str, truth: dict[str, float], predictions: dict[str, list[float]]) -> float:
    """The task's primary metric of predictions (by customer id) against the held-out labels."""
    from vfl_cli.task import Task

    ids = sorted(truth)
    labels = np.array([truth[i] for i in ids])
    found = np.array([predictions[i] for i in ids])
    if task == "multiclass":
        classes = tuple(sorted({str(int(v)) for v in labels}, key=float))  # as `vfl prep` orders numeric classes
        labels = np.array([classes.index(str(int(v))) for v in labels], dtype=np.float64)
        scorer = Task(task, classes)
    else:
        scorer, found = Task(task), found[:, 0]  # type: ignore[arg-type]
    return scorer.score(labels, found)[scorer.primary.name]


def baseline_predictions(paths: Paths, name: str, kind: str, new: Path) -> dict[str, list[float]]:
    """A baseline's checkpoint scored on the held-out rows, by customer id (in this process: the CLI's
    `vfl eval --role central` scores the job's own splits)."""
    os.chdir(paths.work)
    from data_prep.store import open_party
    from vfl_cli.job import load_job
    from vfl_cli.train.baseline import evaluate_baseline_checkpoint

    job = load_job(paths.job)
    job = job.model_copy(update={"data": job.data.model_copy(update={"dir": new})})
    result = evaluate_baseline_checkpoint(job, kind, job.train.run_dir, "all")
    customers = open_party(new, "leader").customer_ids("all")
    assert customers is not None
    values = result.predictions.reshape(len(result.predictions), -1).tolist()
    return {c.decode(): v for c, v in zip(customers.tolist(), values, strict=True)}


def sklearn_scores(name: str, seed: int) -> tuple[float, float]:
    """(linear, gradient boosting) on the pooled columns, the same split: the README's references."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, mean_squared_error, roc_auc_score
    from sklearn.model_selection import train_test_split

    guest_header, guest = read_csv(FATE / f"{name}_hetero_guest.csv")
    _, host = read_csv(FATE / f"{name}_hetero_host.csv")
    label = guest_header.index("y")
    y = np.array([float(r[label]) for r in guest])
    x = np.array([[float(v) for i, v in enumerate(g) if i not in (0, label)] + [float(v) for v in h[1:]]
                  for g, h in zip(guest, host, strict=True)])
    task = SETS[name]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed,
                                                        stratify=y if task != "regression" else None)
    found = []
    if task == "regression":
        for model in (Ridge(), HistGradientBoostingRegressor()):
            found.append(float(np.sqrt(mean_squared_error(y_test, model.fit(x_train, y_train).predict(x_test)))))
    for model in () if task == "regression" else (LogisticRegression(max_iter=5000),
                                                  HistGradientBoostingClassifier()):
        fitted = model.fit(x_train, y_train)
        if task == "binary":
            found.append(float(roc_auc_score(y_test, fitted.predict_proba(x_test)[:, 1])))
        else:
            found.append(float(accuracy_score(y_test, fitted.predict(x_test))))
    return found[0], found[1]


def over_mtls(paths: Paths, name: str, local: Path) -> float:
    """The split run again as two processes over mutual TLS (a fresh run dir), its held-out predictions
    against --role local's: the largest absolute difference."""
    vfl(paths, "certs", "--job", "job.yaml")
    job = paths.job.read_text()
    paths.job.with_name("job-mtls.yaml").write_text(job.replace(f"runs/{name}/train", f"runs/{name}/train-mtls"))
    twin = Paths(paths.work, paths.work / "job-mtls.yaml")
    for command in (["train"], ["infer", "--data", "new", "--split", "all"]):
        leader_args = ["--out", "mtls.csv"] if command[0] == "infer" else []
        procs = [subprocess.Popen([sys.executable, "-m", "vfl_cli.app", *command, "--job", "job-mtls.yaml", "--role",
                                   role, *(leader_args if role == "leader" else [])], cwd=twin.work, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for role in ("leader", "follower")]
        for proc in procs:
            out, _ = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"two-process {command[0]} failed in {paths}:\n{out}")
    mine, theirs = read_predictions(paths.work / "mtls.csv"), read_predictions(local)
    return max(abs(a - b) for key in theirs for a, b in zip(mine[key], theirs[key], strict=True))


def run_one(name: str, seed: int, root: Path, label_only: bool = False) -> dict[str, float]:
    """Every row of the table for one data set and seed (with `label_only`: the split and central rows of a
    label-only leader, the follower holding all the features)."""
    task = SETS[name]
    paths, truth = prepare(name, seed, root, label_only)
    job_name = f"{name}-s{seed}"
    found: dict[str, float] = {}
    vfl(paths, "train", "--job", "job.yaml", "--role", "local")
    new = held_out(paths, job_name)
    vfl(paths, "infer", "--job", "job.yaml", "--role", "local", "--data", "new", "--split", "all", "--out", "local.csv")
    found["split (local)"] = score(task, truth, read_predictions(paths.work / "local.csv"))
    for kind in ("central",) if label_only else ("central", "leader-only"):
        vfl(paths, "train", "--job", "job.yaml", "--role", kind)
        found[kind] = score(task, truth, baseline_predictions(paths, job_name, kind, new))
    if label_only:
        return found
    found["sklearn linear, pooled"], found["sklearn boosting, pooled"] = sklearn_scores(name, seed)
    if seed == 0:
        found["mtls max |diff|"] = over_mtls(paths, job_name, paths.work / "local.csv")
    return found


def table(results: dict[str, list[dict[str, float]]]) -> str:
    metric = {"binary": "test AUC", "multiclass": "test accuracy", "regression": "test RMSE"}
    lines = ["| model | " + " | ".join(f"{n} ({metric[SETS[n]]})" for n in results) + " |",
             "| --- |" + " --- |" * len(results)]
    for row in ROWS:
        cells = []
        for runs in results.values():
            values = np.array([r[row] for r in runs])
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    diffs = [f"{n}: {r[0]['mtls max |diff|']:.1e}" for n, r in results.items() if "mtls max |diff|" in r[0]]
    seeds = len(next(iter(results.values())))
    return "\n".join(lines) + (f"\n\nmean ± std over {seeds} seed(s) (population std); seed 0 as two processes over "
                               f"mutual TLS, largest |prediction - local's|: {', '.join(diffs)}\n")


def label_only_table(results: dict[str, list[dict[str, float]]]) -> str:
    """A label-only leader (no feature columns; the follower holds them all) against central, per data set."""
    lines = ["", "Label-only leader (the follower holds every feature column):", "",
             "| data set | split (local) | central | split - central |", "| --- | --- | --- | --- |"]
    for name, runs in results.items():
        split, central = (np.array([r[k] for r in runs]) for k in ("split (local)", "central"))
        lines.append(f"| {name} | {split.mean():.4f} ± {split.std():.4f} | {central.mean():.4f} ± {central.std():.4f}"
                     f" | {(split - central).mean():+.4f} |")
    return "\n".join(lines) + "\n" if results else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated data set names")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality")
    parser.add_argument("--label-only", default="default_credit",
                        help="data sets also run with a label-only leader (comma-separated; '' for none)")
    args = parser.parse_args()
    if not FATE.is_dir():
        raise SystemExit(f"{FATE}: not found (the FATE tables come with the project's shared data)")
    results: dict[str, list[dict[str, float]]] = {}
    started = time.perf_counter()
    for name in args.sets.split(","):
        results[name] = []
        for seed in range(args.seeds):
            results[name].append(run_one(name, seed, args.work.resolve()))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[name][-1].items())
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    label_only: dict[str, list[dict[str, float]]] = {}
    for name in filter(None, args.label_only.split(",")):
        label_only[name] = [run_one(name, seed, args.work.resolve(), True) for seed in range(args.seeds)]
    text = table(results) + label_only_table(label_only)
    print(text)
    (args.work / "quality.md").write_text(text)


if __name__ == "__main__":
    main()
