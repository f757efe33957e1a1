"""`make smoke-test` as a test: the whole two-organisation flow (split, prep table, PSI, train, eval, scoring new
customers) on jobs/smoke.yaml, in a scratch directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port


@pytest.mark.slow
def test_smoke_flow_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    job = (REPO / "jobs" / "smoke.yaml").read_text()
    for port in ("18701", "18702", "18711", "18712"):  # free ports (parties, metrics): no collision with make
        job = job.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    (tmp_path / "jobs" / "smoke.yaml").write_text(job)
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    done = subprocess.run([sys.executable, "scripts/demo.py", "jobs/smoke.yaml", "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "smoke test passed" in done.stdout
    assert (tmp_path / "runs" / "smoke" / "new" / "predictions.csv").exists()
