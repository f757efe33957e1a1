"""How jobs/sample.yaml's recipe was chosen: a coordinate search on the validation AUC alone.

Starting from a base job, each round tries every value of one setting (keeping the others at the best found so
far), trains `--role local` with validation and early stopping, and keeps the value with the best validation
AUC of its selected epoch. The test split is never looked at here. Prints every run, then the chosen settings.

    python scripts/sample_recipe.py jobs/sample.yaml --input ../shared/data/criteo-sample/train.txt \\
        --test ../shared/data/criteo-sample/dev.txt --test ../shared/data/criteo-sample/test.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

VFL = [sys.executable, "-m", "vfl_cli.app"]

# (dotted setting, values to try), in the order the search visits them.
SPACE: list[tuple[str, list[Any]]] = [
    ("data.dense", ["max", "log"]),
    ("data.threshold", [5, 10, 20, 40]),
    ("model.emb_dim", [4, 8, 16]),
    ("model.deep_layers", [[32], [64, 32], [128, 64]]),
    ("train.l2_coef", [8.0e-5, 1.0e-3, 1.0e-2]),
    ("train.deep_optimizer.lr", [3.0e-4, 1.0e-3, 3.0e-3]),
    ("train.wide_optimizer.lr", [2.0e-2, 5.0e-2, 1.0e-1]),
    ("train.batch_size", [128, 256, 512]),
    # the wide part is a logistic regression on the ids: regularise it as one
    ("train.wide_optimizer.l2", [1.0e-8, 0.1, 1.0, 10.0]),
    ("train.wide_optimizer.l1", [1.0e-8, 0.1, 1.0]),
    ("data.threshold", [2, 5, 10, 20, 40, 60, 100]),
    ("model.emb_dim", [4, 8, 16]),
]


def put(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = spec
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def valid_auc(spec: dict[str, Any], workdir: Path, args: argparse.Namespace, prepared: dict[str, Path]) -> float:
    """Prep (once per prep setting), train locally, return the selected epoch's validation AUC."""
    prep_key = json.dumps([spec["data"].get("threshold"), spec["data"].get("dense", "max")])
    spec = copy.deepcopy(spec)
    if prep_key not in prepared:
        prepared[prep_key] = workdir / f"data-{len(prepared)}"
        spec["data"]["dir"] = str(prepared[prep_key])
        job = workdir / "prep.yaml"
        job.write_text(yaml.safe_dump(spec))
        tests = [flag for path in args.test for flag in ("--test", str(path))]
        run([*VFL, "prep", "criteo", "--input", str(args.input), *tests, "--job", str(job)])
    spec["data"]["dir"] = str(prepared[prep_key])
    spec["train"]["run_dir"] = str(workdir / "run")
    job = workdir / "train.yaml"
    job.write_text(yaml.safe_dump(spec))
    run([*VFL, "train", "--role", "local", "--job", str(job), "--restart"])
    records = [json.loads(line) for line in (workdir / "run" / "leader" / "metrics.jsonl").read_text().splitlines()]
    selected = [r for r in records if r.get("event") == "selected"]
    return float(selected[-1]["valid_auc"])


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "VFL_NO_PROGRESS": "1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[2:5])} failed: {done.stderr.strip()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--test", type=Path, action="append", default=[])
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
