"""Several workers per party (`parties.<key>.workers`): real processes, gloo inside each party, mutual TLS
between paired workers. Two workers per party train the model one worker trains (same test AUC to 1e-5, same
loss at every step to 1e-5); a worker killed with SIGKILL stops both parties, and rerunning resumes to the same
AUC, with two workers or with one."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import write_job, write_planted_data
from tests.test_resume import final_auc, last_logged_step, losses, records
from tests.test_two_party import VFL, environment, finish, tls_job
from vfl_cli.errors import JobError
from vfl_cli.job import parse_job
from vfl_cli.train.session import run_local, train_session
from vfl_cli.train.workers import shard_bounds

WORKERS = 2
LOSS_TOLERANCE = 1e-5  # float summation order: the workers' gradients are summed in another order (measured 1.2e-7)


def spaced_ports(count: int) -> list[int]:
    """`count` base ports, each with the next WORKERS - 1 ports free too (worker i listens on base + i)."""
    found: list[int] = []
    while len(found) < count:
        base = random.randrange(20000, 60000, 10)
        try:
            for port in range(base, base + WORKERS):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        found.append(base)
    return found


def with_workers(spec: dict[str, Any], workers: int) -> dict[str, Any]:
    return {**spec, "parties": {key: {**party, "workers": workers} for key, party in spec["parties"].items()}}


@pytest.fixture
def paired_job(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A two-party TLS job with two workers per party (2 epochs x 15 steps, a checkpoint every 4), its data and
    certificates."""
    spec = tls_job(tmp_path, checkpoint_every=4)
    spec["transport"]["timeout_s"] = 5
    for party, port in zip(spec["parties"].values(), spaced_ports(2), strict=True):
        party["listen"] = f"127.0.0.1:{port}"
    spec = with_workers(spec, WORKERS)
    write_planted_data(Path(spec["data"]["dir"]))
    job = write_job(tmp_path, spec)
    made = subprocess.run([*VFL, "certs", "--job", str(job)], capture_output=True, text=True, env=environment())
    assert made.returncode == 0, made.stderr
    return spec, job


@pytest.fixture
def paired(paired_job: tuple[dict[str, Any], Path],
           tmp_path: Path) -> tuple[dict[str, Any], Path, float, dict[int, float]]:
    """`paired_job`, and the test AUC and per-step losses of one worker per party (`--role local`, which equals
    two processes to 1e-6: test_two_party)."""
    spec, job = paired_job
    reference = parse_job(with_workers({**spec, "train": {**spec["train"], "run_dir": str(tmp_path / "reference")}}, 1))
    run_local(reference, train_session)
    return spec, job, final_auc(reference.train.run_dir), losses(reference.train.run_dir)


def start(role: str, job: Path, *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*(command or VFL), "train", "--job", str(job), "--role", role], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())


def train_both(job: Path, leader_command: tuple[str, ...] = ()) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    follower, leader = start("follower", job), start("leader", job, *leader_command)
    return finish(leader, 180), finish(follower, 180)


def assert_same_model(spec: dict[str, Any], auc: float, reference: dict[int, float]) -> None:
    run_dir = Path(spec["train"]["run_dir"])
    assert abs(final_auc(run_dir) - auc) <= 1e-5
    got = losses(run_dir)
    assert sorted(got) == sorted(reference)
    assert max(abs(got[step] - loss) for step, loss in reference.items()) <= LOSS_TOLERANCE


def test_two_workers_per_party_train_the_one_worker_model(
    paired: tuple[dict[str, Any], Path, float, dict[int, float]],
) -> None:
    """Four worker processes (two launched by each `vfl train`); the leader's under torchrun itself."""
    spec, job, auc, reference = paired
    torchrun = (*VFL[:1], "-m", "torch.distributed.run", "--nproc-per-node", str(WORKERS), "--master-port",
                str(spaced_ports(1)[0]), "--no-python", *VFL[:1], "-m", "vfl_cli")
    (leader_code, leader_out, leader_err), (follower_code, _, follower_err) = train_both(job, torchrun)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    assert "starting 2 workers" in follower_err  # the follower launched its own; torchrun launched the leader's
    assert_same_model(spec, auc, reference)
    assert leader_out.count("leader test: AUC") == 1  # the party's first worker alone reports
    assert len(list((Path(spec["train"]["run_dir"]) / "leader").glob("metrics.jsonl"))) == 1


