"""The split-learning core in one process: split == joint, learning, checkpoints, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep.store import open_party
from tests.conftest import job_dict, write_planted_data
from vfl_cli.errors import CheckpointError, DataError, PeerAborted, ProtocolError
from vfl_cli.grid import LocalGrid
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.model.build import SplitModel
from vfl_cli.model.ftrl import Ftrl
from vfl_cli.party import PartyContext
from vfl_cli.protocol import BatchKey, Hello
from vfl_cli.reporter import SilentReporter
from vfl_cli.train.baseline import train_baseline
from vfl_cli.train.batches import iterate
from vfl_cli.train.parties import build_party
from vfl_cli.train.session import eval_session, open_run, run_local, train_session


def leader_losses(job: JobSpec) -> list[float]:
    lines = (job.train.run_dir / "leader" / "metrics.jsonl").read_text().splitlines()
    return [r["wide_loss"] for r in map(json.loads, lines) if r["event"] == "step"]


def joint_losses(job: JobSpec, steps: int) -> list[float]:
    """The same model as one module, trained on the same batches: the oracle split training must equal (any
    number of followers)."""
    device = torch.device("cpu")
    keys = job.keys
    data = {key: open_party(job.data.dir, key) for key in keys}
    parts = {key: build_party(job, key, data[key].meta, device) for key in keys}
    leader = parts[job.label_party]
    assert leader.top is not None and all(parts[key].bottom is not None for key in job.followers)
    model = SplitModel(leader.bottom, [parts[key].bottom for key in job.followers], leader.top)  # type: ignore[misc]
    # The plain form of the math: L2 in the loss, Adam's loop over tensors (not build_optimizers' fused Adam
    # with weight decay), so that split training is checked against the reference, not against itself.
    ftrl, adam = job.train.wide_optimizer, job.train.deep_optimizer
    optimizers = [Ftrl(model.wide_parameters(), lr=ftrl.lr, l1=ftrl.l1, l2=ftrl.l2,
                       initial_accumulator=ftrl.initial_accumulator),
                  torch.optim.Adam(model.deep_parameters(), lr=adam.lr, eps=adam.eps, foreach=False)]
    losses: list[float] = []
    for epoch in range(job.train.epochs):
        batches = [iterate(data[key].split("train"), job.train.batch_size, job.seed, epoch, True) for key in keys]
        for group in zip(*batches, strict=True):
            for optimizer in optimizers:
                optimizer.zero_grad()
            inputs = [t for batch in group for t in (batch.ids, batch.vals)]
            loss = F.binary_cross_entropy_with_logits(model(*inputs)[:, 0], group[0].labels)
            (loss + sum(b.l2_penalty(job.train.l2_coef) for b in model.bottoms())).backward()
            for optimizer in optimizers:
                optimizer.step()
            losses.append(loss.item())
    return losses[:steps]


def test_split_training_equals_joint_training(tmp_path: Path) -> None:
    # 960 train rows / batch 48 = 20 steps in one epoch; a large l2_coef makes the L2 path count.
    spec = job_dict(tmp_path, epochs=1, batch_size=48, l2_coef=1e-3)
    write_planted_data(Path(spec["data"]["dir"]), rows=1200)
    job = parse_job(spec)
    run_local(job, train_session)
    split = leader_losses(job)
    joint = joint_losses(job, len(split))
    assert len(split) == 20
    assert np.allclose(split, joint, atol=1e-6, rtol=0)
    assert split[-1] < split[0]  # it learns, so the comparison is not between two constant sequences


def test_local_training_learns_the_planted_signal(planted_job: JobSpec) -> None:
    results = run_local(planted_job, train_session)
    epochs = results["leader"].epochs
    assert [e for e, _, _ in epochs] == [0, 1]
    # Half the planted signal is in a follower field: split learning must beat the leader's columns alone
    # clearly (here 0.84 against 0.75), so a broken follower path fails this test.
    leader_only = train_baseline(planted_job, "leader-only", SilentReporter(), restart=True).epochs[-1][2]
    assert epochs[-1][2] is not None and leader_only is not None
    assert epochs[-1][2].score > leader_only.score + 0.05
    assert results["follower"].epochs[-1][2] is None  # the follower never sees labels or metrics
    assert results["leader"].run_id == results["follower"].run_id and not results["leader"].resumed
    for role in ("leader", "follower"):  # 15 steps per epoch: the two epoch ends are the newest two
        files = sorted(p.name for p in (planted_job.train.run_dir / role).glob("checkpoint-*.pt"))
        assert files == ["checkpoint-000000015.pt", "checkpoint-000000030.pt"]


def test_eval_of_checkpoint_reproduces_last_epoch_auc(planted_job: JobSpec) -> None:
    trained = run_local(planted_job, train_session)["leader"].epochs[-1][2]
    evaluated = run_local(planted_job, lambda run: eval_session(run, planted_job.train.run_dir, "test"))["leader"]
    assert evaluated.score == pytest.approx(trained.score, abs=1e-9)
    assert evaluated.rows == 240


def test_rerun_resumes_after_the_last_checkpoint(tmp_path: Path) -> None:
    spec = job_dict(tmp_path, epochs=1)
    write_planted_data(Path(spec["data"]["dir"]))
    first = run_local(parse_job(spec), train_session)["leader"]
    spec["train"]["epochs"] = 2
    # More epochs is another job (its fingerprint covers train settings): the checkpoint is refused.
    with pytest.raises(CheckpointError, match="another job"):
        run_local(parse_job(spec), train_session)
    spec["train"]["epochs"] = 1
    again = run_local(parse_job(spec), train_session)["leader"]
    assert again.epochs == [] and again.resumed and again.run_id == first.run_id  # all done: nothing to redo
    restarted = run_local(parse_job(spec), lambda run: train_session(run, restart=True))["leader"]
    assert len(restarted.epochs) == 1 and restarted.run_id != first.run_id and not restarted.resumed


def test_corrupt_checkpoint_is_refused(planted_job: JobSpec) -> None:
    run_local(planted_job, train_session)
    newest = planted_job.train.run_dir / "follower" / "checkpoint-000000030.pt"
    newest.write_bytes(b"not a checkpoint")
    # Both sides stop: the follower naming its file, the leader saying the follower has none it can use
    # (run_local reports whichever failed first).
    with pytest.raises(CheckpointError, match=f"{newest}: not a readable|the follower has no usable checkpoint"):
        run_local(planted_job, lambda run: eval_session(run, planted_job.train.run_dir, "test"))


def test_misaligned_data_stops_both_parties_at_handshake(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]), seed=0)
    other = tmp_path / "other"
    write_planted_data(other, seed=1)  # a different split: other sample ids
    (Path(spec["data"]["dir"]) / "follower").rename(tmp_path / "unused")
    (other / "follower").rename(Path(spec["data"]["dir"]) / "follower")
    with pytest.raises(ProtocolError, match="sample ids"):
        run_local(parse_job(spec), train_session)


def test_data_prepared_for_other_fields_is_refused(tmp_path: Path) -> None:
    spec = job_dict(tmp_path)
    write_planted_data(Path(spec["data"]["dir"]))
    spec["parties"]["leader"]["fields"] = spec["parties"]["leader"]["fields"][:-1]
    expected = (r"prepared for 20 columns, the job gives the leader 19 "
                r"\(column 20: prepared C13 \(categorical\), the job none\)")
    with pytest.raises(DataError, match=expected + "; run `vfl prep` again"):
        open_run(PartyContext.of(parse_job(spec), "leader"), LocalGrid.star("leader", ("follower",))["leader"])


def test_local_peer_abort_wakes_the_receiver() -> None:
    grids = LocalGrid.star("leader", ("follower",), timeout_s=5)
    grids["follower"].abort("disk full")
    with pytest.raises(PeerAborted, match="disk full"):
        grids["leader"].receive("follower", "embeddings", BatchKey("train", 0, 0))


def test_hello_mismatch_names_what_differs() -> None:
    mine = Hello("leader", "a", "f1", {"train": {"rows": 10, "sample_ids_digest": "x"}}, "train")
    theirs = Hello("follower", "b", "f1", {"train": {"rows": 11, "sample_ids_digest": "x"}}, "train")
    assert mine.mismatch(theirs) == "train rows: here 10, peer 11"
    assert mine.mismatch(Hello("follower", "b", "f2", mine.data_fingerprint, "train")).startswith("job fingerprint")
    assert mine.mismatch(Hello("follower", "b", "f1", mine.data_fingerprint, "train")) is None


def test_central_beats_leader_only_on_a_signal_split_across_parties(planted_job: JobSpec) -> None:
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.baseline import evaluate_baseline_checkpoint, train_baseline

    central = train_baseline(planted_job, "central", SilentReporter()).epochs[-1][2]
    leader_only = train_baseline(planted_job, "leader-only", SilentReporter()).epochs[-1][2]
    assert central is not None and leader_only is not None
    assert central.score > leader_only.score + 0.05
    reloaded = evaluate_baseline_checkpoint(planted_job, "central", planted_job.train.run_dir, "test")
    assert reloaded.score == pytest.approx(central.score, abs=1e-9)


def test_local_runs_with_the_parties_own_thread_count(tmp_path: Path) -> None:
    """Both parties in one process compute with the thread count each has in its own process (a different count
    reorders matmul sums: default_credit's predictions differed by 0.057 from two processes' with their sum)."""
    from vfl_cli.train.session import local_threads

    spec = job_dict(tmp_path)  # threads: 1 at each party
    assert local_threads(parse_job(spec)) == 1  # not 2
    for party in spec["parties"].values():
        del party["threads"]
    assert local_threads(parse_job(spec)) is None  # not set: torch's default, as each process has
    spec["parties"]["leader"]["threads"] = 4
    assert local_threads(parse_job(spec)) == 4
