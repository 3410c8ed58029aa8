"""Local credentials: the value a setting gives, else one generated on first use.

A generated credential is a random token kept in ``<state_dir>/secrets/<name>``, a file only
its owner can read, so every process of one installation (the services, the worker, the
API, the CLI) agrees on it and none is written in the code or the docs.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import SecretStr

from m3t.settings import Role, Settings


def credential(settings: Settings, name: str, configured: SecretStr) -> str:
    """``configured`` where it is set; else the state folder's ``name``, made if missing."""
    value = configured.get_secret_value()
    if value:
        return value
    path = secret_file(settings, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        _create(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def secret_file(settings: Settings, name: str) -> Path:
    """Where a generated credential is kept."""
    return settings.secrets_dir / name


def _create(path: Path, token: str) -> None:
    # Linked into place whole: a process racing this one reads either no file or the whole
    # token, and the first link wins.
    staged = _staged(path, token.encode())
    try:
        os.link(staged, path)
    except FileExistsError:
        pass
    finally:
        staged.unlink()


def write_secret(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` in a file only its owner may read (a config, key or
    store that holds a secret); a reader sees the old file or the new one, whole."""
    os.replace(_staged(path, data), path)


def _staged(path: Path, data: str | bytes) -> Path:
    """``data`` written and synced to an owner-only file beside ``path``; that file."""
    # Named by process and thread: the cluster's nodes are prepared in parallel threads.
    staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    return staged


@contextmanager
def owner_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (an owner-only file, made if missing): one process
    at a time edits what it guards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def login(settings: Settings, service: str, role: Role) -> tuple[str, str]:
    """The user name and password ``role`` signs in with to ``service`` ("redis", "kafka"):
    the settings' ``<role>_username`` and ``<role>_password`` (the stream's are plain
    ``username`` and ``password``), the password generated where it is empty."""
    group = getattr(settings, service)
    prefix = "" if role == "stream" else f"{role}_"
    username = getattr(group, f"{prefix}username")
    configured = getattr(group, f"{prefix}password")
    return username, credential(settings, f"{service}-{role}-password", configured)


def triton_admin_key(settings: Settings) -> str:
    """The key Triton asks of model loads and unloads."""
    return credential(settings, "triton-admin-key", settings.triton.admin_key)


API_TOKEN = "api-token"


def api_token(settings: Settings) -> str:
    """The HTTP API's bearer token."""
    return credential(settings, API_TOKEN, SecretStr(""))
