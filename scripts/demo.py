"""The README's demo, end to end on loopback, as two organisations would run it: synthetic data cut into the
leader's and the follower's own tables (80% of customers in common, different rows, different orders), each
table prepared by its owner, dev certificates, a private set intersection over mutually authenticated HTTPS,
leader and follower training as two processes, evaluation, then a file of new customers prepared with the
trained vocabularies, intersected again and scored; then `vfl report` plots the training run into one HTML
page. Ends with a summary.

    python scripts/demo.py jobs/demo.yaml            # make demo
    python scripts/demo.py jobs/smoke.yaml --check   # make smoke-test: also asserts the outcome

--check asserts that every process exits 0, that each PSI finds exactly the customers both tables hold, that
the test AUC beats the leader-only baseline by 0.03 or more, that the two-process run gives the same test AUC
as `--role local` on the same job (to 1e-6), and that the predictions for the new customers are one
`id,probability` row per customer of the new intersection, with probabilities in [0, 1], whose AUC against the
new customers' labels (which only the simulation knows) beats 0.5 clearly too.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

VFL = [sys.executable, "-m", "vfl_cli.app"]
ROLES = ("leader", "follower")
OVERLAP = "0.8"  # share of the source rows both organisations hold
AUC_LINE = re.compile(r"test: AUC (\d+\.\d+)")
TRAFFIC_LINE = re.compile(r"sent ([\d,.]+) MB, received ([\d,.]+) MB")
PSI_LINE = re.compile(r"([\d,]+) customers in common, of ([\d,]+) here and ([\d,]+) at the")


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def vfl(*args: str) -> str:
    """Run one vfl command in the foreground; its progress shows, its stdout is returned."""
    done = subprocess.run([*VFL, *args], stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        sys.exit(f"demo: `vfl {' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout


def two_parties(*args: str, log_dir: Path, role_args: Mapping[str, Sequence[str]] | None = None) -> tuple[str, str]:
    """Run the same vfl command as follower (background, output to log_dir) and leader; both must exit 0.
    Each gets `--role <role>` and its own role_args[role] appended (e.g. the leader's --out)."""
    role_args = role_args or {}
    log_dir.mkdir(parents=True, exist_ok=True)
    verb = args[0]
    follower_path = log_dir / f"follower-{verb}.log"

    def command(role: str) -> list[str]:
        return [*VFL, *args, "--role", role, *role_args.get(role, ())]

    with follower_path.open("w") as follower_log:
        follower = subprocess.Popen(command("follower"), stdout=follower_log, stderr=subprocess.STDOUT)
        try:
            leader = subprocess.run(command("leader"), stdout=subprocess.PIPE, text=True)
            follower_code = follower.wait(timeout=120)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    print(leader.stdout, end="", flush=True)
    if leader.returncode != 0 or follower_code != 0:
        sys.exit(f"demo: `vfl {verb}`: leader exited {leader.returncode}, follower {follower_code}; "
                 f"follower log: {follower_path}")
    return leader.stdout, follower_path.read_text()


def auc_of(output: str) -> float:
    match = AUC_LINE.search(output)
    if not match:
        sys.exit("demo: no test AUC in the leader's output")
    return float(match.group(1))


@dataclass(frozen=True)
class Intersection:
    """What `vfl psi` told the leader: customers in common, and each side's number of customers."""

    common: int
    leader: int
    follower: int

    @classmethod
    def of(cls, leader_output: str) -> Intersection:
        match = PSI_LINE.search(leader_output)
        if not match:
            sys.exit("demo: no 'customers in common' line in the leader's PSI output")
        common, mine, peers = (int(group.replace(",", "")) for group in match.groups())
        return cls(common, mine, peers)

    def check(self, expected: set[str]) -> None:
        """--check: the PSI found exactly the customers both tables hold (the demo can read both)."""
        assert self.common == len(expected), \
            f"PSI found {self.common:,} customers in common, the tables share {len(expected):,}"


def cut_lines(source: Path, parts: Sequence[tuple[Path, int]]) -> None:
    """Write the source's lines in order into each part, a given number of lines each (streams)."""
    with source.open() as lines:
        for path, count in parts:
            with path.open("w") as out:
                out.writelines(itertools.islice(lines, count))


def table_ids(table: Path, column: str) -> list[str]:
    """The customer ids of one organisation's TSV (as `vfl prep split` writes it), in file order."""
    with table.open(newline="") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t")]


def common_ids(tables: Path, spec: dict[str, Any]) -> set[str]:
    """The plain set intersection of the two tables' ids: what the PSI must find (the demo sees both files)."""
    leader, follower = (set(table_ids(tables / f"{role}.tsv", id_column(spec, role))) for role in ROLES)
    return leader & follower


def id_column(spec: dict[str, Any], role: str) -> str:
    return str(spec["parties"][role].get("id_column", "id"))


def new_customers_auc(predictions: Path, leader_table: Path, spec: dict[str, Any]) -> float:
    """AUC of the predictions against the new customers' labels: the simulation knows them, a real scorer not."""
    from vfl_cli.metrics import roc_auc  # imports torch: only here

    label_column = str(spec["parties"]["leader"].get("label_column", "label"))
    with leader_table.open(newline="") as f:
        labels = {row[id_column(spec, "leader")]: int(row[label_column]) for row in csv.DictReader(f, delimiter="\t")}
    with predictions.open(newline="") as f:
        scored = [(labels[row["id"]], float(row["probability"])) for row in csv.DictReader(f)]
    return roc_auc([label for label, _ in scored], [probability for _, probability in scored])


def check_predictions(predictions: Path, expected: set[str]) -> None:
    """One `id,probability` row per customer of the new intersection, each id once, probabilities in [0, 1]."""
    with predictions.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    assert header == ["id", "probability"], f"{predictions}: header {header}, expected id,probability"
    ids = [row[0] for row in rows]
    assert len(ids) == len(set(ids)), f"{predictions}: {len(ids) - len(set(ids))} repeated ids"
    assert set(ids) == expected, (f"{predictions}: {len(set(ids) - expected)} ids outside the intersection, "
                                  f"{len(expected - set(ids))} of its customers missing")
    probabilities = [float(row[1]) for row in rows]
    assert all(0.0 <= p <= 1.0 for p in probabilities), f"{predictions}: a probability outside [0, 1]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default: 20,000 smoke, 200,000 else)")
    parser.add_argument("--new-rows", type=int, default=None, help="synthetic new customers (default: rows / 10)")
    parser.add_argument("--check", action="store_true", help="assert the outcome (make smoke-test)")
    args = parser.parse_args()
    spec = yaml.safe_load(args.job.read_text())
    job = str(args.job)
    data_dir = Path(spec["data"]["dir"])
    base = data_dir.parent
    logs = base / "logs"
    rows = args.rows or (20_000 if args.check else 200_000)
    new_rows = args.new_rows or rows // 10
    for role in ("LEADER", "FOLLOWER"):  # dev key passwords: generated per demo, passed by environment only
        os.environ.setdefault(f"VFL_{role}_KEY_PASSWORD", secrets.token_urlsafe(16))
    started = time.perf_counter()

    # --- two organisations, each with its own table -----------------------------------------------------
    step(f"synthetic Criteo-format data: {rows:,} customers to train on, {new_rows:,} new ones to score later")
    # One draw cut in two: `prep synth` spells the categorical values and plants the signal per seed, so new
    # customers drawn with another seed would come from another world (every categorical value unseen).
    synthetic, raw, new_raw = base / "synthetic.txt", base / "raw.txt", base / "new-raw.txt"
    vfl("prep", "synth", "--rows", str(rows + new_rows), "--out", str(synthetic), "--seed", "1")
    cut_lines(synthetic, [(raw, rows), (new_raw, new_rows)])
    synthetic.unlink()
    step(f"two organisations' tables: {OVERLAP} of the customers in both, each table in its own order")
    organisations = base / "organisations"
    vfl("prep", "split", "--input", str(raw), "--job", job, "--overlap", OVERLAP, "--out", str(organisations))
    for role in ROLES:
        step(f"the {role} prepares its own table (its columns, its vocabulary)")
        vfl("prep", "table", "--role", role, "--input", str(organisations / f"{role}.tsv"), "--job", job)
    step("dev certificates (a CA and one certificate per party)")
    vfl("certs", "--job", job)
    step("private set intersection of the customer ids, leader and follower over HTTPS")
    trained_on = Intersection.of(two_parties("psi", "--job", job, log_dir=logs)[0])
    if args.check:
        trained_on.check(common_ids(organisations, spec))

    # --- training and evaluation on the aligned rows ----------------------------------------------------
    if args.check:
        step("reference: both parties in one process (--role local)")
        local_auc = auc_of(vfl("train", "--role", "local", "--job", job, "--restart"))
        step("reference: the leader's columns alone (--role leader-only)")
        leader_only_auc = auc_of(vfl("train", "--role", "leader-only", "--job", job, "--restart"))
    step("train: leader and follower as two processes over HTTPS on 127.0.0.1")
    leader_out, _ = two_parties("train", "--job", job, "--restart", log_dir=logs)
    train_auc = auc_of(leader_out)
    step("evaluate the checkpoint together")
    two_parties("eval", "--job", job, log_dir=logs)

    # --- new customers: prepared with the trained vocabularies, intersected, scored ---------------------
    new = base / "new"
    step(f"new customers: {new_rows:,} synthetic rows, cut into the two organisations' tables")
    vfl("prep", "split", "--input", str(new_raw), "--job", job, "--overlap", OVERLAP, "--seed", "2", "--out", str(new))
    for role in ROLES:
        step(f"the {role} encodes its new table with its trained vocabulary (unseen values -> OOV)")
        vfl("prep", "table", "--role", role, "--input", str(new / f"{role}.tsv"), "--job", job,
            "--vocab-from", str(data_dir / role), "--out", str(new / "tables" / role))
    step("private set intersection of the new customers")
    aligned = new / "aligned"
    scored = Intersection.of(two_parties(
        "psi", "--job", job, "--out", str(aligned), log_dir=new / "logs",
        role_args={role: ["--table", str(new / "tables" / role)] for role in ROLES})[0])
    if args.check:
        scored.check(common_ids(new, spec))
    step("infer: the leader writes id,probability for the customers in common")
    predictions = new / "predictions.csv"
    two_parties("infer", "--job", job, "--data", str(aligned), "--split", "all", log_dir=new / "logs",
                role_args={"leader": ["--out", str(predictions)]})

    # --- report: plots and a one-page summary of the training run ---------------------------------------
    run_dir = Path(spec["train"]["run_dir"])
    step("report: loss, AUC and speed plots and a one-page HTML summary of the training run")
    report_page = vfl("report", "--run", str(run_dir), "--job", job).strip()

    # --- summary ----------------------------------------------------------------------------------------
    metrics = [json.loads(line) for line in (run_dir / "leader" / "metrics.jsonl").open()]
    speeds = [m["train_samples_per_s"] for m in metrics if m["event"] == "epoch"]
    traffic = TRAFFIC_LINE.search(leader_out)
    scored_rows = len(predictions.read_text().splitlines()) - 1
    scored_auc = new_customers_auc(predictions, new / "leader.tsv", spec)
    step("summary")
    print(f"customers in common (training):    {trained_on.common:,} "
          f"(leader {trained_on.leader:,}, follower {trained_on.follower:,})")
    print(f"test AUC (two parties over HTTPS): {train_auc:.6f}")
    print(f"training speed, last epoch:        {speeds[-1]:,.0f} samples/s")
    if traffic:
        print(f"leader received {traffic.group(2)} MB of follower embeddings, sent {traffic.group(1)} MB of gradients")
    print(f"new customers in common:           {scored.common:,} "
          f"(leader {scored.leader:,}, follower {scored.follower:,})")
    print(f"scored {scored_rows:,} new customers -> {predictions}")
    print(f"AUC on the new customers:          {scored_auc:.6f} (against labels only the simulation knows)")
    print(f"training report:                   {report_page}")
    print(f"total time:                        {time.perf_counter() - started:,.0f} s")
    if args.check:
        print(f"local (one process) test AUC:      {local_auc:.6f}")
        print(f"leader-only test AUC:              {leader_only_auc:.6f}")
        # Half the planted signal is in the follower's columns: without them the leader does clearly worse
        # (smoke job: 0.741 against 0.658), so a broken follower path fails the smoke test.
        assert train_auc >= leader_only_auc + 0.03, f"AUC {train_auc}: no clear gain over leader-only {leader_only_auc}"
        assert abs(train_auc - local_auc) <= 1e-6, f"two-process AUC {train_auc} != local AUC {local_auc}"
        check_predictions(predictions, common_ids(new, spec))
        assert scored_auc > 0.6, f"AUC {scored_auc} on the new customers: the model does not carry over"
        assert Path(report_page).is_file(), f"vfl report printed {report_page!r}, not a file"
        print("smoke test passed")


if __name__ == "__main__":
    main()
