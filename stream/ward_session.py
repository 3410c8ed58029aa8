"""The ward pages' sessions: a signed cookie given for an API token posted to the login form.

The cookie holds the token's name, an expiry and an HMAC-SHA256 over both and the token's
digest, keyed with a secret generated into the state folder (``ward-session-key``). Nothing
is stored server-side, so the API's Redis user stays read-only; a session ends when it
expires, when its token is revoked or replaced (the digest no longer matches), or when the
key is rotated. The token itself never leaves the login request.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from pydantic import SecretStr

from m3t.credentials import credential
from m3t.settings import Settings
from stream.api_tokens import ApiToken, TokenStore

COOKIE = "m3t_ward_session"
KEY_NAME = "ward-session-key"


@dataclass(frozen=True)
class Session:
    token: ApiToken
    expires: int  # epoch seconds


class Sessions:
    """Issue and check session cookies for ``tokens``' entries, valid ``ttl_s`` seconds."""

    def __init__(self, settings: Settings, tokens: TokenStore):
        self.tokens = tokens
        self.ttl_s = settings.api.session_ttl_s
        self._key = credential(settings, KEY_NAME, SecretStr("")).encode()

    def issue(self, token: ApiToken, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return f"{token.name}.{expires}.{self._sign(token, expires)}"

    def check(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The cookie's session if it is signed by this key, unexpired and its token still
        registered unchanged; else None."""
        if not cookie:
            return None
        try:
            name, expires_text, signature = cookie.rsplit(".", 2)
            expires = int(expires_text)
        except ValueError:
            return None
        token = next((t for t in self.tokens.tokens() if t.name == name), None)
        if token is None or token.role != "reader":
            return None
        if not hmac.compare_digest(signature.encode(), self._sign(token, expires).encode()):
            return None  # as bytes: a str with non-ASCII raises TypeError
        if expires <= (time.time() if now is None else now):
            return None
        return Session(token, expires)

    def _sign(self, token: ApiToken, expires: int) -> str:
        message = f"{token.name}\n{expires}\n{token.sha256}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()
