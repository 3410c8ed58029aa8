"""Credentials are the settings' or generated, never written in the code; the local CA's keys
are owner-only and its certificates verify."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

from pydantic import BaseModel, SecretStr

from m3t import tls
from m3t.credentials import api_token, credential, login, secret_file, triton_admin_key
from m3t.settings import Settings


def test_a_credential_is_generated_once_readable_by_its_owner_only(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    token = api_token(settings)
    assert len(token) >= 40 and api_token(settings) == token  # stable: every process agrees
    passwords = {login(settings, s, r)[1] for s in ("redis", "kafka") for r in ("admin", "reader")}
    assert len(passwords | {token, triton_admin_key(settings)}) == 6  # one per name
    path = secret_file(settings, "api-token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert api_token(Settings(state_dir=tmp_path / "other")) != token  # per installation


def test_each_role_signs_in_as_its_own_user(tmp_path):
    settings = Settings(state_dir=tmp_path)
    names = {role: login(settings, "kafka", role)[0] for role in ("admin", "stream", "reader")}
    assert names == {"admin": "m3t-admin", "stream": "m3t-stream", "reader": "m3t-reader"}
    assert login(settings, "kafka", "producer")[0] == "m3t-producer"


def test_a_configured_credential_is_used_and_nothing_is_written(tmp_path):
    settings = Settings(state_dir=tmp_path, redis={"reader_password": "from-the-operator"})
    assert login(settings, "redis", "reader") == ("m3t-reader", "from-the-operator")
    assert credential(settings, "x", SecretStr("given")) == "given"
    assert not (tmp_path / "secrets").exists()


def secrets_of(model: BaseModel) -> list[SecretStr]:
    found = []
    for value in model.__dict__.values():
        if isinstance(value, SecretStr):
            found.append(value)
        elif isinstance(value, BaseModel):
            found += secrets_of(value)
    return found


def test_no_credential_has_a_default_in_the_settings():
    found = secrets_of(Settings())
    assert len(found) == 10  # four Redis users, five Kafka users, the Triton key
    assert all(secret.get_secret_value() == "" for secret in found)


def test_the_local_ca_signs_a_certificate_a_client_verifies(tmp_path):
    settings = Settings(state_dir=tmp_path)
    cert, key = tls.server_certificate(settings, "svc", ["127.0.0.1", "localhost"])
    for path in (cert, key, tls.tls_dir(settings) / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (settings.secrets_dir, tls.tls_dir(settings)):  # made by TLS first
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert tls.server_certificate(settings, "svc", ["localhost"]) == (cert, key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(tls.ca_file(settings)))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"hello")

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    ) as conn:
        assert conn.recv(5) == b"hello"
    thread.join()
    listener.close()
    other = Settings(state_dir=tmp_path / "other")
    stranger = ssl.create_default_context(cafile=str(tls.ca_file(other)))
    assert stranger.get_ca_certs()[0] != client.get_ca_certs()[0]


def test_certificates_near_their_end_are_renewed_at_a_start_with_their_ca(tmp_path, monkeypatch):
    from cryptography import x509

    def load(path):
        return x509.load_pem_x509_certificate(path.read_bytes())

    settings = Settings(state_dir=tmp_path)
    svc, _ = tls.server_certificate(settings, "svc", ["localhost"])
    db, _ = tls.server_certificate(settings, "db", ["localhost"])
    old_ca, old_svc, old_db = (p.read_bytes() for p in (tls.ca_file(settings), svc, db))
    tls.server_certificate(settings, "svc", ["localhost"])
    assert svc.read_bytes() == old_svc  # current: kept

    monkeypatch.setattr(tls, "RENEW_DAYS", tls.VALID_DAYS + 1)  # as if their end were near
    tls.server_certificate(settings, "svc", ["localhost"])
    monkeypatch.setattr(tls, "RENEW_DAYS", 30)
    ca = load(tls.ca_file(settings))
    assert tls.ca_file(settings).read_bytes() != old_ca and svc.read_bytes() != old_svc
    load(svc).verify_directly_issued_by(ca)
    assert db.read_bytes() == old_db  # not started since: still the old CA's
    tls.server_certificate(settings, "db", ["localhost"])  # its next start re-signs it
    assert db.read_bytes() != old_db
    load(db).verify_directly_issued_by(ca)
    renewed = svc.read_bytes()
    tls.server_certificate(settings, "svc", ["localhost"])
    assert svc.read_bytes() == renewed
