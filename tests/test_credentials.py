"""Credentials are the settings' or generated, never written in the code."""

from __future__ import annotations

import stat

from pydantic import SecretStr

from m3t.credentials import api_token, credential, reader_password, secret_file
from m3t.settings import Settings


def test_a_credential_is_generated_once_readable_by_its_owner_only(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")
    token = api_token(settings)
    assert len(token) >= 40 and api_token(settings) == token  # stable: every process agrees
    assert reader_password(settings) not in ("", token)  # one per name
    path = secret_file(settings, "api-token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert api_token(Settings(state_dir=tmp_path / "other")) != token  # per installation


def test_a_configured_credential_is_used_and_nothing_is_written(tmp_path):
    settings = Settings(state_dir=tmp_path, api={"bearer_token": "from-the-operator"})
    assert api_token(settings) == "from-the-operator"
    assert credential(settings, "x", SecretStr("given")) == "given"
    assert not (tmp_path / "secrets").exists()


def test_no_credential_has_a_default_in_the_settings():
    settings = Settings()
    assert settings.api.bearer_token.get_secret_value() == ""
    assert settings.redis.reader_password.get_secret_value() == ""
