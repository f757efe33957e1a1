"""The README's demo, end to end on loopback, as the organisations would run it, for any number of parties (the
job's `parties:`: the leader, named by `label_party`, and one or more followers): synthetic data cut into each
organisation's own table (80% of customers in every table, different rows, different orders), each table prepared
by its owner, dev certificates, a private set intersection over mutually authenticated HTTPS, one training
process per party, evaluation, then a file of new customers prepared with the trained vocabularies, intersected
again and scored; then `vfl report` plots the training run into one HTML page. Ends with a summary.

    python scripts/demo.py jobs/demo.yaml             # make demo: leader and follower
    python scripts/demo.py jobs/smoke.yaml --check    # make smoke-test: also asserts the outcome
    python scripts/demo.py jobs/smoke3.yaml --check   # make smoke-test-3: the same with two followers
    python scripts/demo.py jobs/smoke.yaml --check --workers 2   # make smoke-test-workers: two workers per party

Every per-party command runs once per party with `--party KEY`: the followers in the background (output to the
log directory), the leader in the foreground. --check asserts that every process exits 0, that each PSI finds
exactly the customers all tables hold, that the test AUC beats the leader-only baseline by 0.03 or more, that the
run as one process per party gives the same test AUC as `--role local` on the same job (to 1e-6; with --workers,
W worker processes per party against one process, to 1e-5), and that the
predictions for the new customers are one `id,probability` row per customer of the new intersection, with
probabilities in [0, 1], whose AUC against the new customers' labels (which only the simulation knows) beats 0.5
clearly too.
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
OVERLAP = "0.8"  # share of the source rows every organisation holds
FOLLOWER_TIMEOUT_S = 120  # how long a follower may take to finish once the leader has
AUC_LINE = re.compile(r"test: AUC (\d+\.\d+)")
TRAFFIC_LINE = re.compile(r"sent ([\d,.]+) MB, received ([\d,.]+) MB")
PSI_LINE = re.compile(r"^(\S+): ([\d,]+) customers in common, of ([\d,]+) here and (.*?); wrote", re.MULTILINE)
PSI_PEER = re.compile(r"([\d,]+) at the ([^\s,;]+)")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def number(n: int) -> str:
    return NUMBERS.get(n, str(n))


def listing(names: Sequence[str]) -> str:
    """'leader and follower', 'leader, follower1 and follower2'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def with_workers(job: Path, spec: dict[str, Any], workers: int) -> Path:
    """A copy of the job (under runs/) with `workers` per party, the parties' ports 100 apart (worker i listens on the
    port + i): not part of the fingerprint, so the data, certificates and PSI are the job's own."""
    base = int(next(iter(spec["parties"].values()))["listen"].rsplit(":", 1)[1])
    for i, party in enumerate(spec["parties"].values()):
        party.update(workers=workers, listen=f"127.0.0.1:{base + 100 * i}")
    derived = Path(spec["data"]["dir"]).parent / f"{job.stem}-workers{workers}.yaml"  # under runs/, not jobs/
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(yaml.safe_dump(spec, sort_keys=False))
    return derived


def party_keys(spec: dict[str, Any]) -> tuple[str, ...]:
    """The job's parties by key: the leader (`label_party`, default "leader") first, then the followers in order."""
    leader = str(spec.get("label_party", "leader"))
    if leader not in spec["parties"]:
        sys.exit(f"demo: the job has no label party {leader!r} under parties:")
    return (leader, *(key for key in spec["parties"] if key != leader))


def set_key_passwords(spec: dict[str, Any]) -> None:
    """Dev key passwords: generated per demo, passed by environment only, one per party that names its variable."""
    for party in spec["parties"].values():
        if party.get("key_password_env"):
            os.environ.setdefault(str(party["key_password_env"]), secrets.token_urlsafe(16))


