"""Dev certificates, TLS contexts and `vfl certs`: what is written, who it names, and how loading fails."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from vfl_cli.commands.certs import certs
from vfl_cli.errors import TlsError
from vfl_cli.job import JobSpec, parse_job
from vfl_cli.transport.tls import (
    cert_paths,
    client_ssl_context,
    make_dev_certs,
    peer_common_name,
    server_ssl_context,
)

LEADER_ENV = "VFL_TEST_TLS_LEADER_PASSWORD"


def tls_job(certs_dir: Path, *, leader_host: str = "127.0.0.1", **leader: Any) -> JobSpec:
    """Leader's key password from an env var, follower's from a file; certificate paths under certs_dir."""
    (certs_dir.parent / "follower.pass").write_text("follower-secret\n")
    return parse_job(
        {
            "name": "tlsjob",
            "parties": {
                "leader": {
                    "name": "alice",
                    "fields": ["I1"],
                    "listen": f"{leader_host}:18801",
                    "cert": str(certs_dir / "leader.pem"),
                    "key": str(certs_dir / "leader.key"),
                    "key_password_env": LEADER_ENV,
                    **leader,
                },
                "follower": {
                    "name": "bob",
                    "fields": ["I2"],
                    "listen": "localhost:18802",
                    "cert": str(certs_dir / "follower.pem"),
                    "key": str(certs_dir / "follower.key"),
                    "key_password_file": str(certs_dir.parent / "follower.pass"),
                },
            },
            "tls": {"enabled": True, "ca": str(certs_dir / "ca.pem")},
        }
    )


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_dev_certs_name_the_parties_and_chain_to_the_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LEADER_ENV, "leader-secret")
    job = tls_job(tmp_path / "certs")
    made = make_dev_certs(job)
    assert made.paths == cert_paths(job)
    assert set(made.unencrypted) == {tmp_path / "certs" / "ca.key"}  # both party keys have passwords
    ca = load_cert(tmp_path / "certs" / "ca.pem")
    assert peer_common_name(ca) == "vfl dev CA tlsjob"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role, name in (("leader", "alice"), ("follower", "bob")):
        cert = load_cert(tmp_path / "certs" / f"{role}.pem")
        assert peer_common_name(cert) == name
        cert.verify_directly_issued_by(ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = load_cert(tmp_path / "certs" / "leader.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # The party's name first: the peer's client verifies it during the TLS handshake.
    assert san.value.get_values_for_type(x509.DNSName) == ["alice", "localhost"]
    san = load_cert(tmp_path / "certs" / "follower.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["bob", "localhost"]
    for path in made.paths.all():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_keys_are_encrypted_with_the_configured_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LEADER_ENV, "leader-secret")
    make_dev_certs(tls_job(tmp_path / "certs"))
    for role, password in (("leader", b"leader-secret"), ("follower", b"follower-secret")):
        data = (tmp_path / "certs" / f"{role}.key").read_bytes()
        assert b"ENCRYPTED" in data
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(data, None)
        with pytest.raises(ValueError):
            serialization.load_pem_private_key(data, b"wrong")
        serialization.load_pem_private_key(data, password)


def test_unset_password_env_gives_an_unencrypted_key_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LEADER_ENV, raising=False)
    job = tls_job(tmp_path / "certs")
    made = make_dev_certs(job, tmp_path / "out")
    assert made.unencrypted[tmp_path / "out" / "leader.key"] == f"{LEADER_ENV} is not set"
    serialization.load_pem_private_key((tmp_path / "out" / "leader.key").read_bytes(), None)


def test_contexts_require_tls12_and_client_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LEADER_ENV, "leader-secret")
    job = tls_job(tmp_path / "certs")
    make_dev_certs(job)
    for role in ("leader", "follower"):
        server = server_ssl_context(job, role)  # type: ignore[arg-type]
        client = client_ssl_context(job, role)  # type: ignore[arg-type]
        for context in (server, client):
            assert context.minimum_version == ssl.TLSVersion.TLSv1_2
            assert context.verify_mode == ssl.CERT_REQUIRED
        assert client.check_hostname


def test_loading_failures_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs_dir = tmp_path / "certs"
    job = tls_job(certs_dir)
    with pytest.raises(TlsError, match=r"ca\.pem: cannot read CA certificate"):
        server_ssl_context(job, "leader")
    monkeypatch.setenv(LEADER_ENV, "leader-secret")
    make_dev_certs(job)

    monkeypatch.delenv(LEADER_ENV)
    with pytest.raises(
        TlsError, match=rf"leader\.key: the private key is encrypted; set its password via {LEADER_ENV}"
    ):
        server_ssl_context(job, "leader")
    monkeypatch.setenv(LEADER_ENV, "not-it")
    with pytest.raises(TlsError, match=r"leader\.key: cannot load private key: wrong password"):
        client_ssl_context(job, "leader")
    monkeypatch.setenv(LEADER_ENV, "leader-secret")

    renamed = tls_job(certs_dir, name="carol")
    with pytest.raises(
        TlsError, match=r"leader\.pem: certificate CN is 'alice' but parties\.leader\.name is 'carol'"
    ):
        server_ssl_context(renamed, "leader")

    swapped = tls_job(
        certs_dir,
        key=str(certs_dir / "follower.key"),
        key_password_env=None,
        key_password_file=str(tmp_path / "follower.pass"),
    )
    with pytest.raises(TlsError, match=r"follower\.key: cannot use with .*leader\.pem"):
        server_ssl_context(swapped, "leader")

    (tmp_path / "follower.pass").unlink()
    with pytest.raises(TlsError, match=r"follower\.pass: cannot read the key password file"):
        client_ssl_context(job, "follower")
    (certs_dir / "follower.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match=r"follower\.pem: not a PEM certificate"):
        client_ssl_context(job, "follower")


def test_default_paths_follow_the_job(tmp_path: Path) -> None:
    job = tls_job(tmp_path / "certs")
    paths = cert_paths(job)
    assert paths.ca_key == tmp_path / "certs" / "ca.key"
    assert paths.keys["follower"] == tmp_path / "certs" / "follower.key"
    bare = parse_job(
        {
            "name": "x",
            "parties": {
                "leader": {"name": "a", "fields": ["I1"]},
                "follower": {"name": "b", "fields": ["I2"]},
            },
        }
    )
    with pytest.raises(TlsError, match="--out"):
        cert_paths(bare)


def certs_cli() -> typer.Typer:
    app = typer.Typer()
    app.command("certs")(certs)

    @app.callback()
    def _root() -> None:
        """Group, so that `certs` is invoked by name as in `vfl certs`."""

    return app


def test_vfl_certs_command_writes_loadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEADER_ENV, "leader-secret")
    job = tls_job(tmp_path / "jobcerts")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    out = tmp_path / "out"
    result = CliRunner().invoke(certs_cli(), ["certs", "--job", str(job_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "ca.pem",
        "ca.key",
        "leader.pem",
        "leader.key",
        "follower.pem",
        "follower.key",
    }
    assert f"wrote {out / 'leader.key'}" in result.output.replace("\n", "")
    # Point the job at the written files: both contexts load, with the passwords from env and file.
    usable = parse_job(yaml.safe_load(job_file.read_text().replace(str(tmp_path / "jobcerts"), str(out))))
    server_ssl_context(usable, "leader")
    client_ssl_context(usable, "follower")
    monkeypatch.delenv(LEADER_ENV)
    with pytest.raises(TlsError, match="encrypted"):
        server_ssl_context(usable, "leader")


def test_vfl_certs_defaults_to_the_job_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LEADER_ENV, raising=False)
    job = tls_job(tmp_path / "jobcerts")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    result = CliRunner().invoke(certs_cli(), ["certs", "--job", str(job_file)])
    assert result.exit_code == 0, result.output
    assert "not encrypted" in result.output and LEADER_ENV in result.output.replace("\n", "")
    server_ssl_context(job, "leader")
    client_ssl_context(job, "follower")
