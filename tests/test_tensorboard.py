"""`train.tensorboard: true`: the run's figures as TensorBoard event files beside metrics.jsonl, read back here
from the files' bytes (TFRecord framing, tensorboardX's Event protobuf) and checked against metrics.jsonl."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from tests.conftest import job_dict, run_vfl, write_job, write_planted_data
from vfl_cli.errors import JobError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.train.metrics_log import MetricsLog
from vfl_cli.train.session import run_local, train_session

pytest.importorskip("tensorboardX", reason="tensorboardX is in the test extras")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file in `directory`: tag -> [(step, value)] in file order."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    found: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            header, (header_crc,) = data[at : at + 8], struct.unpack_from("<I", data, at + 8)
            body = data[at + 12 : at + 12 + length]
            (body_crc,) = struct.unpack_from("<I", data, at + 12 + length)
            assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body))  # TensorBoard checks them
            event = Event.FromString(body)
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def job(tmp_path: Path, tensorboard: bool = True) -> JobSpec:
    spec = job_dict(tmp_path, epochs=2, tensorboard=tensorboard)
    spec["data"]["valid_fraction"] = 0.25
    write_planted_data(Path(spec["data"]["dir"]), rows=600)
    return parse_job(spec)


def records(path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def test_a_run_writes_the_metrics_records_as_tensorboard_scalars(tmp_path: Path) -> None:
    spec = job(tmp_path)
    run_local(spec, train_session)
    leader = spec.train.run_dir / "leader"
    written = scalars(leader / "tensorboard")
    steps = records(leader / "metrics.jsonl", "step")
    assert [step for step, _ in written["loss/wide"]] == [r["global_step"] for r in steps]
    assert [v for _, v in written["loss/deep"]] == pytest.approx([r["deep_loss"] for r in steps], rel=1e-6)
    epochs = records(leader / "metrics.jsonl", "epoch")
    assert written["auc/valid"] == [(r["epoch"], pytest.approx(r["valid_auc"], rel=1e-6)) for r in epochs]
    assert len(written["speed/train_samples_per_s"]) == len(epochs) == 2
    (final,) = records(leader / "metrics.jsonl", "final_test")
    assert written["auc/final_test"] == [(final["epoch"], pytest.approx(final["auc"], rel=1e-6))]
    assert "auc/test" not in written  # with validation, test is scored once, not per epoch
    assert (spec.train.run_dir / "follower" / "tensorboard").is_dir()  # each party logs its own side


def test_a_baseline_writes_event_files_too_and_the_setting_is_local(tmp_path: Path) -> None:
    from vfl_cli.reporter import SilentReporter
    from vfl_cli.train.baseline import train_baseline

    spec = job(tmp_path)
    train_baseline(spec, "central", SilentReporter(), restart=True)
    assert len(scalars(spec.train.run_dir / "central" / "tensorboard")["auc/valid"]) == 2
    off = parse_job({**job_dict(tmp_path), "train": {**job_dict(tmp_path)["train"], "tensorboard": False}})
    on = parse_job({**job_dict(tmp_path), "train": {**job_dict(tmp_path)["train"], "tensorboard": True}})
    assert off.fingerprint() == on.fingerprint()  # one party may watch in TensorBoard, the other not


def test_without_tensorboardx_it_is_one_line_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboardX...` now raises ImportError
    with pytest.raises(JobError, match=r"pip install 'vfl\[tensorboard\]'"):
        MetricsLog(tmp_path, "leader", tensorboard=True)
    spec = job_dict(tmp_path, epochs=1, tensorboard=True)
    write_planted_data(Path(spec["data"]["dir"]), rows=200)
    code, err = run_vfl(monkeypatch, capsys, "train", "--role", "local", "--job", write_job(tmp_path, spec))
    assert code != 0 and "tensorboardX" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "leader" / "metrics.jsonl").exists()  # nothing trained, nothing recorded
