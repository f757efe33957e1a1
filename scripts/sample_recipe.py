"""How jobs/sample.yaml's recipe was chosen: a coordinate search on the validation AUC alone.

Starting from a base job, each round tries every value of one setting (keeping the others at the best found so
far), trains `--role local` with validation and early stopping once per seed (`--seeds`, two at a time), and
keeps the value with the best mean validation AUC of the selected epochs. The test split is never looked at
here. Prints every run, then the chosen settings.

    python scripts/sample_recipe.py jobs/sample.yaml --input ../shared/data/criteo-sample/train.txt \\
        --test ../shared/data/criteo-sample/dev.txt --test ../shared/data/criteo-sample/test.txt --seeds 7,8,9
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

VFL = [sys.executable, "-m", "vfl_cli.app"]

# (dotted setting, values to try), in the order the search visits them.
SPACE: list[tuple[str, list[Any]]] = [
    ("data.threshold", [10, 20, 40, 60, 100]),
    # the wide part is a logistic regression on the ids: regularise it as one
    ("train.wide_optimizer.l2", [0.1, 1.0, 3.0, 10.0]),
    ("train.l2_coef", [1.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]),
    ("model.emb_dim", [4, 8, 16]),
    ("model.deep_layers", [[32], [64, 32], [128, 64], [256, 128]]),
    ("train.deep_optimizer.lr", [3.0e-4, 1.0e-3, 3.0e-3]),
    ("train.wide_optimizer.lr", [2.0e-2, 5.0e-2, 1.0e-1]),
    ("train.batch_size", [128, 256, 512]),
    ("data.dense", ["max", "log"]),
    ("data.threshold", [5, 10, 20, 40, 60, 100, 150]),
    ("train.wide_optimizer.l2", [0.1, 1.0, 3.0, 10.0]),
    ("train.l2_coef", [1.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]),
    # round 3 (--from 12): past the edges round 2 stopped at
    ("train.l2_coef", [1.0e-2, 3.0e-2, 1.0e-1]),
    ("data.threshold", [2, 3, 5, 10]),
    ("model.emb_dim", [8, 16, 32]),
    ("train.batch_size", [64, 128]),
    ("train.deep_optimizer.lr", [1.0e-3, 3.0e-3]),
    # round 4 (--from 17): past the edges of the cross-validated search
    ("train.deep_optimizer.lr", [3.0e-3, 6.0e-3, 1.0e-2]),
    ("model.deep_layers", [[64, 32], [128, 64], [256, 128]]),
    ("model.emb_dim", [4, 8, 16]),
    ("data.threshold", [60, 100, 150, 200]),
    ("train.l2_coef", [3.0e-3, 1.0e-2, 3.0e-2]),
    ("train.wide_optimizer.lr", [5.0e-2, 1.0e-1, 2.0e-1]),
    ("train.batch_size", [128, 256, 512]),
]


def put(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = spec
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def fold_input(args: argparse.Namespace, workdir: Path, fold: int | None) -> Path:
    """The training file for one fold: the input itself, or (with --folds K) its lines rotated so that fold
    `fold` (the fold-th of K equal blocks) comes last, where a `valid_split: tail` carve finds it."""
    if fold is None:
        return args.input
    rotated = workdir / f"train-fold-{fold}.txt"
    if not rotated.exists():
        lines = args.input.read_text().splitlines(keepends=True)
        end = len(lines) * (fold + 1) // args.folds
        rotated.write_text("".join(lines[end:] + lines[:end]))
    return rotated


def prepare(spec: dict[str, Any], workdir: Path, args: argparse.Namespace, prepared: dict[str, Path],
            fold: int | None) -> Path:
    """The prepared data for the spec's prep settings and fold (prepared once each)."""
    prep_key = json.dumps([spec["data"].get("threshold"), spec["data"].get("dense", "max"), fold])
    if prep_key not in prepared:
        prepared[prep_key] = workdir / f"data-{len(prepared)}"
        spec = copy.deepcopy(spec)
        spec["data"]["dir"] = str(prepared[prep_key])
        job = workdir / f"prep-{fold}.yaml"
        job.write_text(yaml.safe_dump(spec))
        tests = [flag for path in args.test for flag in ("--test", str(path))]
        run([*VFL, "prep", "criteo", "--input", str(fold_input(args, workdir, fold)), *tests, "--job", str(job)])
    return prepared[prep_key]


def valid_auc(spec: dict[str, Any], workdir: Path, args: argparse.Namespace, prepared: dict[str, Path]) -> float:
    """Train locally once per seed (and per fold, with --folds); the mean of the selected epochs' validation
    AUCs."""
    folds: list[int | None] = list(range(args.folds)) if args.folds > 1 else [None]
    trials = [(seed, fold) for seed in args.seeds for fold in folds]
    data_dirs = {fold: prepare(spec, workdir, args, prepared, fold) for fold in folds}

    def one_trial(trial: tuple[int, int | None]) -> float:
        seed, fold = trial
        name = f"{seed}-{fold}"
        trained = copy.deepcopy(spec)
        trained["seed"] = seed
        trained["data"]["dir"] = str(data_dirs[fold])
        if fold is not None:
            trained["data"].update(valid_split="tail", valid_fraction=1 / args.folds)
        trained["train"]["run_dir"] = str(workdir / f"run-{name}")
        job = workdir / f"train-{name}.yaml"
        job.write_text(yaml.safe_dump(trained))
        run([*VFL, "train", "--role", args.role, "--job", str(job), "--restart"])
        kind = "leader" if args.role == "local" else args.role
        metrics = workdir / f"run-{name}" / kind / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        return max(float(r["valid_auc"]) for r in records if r.get("event") == "epoch")  # the selected epoch's

    with ThreadPoolExecutor(max_workers=2) as pool:
        aucs = list(pool.map(one_trial, trials))
    return sum(aucs) / len(aucs)


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "VFL_NO_PROGRESS": "1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[2:5])} failed: {done.stderr.strip()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--test", type=Path, action="append", default=[])
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[7],
                        help="comma-separated seeds; each setting's score is the mean over them")
    parser.add_argument("--folds", type=int, default=1,
                        help="K > 1: K-fold cross-validation (each fold of the input validates once, 1/K of the "
                             "rows); the score is the mean over folds and seeds")
    parser.add_argument("--role", choices=["local", "central", "leader-only"], default="local",
                        help="what to train (the baselines: to score them on the same folds)")
    parser.add_argument("--score-only", action="store_true", help="print the job's own score and stop")
    parser.add_argument("--from", dest="start", type=int, default=0, help="start at this entry of the space")
    args = parser.parse_args()
    best = yaml.safe_load(args.job.read_text())
    prepared: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="vfl-recipe-") as tmp:
        workdir = Path(tmp)
        best_auc = valid_auc(best, workdir, args, prepared)
        print(f"base: valid AUC {best_auc:.4f}", flush=True)
        if args.score_only:
            return
        for setting, values in SPACE[args.start :]:
            for value in values:
                candidate = copy.deepcopy(best)
                put(candidate, setting, value)
                if candidate == best:
                    continue
                auc = valid_auc(candidate, workdir, args, prepared)
                print(f"{setting} = {value}: valid AUC {auc:.4f}", flush=True)
                if auc > best_auc:
                    best, best_auc = candidate, auc
        print(f"\nchosen (valid AUC {best_auc:.4f}):")
        for setting in dict.fromkeys(setting for setting, _ in SPACE):
            node: Any = best
            for key in setting.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            print(f"  {setting}: {node}")


if __name__ == "__main__":
    main()