def vfl(*args: str) -> str:
    """Run one vfl command in the foreground; its progress shows, its stdout is returned."""
    done = subprocess.run([*VFL, *args], stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        sys.exit(f"demo: `vfl {' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout


def every_party(*args: str, keys: Sequence[str], log_dir: Path,
                party_args: Mapping[str, Sequence[str]] | None = None) -> str:
    """Run the same vfl command once per party: the followers (keys[1:]) in the background, each with its output
    in log_dir/<key>-<verb>.log, the leader (keys[0]) in the foreground; all must exit 0. Each gets
    `--party <key>` and its own party_args[key] appended (e.g. the leader's --out). Returns the leader's stdout."""
    party_args = party_args or {}
    log_dir.mkdir(parents=True, exist_ok=True)
    verb = args[0]
    leader, followers = keys[0], keys[1:]
    logs = {key: log_dir / f"{key}-{verb}.log" for key in followers}

    def command(key: str) -> list[str]:
        return [*VFL, *args, "--party", key, *party_args.get(key, ())]

    codes: dict[str, int | None] = {}
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for key in followers:
            with logs[key].open("w") as log:
                running[key] = subprocess.Popen(command(key), stdout=log, stderr=subprocess.STDOUT)
        done = subprocess.run(command(leader), stdout=subprocess.PIPE, text=True)
        codes[leader] = done.returncode
        deadline = time.monotonic() + FOLLOWER_TIMEOUT_S
        for key, process in running.items():
            codes[key] = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    print(done.stdout, end="", flush=True)
    if any(code != 0 for code in codes.values()):
        exits = ", ".join(f"{key} {codes.get(key)}" for key in keys)
        sys.exit(f"demo: `vfl {verb}`: exit codes {exits}; follower logs: {', '.join(map(str, logs.values()))}")
    return done.stdout


def auc_of(output: str) -> float:
    match = AUC_LINE.search(output)
    if not match:
        sys.exit("demo: no test AUC in the leader's output")
    return float(match.group(1))


@dataclass(frozen=True)
class Intersection:
    """What `vfl psi` told the leader: customers in common, and each party's number of customers (leader first)."""

    common: int
    sizes: dict[str, int]

    @classmethod
    def of(cls, leader_output: str) -> Intersection:
        match = PSI_LINE.search(leader_output)
        if not match:
            sys.exit("demo: no 'customers in common' line in the leader's PSI output")
        me, common, mine, peers = match.groups()
        sizes = {me: count(mine), **{key: count(size) for size, key in PSI_PEER.findall(peers)}}
        return cls(count(common), sizes)

    def describe(self) -> str:
        """'16,021 (leader 18,013, follower 17,996)'."""
        return f"{self.common:,} (" + ", ".join(f"{key} {size:,}" for key, size in self.sizes.items()) + ")"

    def check(self, expected: set[str], keys: Sequence[str]) -> None:
        """--check: the PSI heard from every party and found exactly the customers all tables hold (the demo can
        read every table)."""
        assert set(self.sizes) == set(keys), f"PSI reported {', '.join(self.sizes)}, the job has {', '.join(keys)}"
        assert self.common == len(expected), \
            f"PSI found {self.common:,} customers in common, the tables share {len(expected):,}"


def count(figure: str) -> int:
    return int(figure.replace(",", ""))


def cut_lines(source: Path, parts: Sequence[tuple[Path, int]]) -> None:
    """Write the source's lines in order into each part, a given number of lines each (streams)."""
    with source.open() as lines:
        for path, lines_wanted in parts:
            with path.open("w") as out:
                out.writelines(itertools.islice(lines, lines_wanted))


def table_ids(table: Path, column: str) -> list[str]:
    """The customer ids of one organisation's TSV (as `vfl prep split` writes it), in file order."""
    with table.open(newline="") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t")]


def common_ids(tables: Path, spec: dict[str, Any]) -> set[str]:
    """The plain set intersection of every party's table ids: what the PSI must find (the demo sees every file)."""
    ids = [set(table_ids(tables / f"{key}.tsv", id_column(spec, key))) for key in party_keys(spec)]
    return set.intersection(*ids)


def id_column(spec: dict[str, Any], key: str) -> str:
    return str(spec["parties"][key].get("id_column", "id"))


def new_customers_auc(predictions: Path, leader_table: Path, spec: dict[str, Any]) -> float:
    """AUC of the predictions against the new customers' labels: the simulation knows them, a real scorer not."""
    from vfl_cli.metrics import roc_auc  # imports torch: only here

    leader = party_keys(spec)[0]
    label_column = str(spec["parties"][leader].get("label_column", "label"))
    with leader_table.open(newline="") as f:
        labels = {row[id_column(spec, leader)]: int(row[label_column]) for row in csv.DictReader(f, delimiter="\t")}
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
    parser.add_argument("--workers", type=int, default=1, help="worker processes per party in training")
    args = parser.parse_args()
    spec = yaml.safe_load(args.job.read_text())
    job = str(args.job if args.workers == 1 else with_workers(args.job, spec, args.workers))
    keys = party_keys(spec)
    leader, n = keys[0], len(keys)
    data_dir = Path(spec["data"]["dir"])
    base = data_dir.parent
    logs = base / "logs"
    rows = args.rows or (20_000 if args.check else 200_000)
    new_rows = args.new_rows or rows // 10
    set_key_passwords(spec)
    started = time.perf_counter()

    # --- the organisations, each with its own table -----------------------------------------------------
    step(f"synthetic Criteo-format data: {rows:,} customers to train on, {new_rows:,} new ones to score later")
    # One draw cut in two: `prep synth` spells the categorical values and plants the signal per seed, so new
    # customers drawn with another seed would come from another world (every categorical value unseen).
    synthetic, raw, new_raw = base / "synthetic.txt", base / "raw.txt", base / "new-raw.txt"
    vfl("prep", "synth", "--rows", str(rows + new_rows), "--out", str(synthetic), "--seed", "1")
    cut_lines(synthetic, [(raw, rows), (new_raw, new_rows)])
    synthetic.unlink()
    step(f"{number(n)} organisations' tables: {OVERLAP} of the customers in all, each table in its own order")
    organisations = base / "organisations"
    vfl("prep", "split", "--input", str(raw), "--job", job, "--overlap", OVERLAP, "--out", str(organisations))
    for key in keys:
        step(f"the {key} prepares its own table (its columns, its vocabulary)")
        vfl("prep", "table", "--party", key, "--input", str(organisations / f"{key}.tsv"), "--job", job)
    step("dev certificates (a CA and one certificate per party)")
    vfl("certs", "--job", job)
    step(f"private set intersection of the customer ids, {listing(keys)} over HTTPS")
    trained_on = Intersection.of(every_party("psi", "--job", job, keys=keys, log_dir=logs))
    if args.check:
        trained_on.check(common_ids(organisations, spec), keys)

    # --- training and evaluation on the aligned rows ----------------------------------------------------
    if args.check:
        step(f"reference: {'both' if n == 2 else f'all {number(n)}'} parties in one process (--role local)")
        local_auc = auc_of(vfl("train", "--role", "local", "--job", job, "--restart"))
        step("reference: the leader's columns alone (--role leader-only)")
        leader_only_auc = auc_of(vfl("train", "--role", "leader-only", "--job", job, "--restart"))
    step(f"train: {listing(keys)} as {number(n)} processes over HTTPS on 127.0.0.1")
    leader_out = every_party("train", "--job", job, "--restart", keys=keys, log_dir=logs)
    train_auc = auc_of(leader_out)
    step("evaluate the checkpoint together")
    every_party("eval", "--job", job, keys=keys, log_dir=logs)

    # --- new customers: prepared with the trained vocabularies, intersected, scored ---------------------
    new = base / "new"
    step(f"new customers: {new_rows:,} synthetic rows, cut into the {number(n)} organisations' tables")
    vfl("prep", "split", "--input", str(new_raw), "--job", job, "--overlap", OVERLAP, "--seed", "2", "--out", str(new))
    for key in keys:
        step(f"the {key} encodes its new table with its trained vocabulary (unseen values -> OOV)")
        vfl("prep", "table", "--party", key, "--input", str(new / f"{key}.tsv"), "--job", job,
            "--vocab-from", str(data_dir / key), "--out", str(new / "tables" / key))
    step("private set intersection of the new customers")
    aligned = new / "aligned"
    scored = Intersection.of(every_party(
        "psi", "--job", job, "--out", str(aligned), keys=keys, log_dir=new / "logs",
        party_args={key: ["--table", str(new / "tables" / key)] for key in keys}))
    if args.check:
        scored.check(common_ids(new, spec), keys)
    step("infer: the leader writes id,probability for the customers in common")
    predictions = new / "predictions.csv"
    every_party("infer", "--job", job, "--data", str(aligned), "--split", "all", keys=keys, log_dir=new / "logs",
                party_args={leader: ["--out", str(predictions)]})

    # --- report: plots and a one-page summary of the training run ---------------------------------------
    run_dir = Path(spec["train"]["run_dir"])
    step("report: loss, AUC and speed plots and a one-page HTML summary of the training run")
    report_page = vfl("report", "--run", str(run_dir), "--job", job).strip()

    # --- summary ----------------------------------------------------------------------------------------
    metrics = [json.loads(line) for line in (run_dir / leader / "metrics.jsonl").open()]
    speeds = [m["train_samples_per_s"] for m in metrics if m["event"] == "epoch"]
    traffic = TRAFFIC_LINE.search(leader_out)
    scored_rows = len(predictions.read_text().splitlines()) - 1
    scored_auc = new_customers_auc(predictions, new / f"{leader}.tsv", spec)
    step("summary")
    print(f"customers in common (training):    {trained_on.describe()}")
    print(f"test AUC ({number(n)} parties over HTTPS): {train_auc:.6f}")
    print(f"training speed, last epoch:        {speeds[-1]:,.0f} samples/s")
    if traffic:
        sent, received = traffic.group(1), traffic.group(2)
        print(f"{leader} received {received} MB of follower embeddings, sent {sent} MB of gradients")
    print(f"new customers in common:           {scored.describe()}")
    print(f"scored {scored_rows:,} new customers -> {predictions}")
    print(f"AUC on the new customers:          {scored_auc:.6f} (against labels only the simulation knows)")
    print(f"training report:                   {report_page}")
    print(f"total time:                        {time.perf_counter() - started:,.0f} s")
    if args.check:
        print(f"local (one process) test AUC:      {local_auc:.6f}")
        print(f"leader-only test AUC:              {leader_only_auc:.6f}")
        # Half the planted signal is in the followers' columns: without them the leader does clearly worse
        # (smoke job: 0.741 against 0.658), so a broken follower path fails the smoke test.
        assert train_auc >= leader_only_auc + 0.03, f"AUC {train_auc}: no clear gain over leader-only {leader_only_auc}"
        tolerance = 1e-6 if args.workers == 1 else 1e-5  # W workers sum their gradients in another order
        assert abs(train_auc - local_auc) <= tolerance, f"{n}-process AUC {train_auc} != local AUC {local_auc}"
        check_predictions(predictions, common_ids(new, spec))
        assert scored_auc > 0.6, f"AUC {scored_auc} on the new customers: the model does not carry over"
        assert Path(report_page).is_file(), f"vfl report printed {report_page!r}, not a file"
        print("smoke test passed")


if __name__ == "__main__":
    main()
