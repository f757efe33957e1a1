"""The checkpoint store (atomic files, the newest two, one line per bad file) and the agreement between the
parties (`agree`, `same_checkpoint`): pure functions of the two Hellos, table-driven."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl_cli.checkpoint import (
    RUN_FILE,
    TEMP_PREFIX,
    Agreement,
    CheckpointStore,
    agree,
    file_name,
    same_checkpoint,
)
from vfl_cli.errors import CheckpointError, ProtocolError
from vfl_cli.protocol import Hello
from vfl_cli.train.batches import Position, batch_rows, checkpoint_due

JOB = "job-fingerprint"
RUN, OTHER = "aaaa1111bbbb2222", "cccc3333dddd4444"


def state(value: float) -> dict:
    return {"bottom": {"w": torch.full((2, 2), value)}, "optimizers": [{"state": {}, "param_groups": []}]}


def store_at(tmp_path: Path, steps: list[int], run_id: str = RUN) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "leader", JOB)
    store.begin(run_id, 0, ())
    for step in steps:
        store.save(run_id, step, *divmod(step, 10), state(step))
    return store


def names(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir())


# ------------------------------------------------------------------------------------------- the store


def test_save_keeps_the_newest_two_and_the_run_file(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8, 10, 12])
    assert names(store) == [file_name(10), file_name(12), RUN_FILE]
    assert json.loads((store.directory / RUN_FILE).read_text()) == {"run_id": RUN}
    assert store.steps(RUN) == (10, 12)
    payload = store.load(RUN, 12)
    assert (payload["step"], payload["epoch"], payload["epoch_step"], payload["run_id"]) == (12, 1, 2, RUN)
    assert torch.equal(payload["state"]["bottom"]["w"], torch.full((2, 2), 12.0))


def test_a_crash_mid_write_leaves_the_old_files_and_no_temp(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    unpicklable = {"bottom": {"w": lambda: None}}  # torch.save fails halfway through the temp file
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises, the point is what stays on disk
        store.save(RUN, 12, 1, 2, unpicklable)
    assert names(store) == [file_name(4), file_name(8), RUN_FILE]
    assert store.steps(RUN) == (4, 8)


def test_a_stray_temp_file_is_ignored_then_cleaned(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    stray = store.directory / f"{TEMP_PREFIX}abc123"
    stray.write_bytes(b"half a checkpoint")  # what a kill -9 during torch.save leaves
    assert store.steps(RUN) == (4, 8)
    assert store.newest()["step"] == 8
    store.begin(RUN, 8, (4, 8))
    assert not stray.exists() and store.steps(RUN) == (4, 8)


def test_begin_rolls_back_to_the_agreed_step(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    store.begin(RUN, 4, (4, 8))  # the peer holds 4 only: 8 is another future, it goes
    assert store.steps(RUN) == (4,)
    store.begin(OTHER, 0, ())  # a new run: run.json first, then every file of the old run goes
    assert names(store) == [RUN_FILE] and store.run_id() == OTHER


def test_files_of_another_run_are_not_held(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    other = store_at(tmp_path / "other", [12], run_id=OTHER)
    (other.directory / file_name(12)).rename(store.directory / file_name(12))  # e.g. copied in by hand
    assert store.steps(RUN) == (4, 8)
    assert store.newest()["step"] == 8  # eval skips it too: run.json says RUN


def test_an_unreadable_file_is_not_held_in_training(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    (store.directory / file_name(8)).write_bytes(b"garbage")
    assert store.steps(RUN) == (4,)  # training falls back to the older one (the reason to keep two)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a checkpoint", "not a readable vfl checkpoint"),
        (b"", "not a readable vfl checkpoint"),
        ("list", "not a vfl checkpoint of format 3"),
        ("other-job", "made by another job (fingerprint other, this job job-fingerprint); rerun `vfl train`"),
    ],
)
def test_bad_files_are_one_line_naming_the_file(tmp_path: Path, content: bytes | str, needle: str) -> None:
    store = store_at(tmp_path, [4, 8])
    path = store.directory / file_name(8)
    if content == "list":
        torch.save([1, 2], path)
    elif content == "other-job":
        CheckpointStore(store.directory, "other").save(RUN, 8, 0, 8, state(1))
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    for read in (store.newest, lambda: store.load(RUN, 8)):
        with pytest.raises(CheckpointError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


def test_another_jobs_file_stops_training_rather_than_being_dropped(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4, 8])
    CheckpointStore(store.directory, "other").save(RUN, 8, 0, 8, state(1))
    with pytest.raises(CheckpointError, match="made by another job"):
        store.steps(RUN)


def test_a_file_renamed_to_another_step_is_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path, [4])
    (store.directory / file_name(4)).rename(store.directory / file_name(8))
    assert store.steps(RUN) == ()
    with pytest.raises(CheckpointError, match="holds run aaaa1111 step 4, expected run aaaa1111 step 8"):
        store.load(RUN, 8)


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("nothing", "no checkpoint here; run `vfl train` first"),
        ("run file only", "no checkpoint of run aaaa1111 yet"),
        ("bad run file", "not a readable vfl run file"),
    ],
)
def test_newest_without_a_checkpoint(tmp_path: Path, setup: str, needle: str) -> None:
    store = CheckpointStore(tmp_path / "leader", JOB)
    if setup != "nothing":
        store.begin(RUN, 0, ())
    if setup == "bad run file":
        (store.directory / RUN_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=needle):
        store.newest()


# ------------------------------------------------------------------------------------- the schedule


def test_position_and_schedule() -> None:
    assert Position.at(40, 15) == Position(40, 2, 10)
    assert str(Position.at(40, 15)) == "step 40 (epoch 2 step 10)"
    assert str(Position.at(30, 15)) == "step 30 (end of epoch 1)"
    assert str(Position.at(0, 15)) == "step 0 (the start)"
    # every 4 steps with 15 per epoch: mid-epoch at 4, 8, 12, 16, ...; never on an epoch's last step
    assert [g for g in range(1, 31) if checkpoint_due(g, 15, 4)] == [4, 8, 12, 16, 20, 24, 28]
    assert [g for g in range(1, 31) if checkpoint_due(g, 15, 5)] == [5, 10, 20, 25]


def test_batch_order_depends_on_seed_and_epoch_only() -> None:
    first = batch_rows(100, 16, seed=3, epoch=2, shuffle=True)
    again = batch_rows(100, 16, seed=3, epoch=2, shuffle=True)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], batch_rows(100, 16, seed=3, epoch=3, shuffle=True)[0])


# ---------------------------------------------------------------------------------------- agreement


def hello(role: str, run_id: str, steps: tuple[int, ...] = ()) -> Hello:
    return Hello(role, role, JOB, {}, "train", run_id=run_id, checkpoint_steps=steps)


REFUSED = "refused"


@pytest.mark.parametrize(
    ("leader", "follower", "expected"),
    [
        # same run: the newest step both hold
        ((RUN, (500, 1000)), (RUN, (500, 1000)), Agreement(RUN, 1000, True)),
        ((RUN, (500, 1000)), (RUN, (0, 500)), Agreement(RUN, 500, True)),  # follower died before 1000
        ((RUN, (500,)), (RUN, (500, 1000)), Agreement(RUN, 500, True)),  # leader died before 1000
        ((RUN, (1000, 1015)), (RUN, (1000,)), Agreement(RUN, 1000, True)),  # epoch end written by one side
        ((RUN, ()), (RUN, (500,)), Agreement(RUN, 0, True)),  # step 0 is held by both implicitly
        ((RUN, (500,)), (RUN, (1000,)), Agreement(RUN, 0, True)),
        ((RUN, ()), (RUN, ()), Agreement(RUN, 0, True)),  # killed before the first checkpoint
        # different runs, nothing held on either side: a fresh run, the leader's id
        ((RUN, ()), (OTHER, ()), Agreement(RUN, 0, False)),
        ((OTHER, ()), (RUN, ()), Agreement(OTHER, 0, False)),
        # different runs with a history on one side: refused, never mixed
        ((RUN, (500, 1000)), (OTHER, ()), REFUSED),  # the follower lost its files, or --restart on it alone
        ((OTHER, ()), (RUN, (500,)), REFUSED),  # --restart on the leader alone
        ((RUN, (500,)), (OTHER, (500,)), REFUSED),  # two histories
    ],
)
def test_agree(leader: tuple, follower: tuple, expected: Agreement | str) -> None:
    hellos = hello("leader", *leader), hello("follower", *follower)
    if expected == REFUSED:
        with pytest.raises(ProtocolError) as caught:
            agree(*hellos)
        message = str(caught.value)
        assert "\n" not in message and "--restart" in message
        for role, (run_id, steps) in (("leader", leader), ("follower", follower)):
            assert (f"the {role} holds run {run_id[:8]} at steps" if steps else
                    f"the {role} holds no checkpoint (run {run_id[:8]})") in message
    else:
        assert agree(*hellos) == expected


def test_refusal_names_what_each_side_holds() -> None:
    with pytest.raises(ProtocolError) as caught:
        agree(hello("leader", RUN, (500, 1000)), hello("follower", OTHER))
    assert str(caught.value) == (
        "the parties hold different training runs: the leader holds run aaaa1111 at steps 500, 1000; "
        "the follower holds no checkpoint (run cccc3333): rerun `vfl train` on every party with --restart to "
        "start over (--restart on one side alone is refused like this)"
    )


@pytest.mark.parametrize(
    ("leader", "follower", "error", "needle"),
    [
        ((RUN, (40,)), (RUN, (40,)), None, ""),
        ((RUN, (40,)), (RUN, (30,)), ProtocolError,
         "checkpoints differ: the leader's is newer than the follower's: run aaaa1111 step 40 (epoch 2 step 10) "
         "against step 30 (end of epoch 1); rerun `vfl train` on every party so they finish the same step"),
        ((RUN, (15,)), (RUN, (20,)), ProtocolError, "the follower's is newer than the leader's"),
        ((RUN, (40,)), (OTHER, (40,)), ProtocolError, "the follower's of another run, cccc3333"),
        (("", ()), (RUN, (40,)), CheckpointError, "the leader has no usable checkpoint"),
        ((RUN, (40,)), ("", ()), CheckpointError, "the follower has no usable checkpoint"),
    ],
)
def test_eval_needs_the_same_checkpoint_on_both_sides(
    leader: tuple, follower: tuple, error: type[Exception] | None, needle: str
) -> None:
    hellos = hello("leader", *leader), hello("follower", *follower)
    if error is None:
        same_checkpoint(*hellos, steps_per_epoch=15)
        return
    with pytest.raises(error) as caught:
        same_checkpoint(*hellos, steps_per_epoch=15)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
