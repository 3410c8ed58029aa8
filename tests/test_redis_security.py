"""Redis's users, each tried at what it must not do (issue 17), through redis-py and through
redis-cli (an independent client); and Redis over TLS, verified against the local CA."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
import redis

from m3t import services, tls
from m3t.clients import redis_client as connect
from m3t.credentials import login
from tests.conftest import make_settings

REDIS_CLI = shutil.which("redis-cli")
SCORE, FEATURE = "m3t:score:{7001}", "m3t:v1-abc-def:3:{7001}:m"


def cli(settings, *command: str, role: str | None = None, tls_on: bool = False) -> str:
    """redis-cli's reply (stdout and stderr); the password goes through REDISCLI_AUTH, not argv."""
    assert REDIS_CLI, "redis-cli is missing: make setup installs redis-tools"
    cfg = settings.redis
    args = [REDIS_CLI, "-h", cfg.host, "-p", str(cfg.port), "--no-auth-warning"]
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if role is not None:
        username, env["REDISCLI_AUTH"] = login(settings, "redis", role)
        args += ["--user", username]
    if tls_on:
        args += ["--tls", "--cacert", str(tls.ca_file(settings))]
    done = subprocess.run([*args, *command], capture_output=True, text=True, env=env, timeout=30)
    return (done.stdout + done.stderr).strip()


@pytest.fixture
def keys(redis_client):
    redis_client.hset(SCORE, mapping={"mortality_prob": "0.2"})
    redis_client.set(FEATURE, b"feature state")
    yield
    redis_client.delete(SCORE, FEATURE)


@pytest.mark.parametrize(
    "command",
    [
        ["FLUSHALL"],
        ["KEYS", "*"],
        ["SCAN", "0"],
        ["GET", FEATURE],
        ["HSET", SCORE, "mortality_prob", "0.9"],
        ["SET", "m3t:risk:inpatients", "1"],
        ["CLIENT", "KILL", "ID", "1"],
    ],
)
def test_the_alerts_user_keeps_its_alert_keys_and_only_reads_scores(
    settings, keys, redis_client, command
):
    alerts = connect(settings, role="alerts")
    with pytest.raises(redis.exceptions.NoPermissionError):
        alerts.execute_command(*command)
    assert alerts.hget(SCORE, "mortality_prob") == b"0.2"
    assert alerts.hset("m3t:alert:{7001}", "feature_time", "1") == 1
    alerts.close()
    redis_client.delete("m3t:alert:{7001}")


@pytest.mark.single_node
def test_an_unauthenticated_connection_cannot_even_ping(settings):
    assert "NOAUTH" in cli(settings, "PING")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=settings.redis.host, port=settings.redis.port).ping()


@pytest.mark.single_node
@pytest.mark.parametrize(
    "command",
    [
        ["FLUSHALL"],
        ["CONFIG", "GET", "maxmemory"],
        ["CLIENT", "KILL", "ID", "1"],
        ["CLIENT", "PAUSE", "10"],
        ["GET", FEATURE],
        ["SCAN", "0"],
        ["KEYS", "*"],
        ["HSET", SCORE, "mortality_prob", "0.9"],
        ["MONITOR"],
        ["ACL", "LIST"],
    ],
)
def test_the_query_user_reads_scores_and_nothing_else(settings, keys, command):
    reader = connect(settings, role="reader")
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.execute_command(*command)
    assert "NOPERM" in cli(settings, *command, role="reader")
    assert reader.hget(SCORE, "mortality_prob") == b"0.2"
    reader.close()


@pytest.mark.parametrize(
    "command",
    [
        ["FLUSHALL"],
        ["CONFIG", "SET", "appendonly", "no"],
        ["ACL", "SETUSER", "intruder", "on", ">pw", "+@all"],
        ["CLIENT", "KILL", "ID", "1"],
        ["KEYS", "*"],
        ["SET", "outside-the-namespace", "1"],
        ["SHUTDOWN"],
    ],
)
def test_the_stream_user_writes_its_keys_and_nothing_else(settings, keys, command):
    writer = connect(settings, role="stream")
    with pytest.raises(redis.exceptions.NoPermissionError):
        writer.execute_command(*command)
    assert writer.get(FEATURE) == b"feature state" and writer.exists(SCORE) == 1
    writer.close()


@pytest.mark.single_node
def test_only_the_admin_sees_the_users_and_the_default_user_is_off(settings, redis_client):
    users = {line.split()[1]: line for line in redis_client.acl_list()}
    assert set(users) == {"default", "m3t-admin", "m3t-stream", "m3t-reader", "m3t-alerts"}
    assert " off " in users["default"] and "nopass" not in " ".join(users.values())
    conf = settings.state_dir / "redis" / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it holds the passwords


@pytest.mark.single_node
def test_redis_over_tls_serves_verified_clients_only(tmp_path):
    plain = make_settings(tmp_path)
    settings = plain.model_copy(update={"redis": plain.redis.model_copy(update={"tls": True})})
    services.up(settings, ["redis"])
    try:
        client = connect(settings)
        assert client.set("m3t:tls-probe", "1") and client.get("m3t:tls-probe") == b"1"
        client.close()
        assert cli(settings, "GET", "m3t:tls-probe", role="stream", tls_on=True) == "1"
        plaintext = cli(settings, "PING", role="stream")
        assert "PONG" not in plaintext  # the TLS port does not speak plain RESP
        stranger = make_settings(tmp_path / "stranger")  # a CA this server does not chain to
        untrusting = redis.Redis(
            host=settings.redis.host,
            port=settings.redis.port,
            ssl=True,
            ssl_ca_certs=str(tls.ca_file(stranger)),
            socket_timeout=5,
        )
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            untrusting.ping()
    finally:
        services.down(settings, ["redis"])


@pytest.mark.single_node
def test_a_killed_redis_comes_back_with_every_scripted_write(tmp_path):
    # Lua scripts' effects sit in the AOF as MULTI/EXEC blocks, replayed under the default
    # user's rules: the default user must stay off yet able to replay them.
    import signal

    from features.online import OnlineStore
    from m3t.services.process import port_open, wait_until
    from tests.test_features_online import COHORT, FITTED

    settings = make_settings(tmp_path)
    services.up(settings, ["redis"])
    try:
        store = OnlineStore(connect(settings), FITTED)
        hadm_ids = list(COHORT)[:5]
        store.write_batch([e for h in hadm_ids for e in COHORT[h]])
        before = store.read_inputs(hadm_ids)
        os.killpg(services.SERVICES["redis"](settings).pid(), signal.SIGKILL)
        assert wait_until(lambda: not port_open(settings.redis.host, settings.redis.port), 30)
        services.up(settings, ["redis"])
        after = OnlineStore(connect(settings), FITTED).read_inputs(hadm_ids)
        assert all((before[name] == after[name]).all() for name in before)
        assert "NOPERM" not in (settings.logs_dir / "redis.log").read_text()
        assert "WRONGPASS" in cli(settings, "AUTH", "default", "")  # nobody signs in as it
    finally:
        services.down(settings, ["redis"])
