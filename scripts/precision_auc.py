"""Test AUC in fp32 and bf16 on the same job, same data, same seed: what `train.precision: bf16` costs.

For each job given, trains `--role local` twice (the job as it is, then with `train.precision: bf16`), each into
its own run directory beside the job's, and prints both AUCs per epoch and the two final test AUCs.
Exits 1 if any final difference exceeds --tolerance (default 0.002). The jobs' data must be prepared.

    python scripts/precision_auc.py jobs/demo.yaml jobs/sample.yaml      # make precision-auc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vfl_cli.errors import VflError
from vfl_cli.job import JobSpec, load_job
from vfl_cli.train.session import run_local, set_threads, train_session


def train_auc(job: JobSpec, precision: str) -> tuple[list[float], float]:
    """Per-epoch AUCs (validation with model selection, else test) and the final test AUC."""
    run_dir = Path(f"{job.train.run_dir}-{precision}")
    job = job.model_copy(update={"train": job.train.model_copy(update={"precision": precision, "run_dir": run_dir})})
    outcome = run_local(job, lambda run: train_session(run, restart=True))["leader"]
    per_epoch = [result.score for _, _, result in outcome.epochs if result is not None]
    return per_epoch, outcome.final_test.score if outcome.final_test is not None else per_epoch[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.002)
    args = parser.parse_args()
    worst = 0.0
    for path in args.jobs:
        try:
            job = load_job(path)
            set_threads(sum(p.threads or 0 for p in job.parties.values()) or None)
            (fp32, fp32_test), (bf16, bf16_test) = train_auc(job, "fp32"), train_auc(job, "bf16")
            scored = "valid" if job.data.valid_fraction > 0 else "test"
        except VflError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"{path} ({torch.get_num_threads()} threads)")
        for epoch, (a, b) in enumerate(zip(fp32, bf16, strict=True)):
            print(f"  epoch {epoch} {scored}: fp32 {a:.6f}  bf16 {b:.6f}  diff {b - a:+.6f}")
        worst = max(worst, abs(bf16_test - fp32_test))
        print(f"  test: fp32 {fp32_test:.6f}  bf16 {bf16_test:.6f}  |bf16 - fp32| = {abs(bf16_test - fp32_test):.6f} "
              f"(tolerance {args.tolerance})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
