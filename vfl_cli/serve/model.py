"""One party's part of a trained model while serving: `ServedPart.load(job, role, run_dir, at, backend)` ->
`cut(ids, vals)` (every party with columns) and `predict(cuts)` (the label party: every party's cut, its own
first, then each follower's in the job's order -> the task's predictions).

Two backends compute the same thing: torch (the checkpoint's modules, in eval mode, no autograd) and
onnxruntime (the graphs `vfl export` writes, exported into `<run_dir>/<role>/serving/` once per step and checked
against torch there to 1e-5). `make bench-serve` measures both; the job picks with `serve.backend`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vfl_cli.job import JobSpec
from vfl_cli.task import Task
from vfl_cli.train.parties import PartyModel
from vfl_cli.trained import load_party

Cut = dict[str, np.ndarray]  # cut tensor name -> float32 [B, width]


class _Compute(Protocol):
    def cut(self, ids: np.ndarray, vals: np.ndarray) -> Cut: ...

    def predict(self, cuts: list[Cut]) -> np.ndarray: ...


@dataclass(frozen=True)
class ServedPart:
    role: str
    run_id: str
    step: int
    task: Task | None  # the label party's
    widths: dict[str, int]  # this party's cut tensors (none for a label party without columns)
    compute: _Compute

    @classmethod
    def load(cls, job: JobSpec, role: str, run_dir: Path, at: tuple[str, int] | None = None,
             backend: str = "torch") -> ServedPart:
        """Party `role`'s part from its selected (else newest) checkpoint, or run `at[0]`'s step `at[1]`."""
        party, payload = load_party(job, role, run_dir, at)
        run_id, step = payload["run_id"], payload["step"]
        compute: _Compute = _Torch(party)
        if backend == "onnxruntime":
            compute = _Onnx.export(job, role, run_dir, (run_id, step))
        widths = job.cut_widths(role) if party.bottom is not None else {}
        return cls(role, run_id, step, party.task, widths, compute)

    def cut(self, ids: np.ndarray, vals: np.ndarray) -> Cut:
        """This party's cut tensors of these rows (ids int64 [B, F], vals float32 [B, F])."""
        return self.compute.cut(ids, vals) if self.widths else {}

    def predict(self, cuts: list[Cut]) -> np.ndarray:
        """The label party's: the task's predictions [B] or [B, k] from every party's cut, in the job's order."""
        return self.compute.predict(cuts)


class _Torch:
    def __init__(self, party: PartyModel) -> None:
        self.party = party

    def cut(self, ids: np.ndarray, vals: np.ndarray) -> Cut:
        with torch.inference_mode():
            out = self.party.bottom_forward(torch.from_numpy(ids), torch.from_numpy(vals))
        return {name: t.numpy() for name, t in out.items()}

    def predict(self, cuts: list[Cut]) -> np.ndarray:
        assert self.party.top is not None and self.party.task is not None
        with torch.inference_mode():
            joined = [{name: torch.from_numpy(a) for name, a in cut.items()} for cut in cuts]
            return self.party.task.predict(self.party.top(joined)).numpy()


class _Onnx:
    def __init__(self, directory: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: serving logs are ours
        # The party's thread budget, like torch's (`parties.<key>.threads`; default all cores), one pool per
        # session, and no spinning: idle sessions must not burn the cores the HTTP server and the peers need.
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graphs = manifest["graphs"]
        self.sessions = {name: onnxruntime.InferenceSession(str(directory / graph["file"]), options,
                                                            providers=["CPUExecutionProvider"])
                         for name, graph in graphs.items()}
        self.outputs = graphs.get("bottom", {}).get("outputs", [])
        self.inputs = graphs.get("top", {}).get("inputs", [])

    @classmethod
    def export(cls, job: JobSpec, role: str, run_dir: Path, at: tuple[str, int]) -> _Onnx:
        from vfl_cli.export import export_party

        out = run_dir / role / "serving" / f"{at[0][:8]}-{at[1]}"
        manifest_path = out / role / "manifest.json"
        if not manifest_path.exists():  # exported once per step; the export checks itself against torch
            export_party(job, role, run_dir, out, at)
        return cls(out / role, json.loads(manifest_path.read_text()), job.party(role).threads)

    def cut(self, ids: np.ndarray, vals: np.ndarray) -> Cut:
        got = self.sessions["bottom"].run(None, {"ids": ids, "vals": vals})
        return dict(zip(self.outputs, got, strict=True))

    def predict(self, cuts: list[Cut]) -> np.ndarray:
        flat = [tensor for cut in cuts for tensor in cut.values()]
        result: np.ndarray = self.sessions["top"].run(None, dict(zip(self.inputs, flat, strict=True)))[0]
        return result
