"""Certificates and TLS contexts: the dev CA that `vfl certs` makes, and both parties' mutual-TLS contexts.

Each party holds a certificate signed by the job's CA whose common name (CN) is the party's `name` in the
job, and which names the party as a DNS subject-alternative name too. When are identities checked?

- The client (the sender of every message) connects with the peer's party name as TLS server name (SNI)
  and verifies the server's certificate against the job's CA and that name **during the TLS handshake**,
  before it writes a single byte of any request. A server with another party's certificate from the same
  CA fails the handshake; nothing is sent to it.
- The server requires a client certificate from the job's CA during the same handshake, then checks its
  CN against the expected peer on every request (403 otherwise), before it reads the body.
Key passwords come from the environment variable or file the job names, never from the command line,
and are never logged. Every failure is one TlsError line that names the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vfl_cli.errors import TlsError
from vfl_cli.job import JobSpec, PartySpec, Role

log = logging.getLogger(__name__)

CA_VALID_DAYS = 3650
PARTY_VALID_DAYS = 825  # the longest leaf lifetime common TLS clients accept
CLOCK_SKEW = timedelta(minutes=5)  # certificates start a little in the past, for machines whose clocks differ


# ----------------------------------------------------------------------------------------- dev certificates


@dataclass(frozen=True)
class CertPaths:
    """Where `make_dev_certs` writes each file."""

    ca_cert: Path
    ca_key: Path
    certs: dict[Role, Path]
    keys: dict[Role, Path]

    def all(self) -> list[Path]:
        return [self.ca_cert, self.ca_key, *(p for r in self.certs for p in (self.certs[r], self.keys[r]))]


@dataclass(frozen=True)
class DevCerts:
    """What `make_dev_certs` wrote; `unencrypted` maps each key file written without a password to why."""

    paths: CertPaths
    unencrypted: dict[Path, str] = field(default_factory=dict)


def cert_paths(job: JobSpec, out_dir: Path | None = None) -> CertPaths:
    """Standard names in `out_dir`; without one, the job's own `cert`/`key`/`tls.ca` paths (next to the
    leader's certificate for any the job leaves out)."""
    if out_dir is not None:
        return CertPaths(
            out_dir / "ca.pem",
            out_dir / "ca.key",
            {r: out_dir / f"{r}.pem" for r in job.parties},
            {r: out_dir / f"{r}.key" for r in job.parties},
        )
    if job.leader.cert is None:
        raise TlsError(f"the job sets no parties.{job.label_party}.cert: give an output directory (--out)")
    base = job.leader.cert.parent
    ca_cert = job.tls.ca or base / "ca.pem"
    paths = CertPaths(
        ca_cert,
        ca_cert.with_suffix(".key") if ca_cert.suffix != ".key" else ca_cert.with_name(ca_cert.name + ".key"),
        {r: p.cert or base / f"{r}.pem" for r, p in job.parties.items()},
        {r: p.key or base / f"{r}.key" for r, p in job.parties.items()},
    )
    if len(set(paths.all())) != len(paths.all()):
        raise TlsError("the job's cert, key and tls.ca paths must all differ")
    return paths


def make_dev_certs(job: JobSpec, out_dir: Path | None = None) -> DevCerts:
    """A self-signed CA plus one certificate and key per party, all files mode 0600.

    Each party's key is encrypted with its password (see `key_password`) when one is configured and set;
    otherwise it is written unencrypted and `DevCerts.unencrypted` says why.
    """
    paths = cert_paths(job, out_dir)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vfl dev CA {job.name}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    # The dev CA's key has no password setting in the job; it is only needed to make more certificates.
    _write_private(paths.ca_key, _key_pem(ca_key, None))
    unencrypted = {paths.ca_key: "the dev CA key is never encrypted"}

    for role, party in job.parties.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party.name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=PARTY_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(_alt_names(party)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        password, why_not = _generation_password(party)
        if password is None:
            unencrypted[paths.keys[role]] = why_not
            log.info("writing %s unencrypted: %s", paths.keys[role], why_not)  # callers report it
        _write_private(paths.certs[role], cert.public_bytes(serialization.Encoding.PEM))
        _write_private(paths.keys[role], _key_pem(key, password))
    return DevCerts(paths, unencrypted)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(party: PartySpec) -> list[x509.GeneralName]:
    """The party's name (what the peer's client verifies), then its listen host (an IP address entry when it
    is one) and "localhost", for tools such as curl."""
    names: list[x509.GeneralName] = [x509.DNSName(party.name)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(party.host)))
    except ValueError:
        if party.host not in (party.name, "localhost"):
            names.append(x509.DNSName(party.host))
    if party.name != "localhost":
        names.append(x509.DNSName("localhost"))
    return names


