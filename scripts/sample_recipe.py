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
]


def put(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = spec
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def prepare(spec: dict[str, Any], workdir: Path, args: argparse.Namespace, prepared: dict[str, Path]) -> Path:
    """The prepared data for the spec's prep settings (prepared once per distinct setting)."""
    prep_key = json.dumps([spec["data"].get("threshold"), spec["data"].get("dense", "max")])
    if prep_key not in prepared:
        prepared[prep_key] = workdir / f"data-{len(prepared)}"
        spec = copy.deepcopy(spec)
        spec["data"]["dir"] = str(prepared[prep_key])
        job = workdir / "prep.yaml"
        job.write_text(yaml.safe_dump(spec))
        tests = [flag for path in args.test for flag in ("--test", str(path))]
        run([*VFL, "prep", "criteo", "--input", str(args.input), *tests, "--job", str(job)])
    return prepared[prep_key]


def valid_auc(spec: dict[str, Any], workdir: Path, args: argparse.Namespace, prepared: dict[str, Path]) -> float:
    """Train locally once per seed; the mean of the selected epochs' validation AUCs."""
    data_dir = prepare(spec, workdir, args, prepared)

    def one_seed(seed: int) -> float:
        seeded = copy.deepcopy(spec)
        seeded["seed"] = seed
        seeded["data"]["dir"] = str(data_dir)
        seeded["train"]["run_dir"] = str(workdir / f"run-{seed}")
        job = workdir / f"train-{seed}.yaml"
        job.write_text(yaml.safe_dump(seeded))
        run([*VFL, "train", "--role", "local", "--job", str(job), "--restart"])
        metrics = workdir / f"run-{seed}" / "leader" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        return float([r for r in records if r.get("event") == "selected"][-1]["valid_auc"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        aucs = list(pool.map(one_seed, args.seeds))
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
    parser.add_argument("--from", dest="start", type=int, default=0, help="start at this entry of the space")
    args = parser.parse_args()
    best = yaml.safe_load(args.job.read_text())
    prepared: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="vfl-recipe-") as tmp:
        workdir = Path(tmp)
        best_auc = valid_auc(best, workdir, args, prepared)
        print(f"base: valid AUC {best_auc:.4f}", flush=True)
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
        for setting, _ in SPACE:
            node: Any = best
            for key in setting.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            print(f"  {setting}: {node}")


if __name__ == "__main__":
    main()
