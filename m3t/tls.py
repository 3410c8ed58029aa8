"""A local certificate authority for the services on this machine.

``m3t services up`` makes one CA and signs each service's certificate with it; clients
trust the CA's certificate (``ca_file``). Keys are owner-only files under the state folder's
``secrets/tls``. Where a setting names an external CA, nothing here is used.

Certificates are renewed when a service starts within ``RENEW_DAYS`` of their end: a leaf,
or the CA and then each leaf it signed at its service's start. Clients read the CA file as
they connect, so a renewed CA wants every service restarted (``m3t services down``, ``up``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from m3t.credentials import owner_lock, write_secret
from m3t.settings import Settings

VALID_DAYS = 825  # the longest life browsers and most TLS stacks accept for a leaf
RENEW_DAYS = 30  # renewed at a start within this long of the end


def tls_dir(settings: Settings) -> Path:
    return settings.secrets_dir / "tls"


def ca_file(settings: Settings) -> Path:
    """The local CA's certificate (made on first use)."""
    path = tls_dir(settings) / "ca.crt"
    if not path.exists():
        with _locked(tls_dir(settings)):
            if not path.exists():
                _make_ca(tls_dir(settings))
    return path


def server_certificate(
    settings: Settings, name: str, hosts: list[str], *, client: bool = False
) -> tuple[Path, Path]:
    """``(certificate, key)`` PEM files for ``name``, signed by the local CA and valid for
    ``hosts`` (names or IP addresses); ``client=True`` lets it also authenticate as a client
    (a broker to its controller). Made once; remade when the hosts change."""
    folder = tls_dir(settings)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    ca_file(settings)  # made before the lock, which it takes itself
    with _locked(folder):
        ca_cert, ca_key = _load_ca(settings)
        if _ending(ca_cert):
            _make_ca(folder)
            ca_cert, ca_key = _load_ca(settings)
        current = cert_path.exists() and key_path.exists() and _current(cert_path, hosts, ca_cert)
        if not current:
            _sign(cert_path, key_path, name, hosts, client, ca_cert, ca_key)
    return cert_path, key_path


def _sign(cert_path, key_path, name, hosts, client, ca_cert, ca_key) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, ca_cert.subject)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        .add_extension(x509.ExtendedKeyUsage(usages), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _private(folder: Path) -> None:
    """``folder`` and the secrets folder above it, owner-only (``mkdir(parents=True)`` would
    give the parent the default mode)."""
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)


def _locked(folder: Path):
    """One process at a time makes keys here (the services start in parallel)."""
    _private(folder)
    return owner_lock(folder / ".lock")


def _make_ca(folder: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m3t-stream local CA")])
    cert = (
        _builder(name, key, name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _pem_key(key))
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(settings: Settings):
    cert = x509.load_pem_x509_certificate(ca_file(settings).read_bytes())
    key = serialization.load_pem_private_key((tls_dir(settings) / "ca.key").read_bytes(), None)
    return cert, key


def _builder(subject: x509.Name, key, issuer: x509.Name) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _current(cert_path: Path, hosts: list[str], ca_cert: x509.Certificate) -> bool:
    """Whether the certificate names every host, is signed by this CA and is not ending."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return set(map(_general_name, hosts)) <= set(names) and not _ending(cert)


def _ending(cert: x509.Certificate) -> bool:
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return left < dt.timedelta(days=RENEW_DAYS)


def _pem_key(key) -> bytes:
    # PKCS#8: the form Java (Kafka's PEM keystores), OpenSSL and Python all read.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes) -> None:
    _private(path.parent)
    write_secret(path, data)
