"""The HTTP API's tokens: named, each with a role, kept only as a hash.

A token is 256 random bits, shown once when it is made. The store, ``<secrets>/api-tokens.json``
(owner-only, rewritten whole and renamed into place), keeps each token's name, role, SHA-256
and creation time: a fast hash is enough for random tokens, as nothing short of the token
itself matches its digest. Roles: ``reader`` (scores), ``metrics`` (``/metrics`` only) and
``ingest`` (``POST /fhir`` and its Subscription notifications only: a feed writes events and
reads nothing).

The generated development token (``m3t.credentials.api_token``, the file the demo's curl hint
reads) is registered as ``development``, a reader; the API refuses to listen beyond loopback
while it is registered.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

from m3t.credentials import API_TOKEN, api_token, owner_lock, secret_file, write_secret
from m3t.settings import Settings

ApiRole = Literal["reader", "metrics", "ingest"]
ROLES: tuple[str, ...] = get_args(ApiRole)
DEVELOPMENT = "development"
# Names go into the audit log: short, and nothing that could break a line or a field.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ApiToken:
    name: str
    role: ApiRole
    sha256: str
    created: str  # ISO 8601, UTC
    development: bool = False


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The API's tokens in ``<settings.secrets_dir>/api-tokens.json``.

    Reads follow the file: a token added or revoked by another process (``m3t api token``)
    counts from the next request on.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = settings.secrets_dir / "api-tokens.json"
        self._seen: tuple[int, int, int] | None = None  # inode, mtime, size of the file read
        self._tokens: dict[str, ApiToken] = {}

    def tokens(self) -> list[ApiToken]:
        return sorted(self._current().values(), key=lambda t: t.name)

    def find(self, token: str) -> ApiToken | None:
        """The entry whose digest is the token's; every entry is compared, in constant time."""
        wanted, found = digest(token), None
        for entry in self._current().values():
            if hmac.compare_digest(entry.sha256, wanted):
                found = entry
        return found

    def development(self) -> ApiToken | None:
        return self._current().get(DEVELOPMENT)

    def add(self, name: str, role: str) -> str:
        """A new token named ``name`` with ``role``; the token itself is returned, once."""
        if not NAME.fullmatch(name):
            raise ValueError(f"a token's name is 1-64 letters, digits, '.', '_' or '-': {name!r}")
        if name == DEVELOPMENT:
            raise ValueError(f"{DEVELOPMENT!r} is the generated development token's name")
        if role not in ROLES:
            raise ValueError(f"a token's role is one of {', '.join(ROLES)}, not {role!r}")
        token = secrets.token_urlsafe(32)
        with self._editing() as tokens:
            if name in tokens:
                raise ValueError(f"a token named {name!r} exists: revoke it first")
            tokens[name] = ApiToken(name, role, digest(token), _now())
        return token

    def revoke(self, name: str) -> bool:
        """Remove ``name``'s token (the development token's file too); whether it existed."""
        with self._editing() as tokens:
            existed = tokens.pop(name, None) is not None
        if name == DEVELOPMENT:
            secret_file(self.settings, API_TOKEN).unlink(missing_ok=True)
        return existed

    def development_token(self) -> str:
        """The development token (generated if missing), registered as ``development``."""
        token = api_token(self.settings)
        with self._editing() as tokens:
            entry = tokens.get(DEVELOPMENT)
            if entry is None or entry.sha256 != digest(token):
                tokens[DEVELOPMENT] = ApiToken(
                    DEVELOPMENT, "reader", digest(token), _now(), development=True
                )
        return token

    def _current(self) -> dict[str, ApiToken]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._tokens = None, {}
            return self._tokens
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._tokens, self._seen = self._read(), seen
        return self._tokens

    def _read(self) -> dict[str, ApiToken]:
        try:
            entries = json.loads(self.path.read_text())["tokens"]
        except FileNotFoundError:
            return {}
        return {e["name"]: ApiToken(**e) for e in entries}

    @contextmanager
    def _editing(self):
        """The tokens to change, under a lock; written back whole if they changed."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with owner_lock(folder / ".api-tokens.lock"):
            tokens = self._read()
            before = dict(tokens)
            yield tokens
            if tokens != before:
                self._write(tokens)

    def _write(self, tokens: dict[str, ApiToken]) -> None:
        entries = [dataclasses.asdict(t) for t in tokens.values()]
        write_secret(self.path, json.dumps({"tokens": entries}, indent=1))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
