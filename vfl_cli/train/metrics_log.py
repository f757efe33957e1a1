"""Where a training run's records go: `<run_dir>/<role>/metrics.jsonl` (one JSON object per line, what
`vfl report` reads), and with `train.tensorboard: true` the same figures as TensorBoard scalars in
`<run_dir>/<role>/tensorboard/` (`tensorboard --logdir <run_dir>` shows each party and baseline as a run).

Scalars: loss/wide and loss/deep per global step; <metric>/valid, <metric>/test (the task's metrics: auc,
log_loss, ks; accuracy, macro_f1, log_loss; rmse, mae, r2) and speed/train_samples_per_s per epoch;
<metric>/final_test at the selected epoch. The
event file is appended to at each epoch's end, so a crash loses at most the current epoch's step points.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from pathlib import Path
from typing import Any

from vfl_cli.errors import JobError
from vfl_cli.metric_names import TITLES

STEP_SCALARS = {"wide_loss": "loss/wide", "deep_loss": "loss/deep"}
METRIC_NAMES = tuple(TITLES)  # every task's metrics (vfl_cli.task)
EPOCH_SCALARS = {f"{split}_{name}": f"{name}/{split}" for split in ("valid", "test") for name in METRIC_NAMES}
EPOCH_SCALARS["train_samples_per_s"] = "speed/train_samples_per_s"
FINAL_SCALARS = {name: f"{name}/final_test" for name in METRIC_NAMES}


class EventFile:
    """One TensorBoard event file (tensorboardX's Event protobuf and CRC, TFRecord framing). Events are kept
    in memory and appended at each flush, so no file stays open between flushes."""

    def __init__(self, directory: Path) -> None:
        try:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.record_writer import masked_crc32c
            from tensorboardX.summary import scalar
        except ImportError as exc:
            raise JobError("train.tensorboard needs the tensorboardX package: pip install 'vfl[tensorboard]' "
                           "(or set train.tensorboard: false)") from exc
        self._event, self._crc, self._scalar = Event, masked_crc32c, scalar
        started = time.time()
        self.path = directory / f"events.out.tfevents.{int(started)}.{socket.gethostname()}.vfl"
        self._pending = [Event(wall_time=started, file_version="brain.Event:2").SerializeToString()]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        event = self._event(wall_time=time.time(), step=step, summary=self._scalar(tag, value))
        self._pending.append(event.SerializeToString())

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            for data in self._pending:
                header = struct.pack("<Q", len(data))
                handle.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))
        self._pending.clear()


class MetricsLog:
    """Appends records to metrics.jsonl, and mirrors their figures to TensorBoard when asked."""

    def __init__(self, directory: Path, role: str, tensorboard: bool = False) -> None:
        self.directory = directory
        self.role = role
        self._writer = EventFile(directory / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), "role": self.role, **record}) + "\n")
        if self._writer is not None:
            write_scalars(self._writer, record)


def write_scalars(writer: EventFile, record: dict[str, Any]) -> None:
    """The record's figures as TensorBoard scalars (events without figures write nothing)."""
    event = record.get("event")
    if event == "step":
        _add(writer, record, STEP_SCALARS, record["global_step"])
    elif event == "epoch":
        _add(writer, record, EPOCH_SCALARS, record["epoch"])
        writer.flush()
    elif event == "final_test":
        _add(writer, record, FINAL_SCALARS, record.get("epoch") or 0)
        writer.flush()


def _add(writer: EventFile, record: dict[str, Any], names: dict[str, str], step: int) -> None:
    for key, tag in names.items():
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            writer.add_scalar(tag, value, step)
