"""`vfl export`: one party's part of a trained model as ONNX, for serving outside vfl.

Each party exports only its own part, from its own checkpoint (the selected one with validation, else the
newest), and needs no peer:

    <out>/<party>/bottom.onnx      ids int64 [B, F], vals float32 [B, F] -> the cut tensors, float32 [B, width] each
                                   (a party without feature columns has none)
    <out>/<party>/top.onnx         the leader's: every party's cut tensors, named "<party>.<tensor>", the leader's
                                   first, then each follower's in the job's order -> "prediction": P(y=1) [B],
                                   P(class) [B, k] or the value in the label's units [B] (the task's predict)
    <out>/<party>/vocab.json, dense_max.json, meta.json   how raw rows become ids and vals (as prepared)
    <out>/<party>/manifest.json    run id, step, job fingerprint, every graph's inputs and outputs, the task and
                                   its classes, and the check below

The export checks itself: onnxruntime's outputs against torch's on this party's test split (the bottom) and on
that split's cut with seeded stand-ins for the other parties' cuts (the top), at most 1e-5 apart, else it
refuses with the difference. The graphs are traced with torch's TorchScript exporter (opset 17), batch size
dynamic.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data_prep.store import open_party
from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec
from vfl_cli.train.parties import PartyModel
from vfl_cli.trained import load_party

OPSET = 17
TOLERANCE = 1e-5  # onnxruntime against torch, absolute, on float32 outputs
CHECK_ROWS = 4096  # rows of the test split the check runs on
PREPARED = ("vocab.json", "dense_max.json", "meta.json")  # what encodes a raw row, copied beside the graphs


@dataclass(frozen=True)
class Exported:
    directory: Path
    graphs: dict[str, Path]  # "bottom" / "top" -> file
    run_id: str
    step: int
    max_difference: float  # onnxruntime against torch over the check's rows


class _Bottom(nn.Module):
    """The bottom with its cut as a tuple, in the cut's order (ONNX outputs are positional)."""

    def __init__(self, party: PartyModel) -> None:
        super().__init__()
        assert party.bottom is not None
        self.bottom = party.bottom

    def forward(self, ids: Tensor, vals: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.float() for t in self.bottom(ids, vals).values())


class _Top(nn.Module):
    """The top and the task's predict over every party's cut tensors, given flat in `names` order."""

    def __init__(self, party: PartyModel, cuts: list[tuple[str, dict[str, int]]]) -> None:
        super().__init__()
        assert party.top is not None and party.task is not None
        self.top, self.task, self.cuts = party.top, party.task, cuts

    def forward(self, *flat: Tensor) -> Tensor:
        tensors, joined = iter(flat), []
        for _, widths in self.cuts:
            joined.append({name: next(tensors) for name in widths})
        return self.task.predict(self.top(joined))


def export_party(job: JobSpec, role: str, run_dir: Path, out: Path, at: tuple[str, int] | None = None) -> Exported:
    """Write party `role`'s graphs, its encoding files and the manifest to `<out>/<role>`, checked; from its
    selected (else newest) checkpoint, or run `at[0]`'s step `at[1]`."""
    party, payload = load_party(job, role, run_dir, at)
    data = open_party(job.data.dir, role)
    directory = out / role
    directory.mkdir(parents=True, exist_ok=True)
    split = "test" if "test" in data.meta.splits else next(iter(data.meta.splits))
    arrays = data.split(split)
    rows = min(CHECK_ROWS, len(arrays))
    if rows == 0:
        raise DataError(f"{data.dir}: the {split} split is empty; nothing to check the export on")
    ids = torch.from_numpy(np.array(arrays.ids[:rows], dtype=np.int64))  # copies: the arrays are memory-mapped
    vals = torch.from_numpy(np.array(arrays.vals[:rows], dtype=np.float32))
    graphs: dict[str, Path] = {}
    manifest: dict[str, Any] = {"party": role, "run_id": payload["run_id"], "step": payload["step"],
                                "job_fingerprint": job.fingerprint(), "opset": OPSET, "graphs": {}}
    differences = [0.0]
    own: dict[str, Tensor] = {}
    if party.bottom is not None:
        bottom = _Bottom(party)
        names = list(job.cut_widths(role))
        graphs["bottom"] = directory / "bottom.onnx"
        _export(bottom, (ids, vals), graphs["bottom"], ["ids", "vals"], names)
        with torch.no_grad():
            own = dict(zip(names, bottom(ids, vals), strict=True))
        differences.append(_check(graphs["bottom"], {"ids": ids, "vals": vals}, list(own.values())))
        manifest["graphs"]["bottom"] = {"file": "bottom.onnx", "inputs": ["ids", "vals"], "outputs": names,
                                        "columns": list(job.party(role).columns)}
    if party.top is not None:
        cuts = [(key, job.cut_widths(key)) for key in job.keys]
        generator = torch.Generator().manual_seed(job.seed)
        flat, inputs = [], []
        for key, widths in cuts:
            for name, width in widths.items():
                given = own.get(name) if key == role else None
                flat.append(given if given is not None else torch.randn(rows, width, generator=generator))
                inputs.append(f"{key}.{name}")
        top = _Top(party, cuts)
        graphs["top"] = directory / "top.onnx"
        _export(top, tuple(flat), graphs["top"], inputs, ["prediction"])
        with torch.no_grad():
            expected = top(*flat)
        differences.append(_check(graphs["top"], dict(zip(inputs, flat, strict=True)), [expected]))
        assert party.task is not None
        manifest["graphs"]["top"] = {"file": "top.onnx", "inputs": inputs, "outputs": ["prediction"],
                                     "task": party.task.kind, "classes": list(party.task.classes)}
    for name in PREPARED:
        if (data.dir / name).exists():
            shutil.copyfile(data.dir / name, directory / name)
    worst = max(differences)
    manifest["check"] = {"split": split, "rows": rows, "max_abs_difference": worst, "tolerance": TOLERANCE}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Exported(directory, graphs, payload["run_id"], payload["step"], worst)


def _export(module: nn.Module, inputs: tuple[Tensor, ...], path: Path, names: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch"} for name in [*names, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: it is the one used here
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=outputs, dynamic_axes=dynamic)


def _check(path: Path, feeds: dict[str, Tensor], expected: list[Tensor]) -> float:
    """onnxruntime's outputs of `path` against torch's: the largest absolute difference; DataError above
    TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in feeds.items()}
    got = session.run(None, feed)
    worst = max(float(np.abs(g - e.numpy()).max(initial=0.0)) for g, e in zip(got, expected, strict=True))
    if worst > TOLERANCE:
        raise DataError(f"{path}: onnxruntime's outputs differ from torch's by {worst:.2e} (> {TOLERANCE:g})")
    return worst
