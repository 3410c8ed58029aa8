"""``m3t security check`` on the running test services: nothing open on a fresh ``services
up``, and each kind of opening it is meant to see, made on purpose, is reported (exit 1)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.security import check
from m3t.settings import get_settings
from tests.conftest import settings_env

runner = CliRunner()


@pytest.fixture
def cli_env(settings, monkeypatch):
    """The CLI pointed at the session's services."""
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def run_check(*args: str):
    result = runner.invoke(app, ["security", "check", "--json", *args])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.single_node
def test_a_fresh_installation_has_nothing_open(cli_env):
    code, findings = run_check()
    opened = [f for f in findings if f["status"] == "open"]
    assert code == 0 and not opened, opened
    areas = {f["area"] for f in findings}
    assert areas == {"secrets", "redis", "kafka", "triton", "api"}
    checked = {(f["area"], f["check"]) for f in findings if f["status"] == "ok"}
    assert {
        ("redis", "unauthenticated PING"),
        ("redis", "default user"),
        ("redis", "reader FLUSHALL"),
        ("kafka", "plaintext client on the listener"),
        ("kafka", "plaintext client on the controller"),
        ("triton", "model repository without the key"),
    } <= checked
    shown = json.dumps(findings)
    assert "#" not in shown.replace("#REDACTED", "")  # no password hash is printed


def test_an_api_beyond_loopback_without_tls_is_open(cli_env):
    cli_env.setenv("M3T_API__HOST", "0.0.0.0")
    get_settings.cache_clear()
    code, findings = run_check()
    assert code == 1
    assert any(f["area"] == "api" and f["status"] == "open" for f in findings)


@pytest.mark.single_node
def test_a_secret_readable_by_others_is_open(settings, cli_env):
    secret = next(p for p in settings.secrets_dir.iterdir() if p.is_file())
    secret.chmod(0o644)
    try:
        code, findings = run_check()
    finally:
        secret.chmod(0o600)
    assert code == 1
    assert [f["check"] for f in findings if f["status"] == "open"] == [
        str(secret.relative_to(settings.state_dir))
    ]


def test_a_plaintext_kafka_client_setting_is_open(settings):
    kafka = settings.kafka.model_copy(update={"security_protocol": "PLAINTEXT"})
    findings = check(settings.model_copy(update={"kafka": kafka}))
    assert ("kafka", "security protocol", "open") in {(f.area, f.check, f.status) for f in findings}