def _generation_password(party: PartySpec) -> tuple[str | None, str]:
    """The password to encrypt a new key with, or None and why there is none."""
    if party.key_password_env:
        value = os.environ.get(party.key_password_env)
        if value:
            return value, ""
        if party.key_password_file is None:
            return None, f"{party.key_password_env} is not set"
    if party.key_password_file is not None:
        if party.key_password_file.is_file():
            return _read_password_file(party.key_password_file), ""
        return None, f"{party.key_password_file} does not exist"
    return None, "the job sets no key_password_env or key_password_file for this party"


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _write_private(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
            out.write(data)
    except OSError as exc:
        raise TlsError(f"{path}: cannot write: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------- TLS contexts


def key_password(party: PartySpec) -> str | None:
    """The password of the party's key: from its `key_password_env` variable, else its `key_password_file`."""
    if party.key_password_env and os.environ.get(party.key_password_env):
        return os.environ[party.key_password_env]
    if party.key_password_file is not None:
        return _read_password_file(party.key_password_file)
    return None


def _read_password_file(path: Path) -> str:
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise TlsError(f"{path}: cannot read the key password file: {exc.strerror or exc}") from exc


def server_ssl_context(job: JobSpec, role: Role) -> ssl.SSLContext:
    """TLS 1.2+, this party's certificate, and a client certificate from the job's CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, job, role)
    return context


def client_ssl_context(job: JobSpec, role: Role) -> ssl.SSLContext:
    """TLS 1.2+, this party's certificate offered, and the server checked against the job's CA and the name
    the client connects with (the peer's party name, see `HttpsGrid`) during the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname is on for client contexts
    _configure(context, job, role)
    return context


def api_ssl_context(job: JobSpec, role: Role, client_certificates: bool, required: bool) -> ssl.SSLContext:
    """The label party's serving API: its own certificate; a client certificate from the job's CA asked for when
    `client_certificates` (required when `required`, else optional: token callers need none)."""
    context = server_ssl_context(job, role)
    context.verify_mode = (ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL) if client_certificates \
        else ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class CertificateSummary:
    """Who a certificate says it is, for error messages."""

    common_name: str | None
    dns_names: tuple[str, ...]
    serial: int

    def __str__(self) -> str:
        dns = ", ".join(self.dns_names) or "none"
        return f"certificate CN {self.common_name!r} (DNS names: {dns}; serial {self.serial:x})"


def describe_server_certificate(
    host: str, port: int, job: JobSpec, role: Role, timeout_s: float = 5.0
) -> CertificateSummary | str:
    """Who the server at host:port claims to be, for an error message after its certificate failed the name
    check: a second handshake that verifies the CA only, then closes without sending anything. A string
    says why it could not be read."""
    context = client_ssl_context(job, role)
    context.check_hostname = False
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=None) as secured:
                der = secured.getpeercert(True)
    except (OSError, ssl.SSLError) as exc:
        return f"a certificate that could not be read again ({_ssl_reason(exc)})"
    if not der:
        return "no certificate"
    cert = x509.load_der_x509_certificate(der)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(alt.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    return CertificateSummary(peer_common_name(cert), dns_names, cert.serial_number)


def _configure(context: ssl.SSLContext, job: JobSpec, role: Role) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    if job.tls.ca is None:
        raise TlsError("tls.ca: the job names no CA certificate (make one with `vfl certs --job ...`)")
    _load_certificate(job.tls.ca, "CA certificate")
    try:
        context.load_verify_locations(cafile=str(job.tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{job.tls.ca}: cannot use as CA certificate: {_ssl_reason(exc)}") from exc
    _load_identity(context, job.party(role), role)


def _load_identity(context: ssl.SSLContext, party: PartySpec, role: Role) -> None:
    if party.cert is None or party.key is None:
        raise TlsError(f"parties.{role}: cert and key are required with tls.enabled (see `vfl certs`)")
    cn = peer_common_name(_load_certificate(party.cert, "certificate"))
    if cn != party.name:
        raise TlsError(f"{party.cert}: certificate CN is {cn!r} but parties.{role}.name is {party.name!r}")
    password = key_password(party)
    _check_key(party, password)
    try:
        context.load_cert_chain(str(party.cert), str(party.key), password=password)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{party.key}: cannot use with {party.cert}: {_ssl_reason(exc)}") from exc


def _load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TlsError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM {what}") from exc


def _check_key(party: PartySpec, password: str | None) -> None:
    """Load the key once with cryptography: its errors say what is wrong, OpenSSL's only that something is."""
    assert party.key is not None
    try:
        data = party.key.read_bytes()
    except OSError as exc:
        raise TlsError(f"{party.key}: cannot read private key: {exc.strerror or exc}") from exc
    try:
        serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError as exc:
        if password:  # a password for a key that has none: harmless, OpenSSL ignores it
            return
        where = (
            " or ".join(str(s) for s in (party.key_password_env, party.key_password_file) if s is not None)
            or "key_password_env in the job"
        )
        raise TlsError(f"{party.key}: the private key is encrypted; set its password via {where}") from exc
    except ValueError as exc:
        problem = "wrong password" if b"ENCRYPTED" in data else "not a PEM private key"
        raise TlsError(f"{party.key}: cannot load private key: {problem}") from exc


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc)


# ---------------------------------------------------------------------------------------------------- names


def peer_common_name(cert: x509.Certificate) -> str | None:
    """The subject's common name: the party name a vfl certificate stands for."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value.decode() if isinstance(value, bytes) else value
