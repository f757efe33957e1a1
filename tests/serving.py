"""Serving tests' fixtures: tables with customer ids aligned by PSI, a trained job over mutual TLS, `vfl serve`
processes for every party, and a client for the label party's API."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from data_prep.store import table_dir
from data_prep.table import prepare_table
from tests.conftest import free_port
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.psi.session import psi_locally
from vfl_cli.train.session import infer_session, run_local, train_session
from vfl_cli.transport.tls import make_dev_certs

VFL = [sys.executable, "-m", "vfl_cli.app"]
TOKEN = "serving-test-token-0123456789"
TOKEN_ENV = "VFL_SERVE_TOKEN"
CLASSES = ("high", "low", "mid")
COLUMNS = {"leader": {"a0": "numeric", "a1": "categorical"}, "follower1": {"b0": "numeric", "b1": "categorical"},
           "follower2": {"c0": "numeric", "c1": "categorical"}}


def write_tables(directory: Path, parties: tuple[str, ...], task: str, n: int = 1200, seed: int = 7) -> None:
    """One CSV per party over n customers (each party holds ~90% of them, rows in its own order); the label
    depends on every party's categorical column."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"c{i:05d}" for i in range(n)])
    columns = {key: (rng.normal(size=n), rng.integers(0, 5, size=n)) for key in parties}
    logit = sum(columns[key][1] - 2.0 + 0.5 * columns[key][0] for key in parties) / 2
    if task == "binary":
        labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int).astype(str)
    else:
        labels = np.array(CLASSES)[np.digitize(logit + rng.normal(scale=0.3, size=n), [-0.6, 0.6])]
    for key in parties:
        rows = rng.permutation(np.flatnonzero(rng.random(n) < 0.9))
        names = list(COLUMNS[key])
        lines = [",".join(["id", *names] + (["label"] if key == "leader" else []))]
        numeric, category = columns[key]
        for r in rows:
            lines.append(",".join([ids[r], f"{numeric[r]:.5f}", f"k{category[r]}"]
                                  + ([labels[r]] if key == "leader" else [])))
        (directory / f"{key}.csv").write_text("\n".join(lines) + "\n")


def serving_spec(tmp_path: Path, parties: tuple[str, ...], task: str, epochs: int = 2,
                 valid_fraction: float = 0.0) -> dict[str, Any]:
    certs = tmp_path / "certs"
    spec: dict[str, Any] = {
        "name": f"serve-{task}", "seed": 4,
        "data": {"dir": str(tmp_path / "data"), "threshold": 1, "valid_fraction": valid_fraction},
        "parties": {key: {"name": key, "columns": COLUMNS[key], "listen": f"127.0.0.1:{free_port()}", "threads": 1,
                          "cert": str(certs / f"{key}.pem"), "key": str(certs / f"{key}.key")} for key in parties},
        "model": {"bottom": "mlp", "cut_dim": 4, "emb_dim": 4, "deep_layers": [8]},
        "train": {"epochs": epochs, "batch_size": 128, "run_dir": str(tmp_path / "run"),
                  "deep_optimizer": {"lr": 0.01}},
        "psi": {"min_intersection": 100, "batch_size": 300},
        "tls": {"enabled": True, "ca": str(certs / "ca.pem")},
        "transport": {"timeout_s": 20, "connect_timeout_s": 30},
        "serve": {"listen": f"127.0.0.1:{free_port()}", "token_env": TOKEN_ENV, "timeout_ms": 1500,
                  "clients": ["app"]},
    }
    spec["parties"]["leader"]["task"] = task
    return spec


def trained_job(tmp_path: Path, parties: tuple[str, ...], task: str, epochs: int = 2,
                valid_fraction: float = 0.0) -> tuple[JobSpec, Path]:
    """Tables -> prep -> PSI -> training (in this process) -> certificates; the job and its file."""
    write_tables(tmp_path, parties, task)
    spec = serving_spec(tmp_path, parties, task, epochs, valid_fraction)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(spec))
    job = parse_job(spec)
    for key in parties:
        prepare_table(tmp_path / f"{key}.csv", job.table_schema(key), table_dir(job.data.dir, key))
    psi_locally(job)
    run_local(job, train_session)
    make_dev_certs(job)
    return job, job_path


def infer_scores(job: JobSpec, tmp_path: Path, split: str = "test") -> dict[str, list[float]]:
    """`vfl infer`'s predictions, by customer id, as it writes them."""
    out = tmp_path / f"infer-{split}.csv"
    run_local(job, lambda run: infer_session(run, job.train.run_dir, split, out))
    with out.open() as file:
        return {row[0]: [float(v) for v in row[1:]] for row in list(csv.reader(file))[1:]}


def env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: TOKEN, "VFL_NO_PROGRESS": "1"}


class Served:
    """A `vfl serve` process; a thread keeps reading its stderr (where the console writes) into `lines`."""

    def __init__(self, job_path: Path, party: str, *args: str) -> None:
        self.party = party
        self.process = subprocess.Popen([*VFL, "serve", "--job", str(job_path), "--party", party, *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_serving(self, timeout_s: float = 60) -> float:
        """Wait for its "serving" line; the time it came."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(" serving run " in line for line in self.lines):
                return time.monotonic()
            if self.process.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"vfl serve --party {self.party} exited {self.process.returncode}: "
                                     f"{''.join(self.lines)[-2000:]}")
            time.sleep(0.02)
        raise AssertionError(f"vfl serve --party {self.party} did not start: {''.join(self.lines)[-2000:]}")

    def kill(self) -> None:
        """kill -9, by its PID."""
        self.process.kill()
        self.process.wait(20)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> int:
        """SIGTERM (the way an operator stops it); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close()
        return self.process.returncode


def api_client(job: JobSpec, cert: tuple[Path, Path] | None = None, token: str | None = TOKEN) -> httpx.Client:
    """A client of the label party's API, trusting the job's CA; with the token, or a client certificate."""
    import ssl

    context = ssl.create_default_context(cafile=str(job.tls.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"https://{job.serve.listen}", verify=context, headers=headers, timeout=10,
                        trust_env=False)


def wait_healthy(job: JobSpec, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    with api_client(job, token=None) as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/healthz").json()["status"] == "ok":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise AssertionError("the label party's API did not become healthy")


def client_certificate(job: JobSpec, name: str, out: Path) -> tuple[Path, Path]:
    """A certificate from the job's (dev) CA with CN `name`, for a caller of the API."""
    assert job.tls.ca is not None
    ca_cert = x509.load_pem_x509_certificate(job.tls.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(job.tls.ca.with_suffix(".key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    paths = out / f"{name}.pem", out / f"{name}.key"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def scores_at(job: JobSpec, ids: list[str], step: int) -> np.ndarray:
    """Every party's part of step `step`, composed in this process (no server): the scores serving must give."""
    from vfl_cli.checkpoint import CheckpointStore
    from vfl_cli.serve.feature_store import FeatureStore
    from vfl_cli.serve.model import ServedPart

    run_id = CheckpointStore(job.train.run_dir / job.label_party, job.fingerprint()).run_id()
    assert run_id is not None
    parts = {key: ServedPart.load(job, key, job.train.run_dir, (run_id, step)) for key in job.keys}
    cuts = []
    for key in job.keys:
        rows = FeatureStore.open(job.data.dir / key).lookup(ids)
        assert rows.found.all()
        cuts.append(parts[key].cut(rows.ids, rows.vals))
    return parts[job.label_party].predict(cuts)