def worker_pids(launcher: subprocess.Popen[str]) -> list[int]:
    """The worker processes `vfl train` started, by PID, in rank order (Linux: /proc)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = [int(p) for p in children.read_text().split()] if children.exists() else []
        if len(pids) == WORKERS:
            return sorted(pids)
        time.sleep(0.05)
    raise AssertionError(f"the launcher {launcher.pid} did not start {WORKERS} workers")


def kill_one_worker(spec: dict[str, Any], job: Path, victim: str, rank: int, step: int) -> int:
    """Start both parties, SIGKILL worker `rank` of `victim` once the leader has logged global step `step`; both
    parties must stop by themselves within the timeout. Returns the last step the leader logged."""
    if not Path("/proc/self/task").exists():
        pytest.skip("finding a launcher's workers needs /proc")
    run_dir = Path(spec["train"]["run_dir"])
    processes = {"follower": start("follower", job), "leader": start("leader", job)}
    target = worker_pids(processes[victim])[rank]
    deadline, reached = time.monotonic() + 120, 0
    while reached < step and time.monotonic() < deadline and processes["leader"].poll() is None:
        time.sleep(0.005)
        if (run_dir / "leader" / "metrics.jsonl").exists():
            reached = last_logged_step(run_dir)
    subprocess.run(["kill", "-9", str(target)], check=True)
    killed = time.monotonic()
    codes = {role: finish(p, 60) for role, p in processes.items()}
    assert all(code != 0 for code, _, _ in codes.values()), codes
    assert time.monotonic() - killed <= spec["transport"]["timeout_s"] + 20  # both stopped by themselves
    assert not any("Traceback" in err for _, _, err in codes.values()), codes
    return last_logged_step(run_dir)


@pytest.mark.parametrize("rerun_workers", [pytest.param(WORKERS, marks=pytest.mark.slow), 1])  # CI: W=2 -> W=1
def test_a_killed_worker_stops_both_parties_and_the_rerun_resumes(
    paired: tuple[dict[str, Any], Path, float, dict[int, float]], rerun_workers: int
) -> None:
    """kill -9 of one worker at a random step; rerunning the commands (with two workers per party, or with one:
    a checkpoint of two workers loads in one) ends with the uninterrupted run's model."""
    spec, job, auc, reference = paired
    chance = random.Random(f"workers-{rerun_workers}")
    victim, rank, step = chance.choice(["leader", "follower"]), chance.randrange(WORKERS), chance.randrange(3, 24)
    logged = kill_one_worker(spec, job, victim, rank, step)
    assert logged >= step
    rerun = with_workers(spec, rerun_workers)
    job.write_text(yaml.safe_dump(rerun))
    (leader_code, _, leader_err), (follower_code, _, follower_err) = train_both(job)
    assert (leader_code, follower_code) == (0, 0), leader_err + follower_err
    resume = [r for r in records(Path(spec["train"]["run_dir"])) if r["event"] == "resume"][-1]
    assert 0 < resume["step"] <= logged + 1
    assert_same_model(spec, auc, reference)


def test_parties_with_different_worker_counts_stop_at_the_handshake(
    paired_job: tuple[dict[str, Any], Path], tmp_path: Path,
) -> None:
    spec, job = paired_job
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(with_workers(spec, 1)))  # the same job (fingerprint) with one worker each
    follower, leader = start("follower", single), start("leader", job)
    (leader_code, _, leader_err), (follower_code, _, follower_err) = finish(leader, 90), finish(follower, 90)
    assert 5 in (leader_code, follower_code), leader_err + follower_err
    assert "workers" in leader_err + follower_err
    assert "Traceback" not in leader_err + follower_err


def test_shards_cover_every_row_once() -> None:
    assert shard_bounds(10, 2) == [0, 5, 10]
    assert shard_bounds(7, 3) == [0, 3, 5, 7]
    assert shard_bounds(1, 2) == [0, 1, 1]  # a worker may get no rows of a last batch: it idles


def test_workers_are_checked_at_load(tmp_path: Path) -> None:
    spec = tls_job(tmp_path)
    for party, port in zip(spec["parties"].values(), (30000, 30001), strict=True):
        party["listen"] = f"127.0.0.1:{port}"
    with pytest.raises(JobError, match="both listen on 127.0.0.1:30001"):
        parse_job(with_workers(spec, 2))
    uneven = with_workers(spec, 1)
    uneven["parties"]["leader"]["workers"] = 3
    with pytest.raises(JobError, match="the same number of workers"):
        parse_job(uneven)
    spec["parties"]["follower"]["listen"] = "127.0.0.1:30010"
    assert parse_job(with_workers(spec, 2)).fingerprint() == parse_job(spec).fingerprint()


def test_workers_on_other_machines_are_reached_at_their_addresses(tmp_path: Path) -> None:
    from vfl_cli.party import PartyContext

    spec = with_workers(tls_job(tmp_path), 2)
    spec["parties"]["leader"].update(listen="0.0.0.0:18701", worker_addresses=["10.0.0.1:18701", "10.0.0.2:18701"])
    spec["parties"]["follower"]["listen"] = "127.0.0.1:18801"
    job = parse_job(spec)
    leader1 = PartyContext.of(job, "leader").for_worker(1)
    assert (leader1.spec.listen, leader1.spec.connect_to) == ("0.0.0.0:18701", "10.0.0.2:18701")
    assert leader1.peers["follower"].connect_to == "127.0.0.1:18802"
    follower1 = PartyContext.of(job, "follower").for_worker(1)
    assert follower1.peers["leader"].connect_to == "10.0.0.2:18701"
    spec["parties"]["leader"]["worker_addresses"] = ["10.0.0.1:18701"]
    with pytest.raises(JobError, match="1 given for 2 workers"):
        parse_job(spec)
