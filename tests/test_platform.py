"""Issue 2: settings, the real services, the CLI, and the walking skeleton."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from typer.testing import CliRunner

from app.cli import app
from m3t import services
from m3t.kafka import kafka_python_config
from m3t.services.process import pid_alive
from m3t.settings import Settings, get_settings
from tests.conftest import free_ports, make_settings, settings_env

runner = CliRunner()


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M3T_KAFKA__PORT", "39999")
    monkeypatch.setenv("M3T_KAFKA__TOPIC_EVENTS", "custom-events")
    monkeypatch.setenv("M3T_REDIS__USERNAME", "worker")
    monkeypatch.setenv("M3T_REDIS__PASSWORD", "s3cret")
    monkeypatch.setenv("M3T_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("M3T_TRITON__MODEL_NAME", "other")
    s = Settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:39999"
    assert s.kafka.topic_events == "custom-events"
    assert s.redis.username == "worker" and s.redis.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)  # secrets never print
    assert s.state_dir == tmp_path and s.logs_dir == tmp_path / "logs"
    assert s.triton.model_name == "other"
    # The constructor wins over the environment (how tests override).
    assert Settings(kafka={"port": 1234}).kafka.port == 1234


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError):
        Settings(kafak={"port": 1})


def test_kafka_round_trip(isolated_settings):
    settings = isolated_settings
    topic = settings.kafka.topic_events
    marker = uuid.uuid4().hex
    producer = KafkaProducer(**kafka_python_config(settings, "producer"), acks="all")
    for i in range(10):
        producer.send(topic, key=b"42", value=f"{marker}:{i}".encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        topic,
        **kafka_python_config(settings, "stream"),
        group_id=settings.kafka.consumer_group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    got = [m.value.decode() for m in consumer if m.value.decode().startswith(marker)]
    consumer.close()
    assert got == [f"{marker}:{i}" for i in range(10)]  # one key: one partition, in order


def test_topics_created_with_partitions(settings):
    consumer = KafkaConsumer(**kafka_python_config(settings, "admin"))  # it sees them all
    described = {t: len(consumer.partitions_for_topic(t) or ()) for t in settings.kafka.topics}
    consumer.close()
    assert described == {t: settings.kafka.partitions for t in settings.kafka.topics}


def test_redis_rewrites_its_append_only_file_at_the_configured_size(settings, redis_client):
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    size = redis_client.config_get("auto-aof-rewrite-min-size")["auto-aof-rewrite-min-size"]
    assert int(size) == 1 << 30 and settings.redis.aof_rewrite_min_size == "1gb"


@pytest.mark.single_node
def test_commands_go_in_one_write_and_every_reply_is_read(settings, redis_client):
    from m3t.clients import Commands, mget, send
    from m3t.clients import redis_client as connect

    keys = [f"m3t:test-send:{{{i}}}".encode() for i in range(300)]
    redis_client.mset({k: b"v%d" % i for i, k in enumerate(keys[:200])})
    try:
        assert mget(redis_client, keys) == [b"v%d" % i for i in range(200)] + [None] * 100
        assert mget(redis_client, []) == []

        # An error reply is raised after the other replies are read: the connection stays
        # in step and the commands around it ran.
        commands = Commands()
        commands.evalsha("0" * 40, 0)  # no such script
        commands.mget(keys[:2])
        before = redis_client.info("commandstats").get("cmdstat_mget", {"calls": 0})["calls"]
        with pytest.raises(redis.exceptions.NoScriptError):
            send(redis_client, commands)
        assert redis_client.info("commandstats")["cmdstat_mget"]["calls"] == before + 1
        assert mget(redis_client, keys[:1]) == [b"v0"]

        # A pooled connection the server dropped is replaced before the commands go.
        other = connect(settings, role="admin")
        assert other.client_kill_filter(_id=redis_client.client_id()) == 1
        other.close()
        assert mget(redis_client, keys[:3]) == [b"v0", b"v1", b"v2"]
    finally:
        redis_client.delete(*keys[:200])


def _loaded_incrby(redis_client):
    """A script adding ARGV[1] to KEYS[1], loaded in the server's script cache."""
    from m3t.clients import LuaScript

    script = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    redis_client.script_load(script.source)
    return script


@pytest.mark.single_node
def test_a_transaction_runs_its_commands_at_once_and_raises_the_first_error(redis_client):
    # One MULTI/EXEC: Redis appends it to its file, and under appendfsync always syncs it,
    # once; the commands' own replies come back.
    import hiredis

    from m3t.clients import Commands, send

    keys = [f"m3t:test-atomic:{{{i}}}".encode() for i in range(3)]
    incr = _loaded_incrby(redis_client)
    try:
        redis_client.config_resetstat()
        commands = Commands()
        for i, key in enumerate(keys):
            incr(commands, [key], [i + 1])
        assert send(redis_client, commands, atomic=True) == [1, 2, 3]
        stats = redis_client.info("commandstats")
        assert stats["cmdstat_multi"]["calls"] == stats["cmdstat_exec"]["calls"] == 1
        assert stats["cmdstat_evalsha"]["calls"] == 3

        # An error reply inside it is raised once every reply is read; the others ran, and
        # the connection is still in step.
        commands = Commands()
        incr(commands, [keys[0]], [10])
        commands.evalsha("0" * 40, 0)  # no such script
        with pytest.raises(redis.exceptions.NoScriptError):
            send(redis_client, commands, atomic=True)
        assert redis_client.get(keys[0]) == b"11"

        # A command refused as it is queued: none of them runs, and the refusal is raised
        # (not EXEC's EXECABORT).
        commands = Commands()
        incr(commands, [keys[0]], [100])
        commands.append(hiredis.pack_command(("GET",)))  # wrong number of arguments
        with pytest.raises(redis.exceptions.ResponseError, match="wrong number of arguments"):
            send(redis_client, commands, atomic=True)
        assert redis_client.get(keys[0]) == b"11"

        # One command alone needs no transaction.
        redis_client.config_resetstat()
        commands = Commands()
        incr(commands, [keys[1]], [1])
        assert send(redis_client, commands, atomic=True) == [3]
        assert "cmdstat_multi" not in redis_client.info("commandstats")
    finally:
        redis_client.delete(*keys)


@pytest.mark.single_node
def test_a_user_refused_multi_still_has_its_commands_run_one_by_one(settings, redis_client):
    # An external Redis whose ACL for the stream predates transactions: the writes go on.
    from m3t.clients import Commands, send

    user, password = f"m3t-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    key = f"m3t:test-unwrapped:{{{user}}}".encode()
    incr = _loaded_incrby(redis_client)
    redis_client.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=[key.decode()],
        commands=["+evalsha", "+incrby", "+get"],
    )
    client = redis.Redis(
        host=settings.redis.host, port=settings.redis.port, username=user, password=password
    )
    try:
        commands = Commands()
        incr(commands, [key], [1])
        incr(commands, [key], [2])
        assert send(client, commands, atomic=True) == [1, 3]
        assert client.get(key) == b"3"
    finally:
        client.close()
        redis_client.acl_deluser(user)
        redis_client.delete(key)


def test_triton_health_and_inference(triton):
    import tritonclient.grpc as grpcclient

    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("placeholder")
    summary = np.array([[50.0, 10.0], [80.0, 0.0]], dtype=np.float32)
    tensor = grpcclient.InferInput("summary", summary.shape, "FP32")
    tensor.set_data_from_numpy(summary)
    result = triton.infer("placeholder", [tensor])
    np.testing.assert_allclose(
        result.as_numpy("los_remaining_days")[:, 0],
        2.0 + 0.05 * summary[:, 0] + 0.1 * summary[:, 1],
        rtol=1e-6,
    )
    logit = -6.0 + 0.05 * summary[:, 0] + 0.02 * summary[:, 1]
    np.testing.assert_allclose(
        result.as_numpy("mortality_prob")[:, 0], 1 / (1 + np.exp(-logit)), rtol=1e-5
    )


def _service_processes(cfg: Settings) -> list[int]:
    """Every live process whose command line names this settings' state directory or ports."""
    from pathlib import Path

    marks = [str(cfg.state_dir), f"--grpc-port={cfg.triton.grpc_port}"]
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(m in cmd for m in marks) and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def test_up_twice_down_leaves_nothing(tmp_path, settings):
    import shutil

    shutil.copytree(settings.model_repo, tmp_path / "model_repo")
    cfg = make_settings(tmp_path)
    try:
        first = services.up(cfg)
        second = services.up(cfg)
        assert all(h.healthy for h in first + second)
        assert [h.pid for h in first] == [h.pid for h in second]  # no duplicates started
        assert len(_service_processes(cfg)) >= 3
        # Each service's processes: a cluster's, each node's (what the benchmarks meter).
        pids = [pid for service in services.select(cfg) for pid in service.pids()]
        assert len(set(pids)) == (1 + 3 + 6 if cfg.cluster else 3)
        assert all(pid_alive(pid) for pid in pids)
    finally:
        stopped = services.down(cfg)
    assert stopped == {"triton": True, "kafka": True, "redis": True}
    assert [service.pids() for service in services.select(cfg)] == [[], [], []]
    assert not any(pid_alive(pid) for pid in pids)
    assert _service_processes(cfg) == []
    assert not any(h.healthy for h in services.status(cfg))
    assert services.down(cfg) == {"triton": False, "kafka": False, "redis": False}


def test_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        cfg = Settings(state_dir=tmp_path, redis={"port": port})
        with pytest.raises(services.ServiceError, match=f"port 127.0.0.1:{port} is taken"):
            services.up(cfg, ["redis"])


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, java or mvn here
    cfg = make_settings(tmp_path)
    with pytest.raises(services.ServiceError, match="redis-server is not installed"):
        services.up(cfg, ["redis"])
    with pytest.raises(services.ServiceError, match="Java is missing"):
        services.up(cfg, ["kafka"])


@pytest.fixture
def cli_settings(isolated_settings, monkeypatch):
    """Point the in-process CLI at the test services (and this test's topics) through
    M3T_* variables."""
    for k, v in settings_env(isolated_settings).items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_cli_help_lists_every_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in [
        "services",
        "ingest",
        "features",
        "train",
        "export",
        "stream",
        "scores",
        "api",
        "bench",
        "demo",
    ]:
        assert group in result.output


def test_cli_status_json(cli_settings):
    result = runner.invoke(app, ["services", "status", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert set(status) == {"redis", "kafka", "triton"}
    assert all(s["healthy"] is True for s in status.values())
    assert status["kafka"]["address"] == cli_settings.kafka.bootstrap_servers


def test_cli_status_fails_when_unhealthy(tmp_path, monkeypatch):
    monkeypatch.setenv("M3T_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["services", "status", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert all(s["healthy"] is False for s in json.loads(result.output).values())


def test_walking_skeleton_end_to_end(cli_settings, redis_client):
    """Events -> Kafka -> worker -> Redis features -> Triton -> scores -> `m3t scores get`."""
    from rich.console import Console

    from stream.cli import scores_table
    from stream.scores import SCORE_KEY, ScoreStore
    from stream.scoring import ModelScorer
    from stream.wiring import connect
    from tests.skeleton import SkeletonFeatures, produce, skeleton_events

    events = skeleton_events(3)
    produce(cli_settings, events)
    produce(cli_settings, events[:4])  # a redelivered prefix must change nothing
    store = ScoreStore(redis_client)
    worker = connect(
        cli_settings,
        SkeletonFeatures(redis_client),
        ModelScorer(cli_settings, "placeholder"),
        store,
    )
    stats = worker.run(stop_after=len(events) + 4, idle_timeout_s=30.0)
    assert stats.events == len(events) + 4 and stats.dead_letters == 0
    for i, hadm in enumerate(sorted({e.hadm_id for e in events})):
        observations = 2 * i + 1
        age = 40 + 10 * i
        score = store.get(hadm)
        assert score is not None and score.model == "placeholder:1"
        remaining = 2.0 + 0.05 * age + 0.1 * observations
        assert score.los_remaining_days == pytest.approx(remaining, rel=1e-6)
        # In Redis as written: the newest event's time plus the predicted remaining stay.
        stored = redis_client.hgetall(SCORE_KEY.format(hadm_id=hadm))
        newest = max(e.event_time for e in events if e.hadm_id == hadm).timestamp()
        assert float(stored[b"feature_time"]) == newest
        discharge = newest + float(stored[b"los_remaining_days"]) * 86400
        assert float(stored[b"expected_discharge"]) == discharge
        # As `m3t scores get|top|watch` show it.
        shown = Console(width=200, record=True)
        shown.print(scores_table([score]))
        text = shown.export_text()
        assert "remaining (d)" in text and f"{remaining:.1f}" in text
        assert datetime.fromtimestamp(discharge, UTC).strftime("%Y-%m-%dT%H:%MZ") in text
    result = runner.invoke(app, ["scores", "get", str(events[0].hadm_id), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["hadm_id"] == events[0].hadm_id
    assert got["expected_discharge"] == got["feature_time"] + got["los_remaining_days"] * 86400
    # Each written score is on the scores topic too, with both figures.
    consumer = KafkaConsumer(
        cli_settings.kafka.topic_scores,
        **kafka_python_config(cli_settings, "admin"),
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        group_id=f"scores-{uuid.uuid4().hex}",
    )
    published = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert {m["hadm_id"] for m in published} == {e.hadm_id for e in events}
    for m in published:
        assert m["expected_discharge"] == m["feature_time"] + m["los_remaining_days"] * 86400
    assert got in published  # the stored score is one the topic carried
    missing = runner.invoke(app, ["scores", "get", "1"])
    assert missing.exit_code == 1


def test_poison_event_goes_to_dead_letter(cli_settings, redis_client):
    from stream.scores import ScoreStore
    from stream.scoring import ModelScorer
    from stream.wiring import connect
    from tests.skeleton import SkeletonFeatures

    marker = uuid.uuid4().hex
    producer = KafkaProducer(**kafka_python_config(cli_settings, "producer"))
    producer.send(cli_settings.kafka.topic_events, key=marker.encode(), value=b"{not json")
    producer.send(
        cli_settings.kafka.topic_events,
        key=marker.encode(),
        value=json.dumps({"schema_version": 1, "type": "admission"}).encode(),
    )
    producer.flush()
    producer.close()
    worker = connect(
        cli_settings,
        SkeletonFeatures(redis_client),
        ModelScorer(cli_settings, "placeholder"),
        ScoreStore(redis_client),
    )
    stats = worker.run(stop_after=2, idle_timeout_s=30.0)
    # As `m3t stream run` prints them.
    reasons = dataclasses.asdict(stats)["dead_letter_reasons"]
    assert reasons == {"malformed_json": 1, "schema_violation": 1}
    consumer = KafkaConsumer(
        cli_settings.kafka.topic_dead_letter,
        **kafka_python_config(cli_settings, "admin"),  # as `m3t stream dead-letters` reads
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        group_id=f"dl-{marker}",
    )
    keyed = hashlib.sha256(marker.encode()).hexdigest().encode()  # no admission id: its hash
    letters = [json.loads(m.value) for m in consumer if m.key == keyed]
    consumer.close()
    assert sorted(letter["reason"] for letter in letters) == ["malformed_json", "schema_violation"]
    assert all(letter["detail"] is not None and "offset" in letter for letter in letters)
    # The operator's view: counts by reason and the latest letters, without their payload.
    result = runner.invoke(app, ["stream", "dead-letters", "--json", "--latest", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["topic"] == cli_settings.kafka.topic_dead_letter and summary["complete"]
    assert summary["by_reason"] == {"malformed_json": 1, "schema_violation": 1}
    assert {letter["reason"] for letter in summary["latest"]} == set(summary["by_reason"])
    assert not any("value_b64" in letter for letter in summary["latest"])
    table = runner.invoke(app, ["stream", "dead-letters"])
    assert table.exit_code == 0 and "malformed_json" in table.output


def test_http_api_contract(cli_settings, redis_client):
    """`m3t stream api` served by uvicorn in its own process, queried over HTTP."""
    import httpx

    from stream.api_tokens import TokenStore
    from stream.metrics import METRICS_KEY
    from stream.scores import RiskScore, ScoreStore

    store = ScoreStore(redis_client)
    store.write_batch(
        [
            RiskScore.predicted(777, 4.5, 0.25, "m:1", 100.0, 101.0),
            RiskScore.predicted(778, 2.0, 0.75, "m:1", 100.0, 101.0),
        ]
    )
    store.write_batch(
        [RiskScore.predicted(777, 9.9, 0.99, "m:1", 50.0, 102.0)]
    )  # older features: skipped
    redis_client.hset(
        METRICS_KEY,
        "w1",
        json.dumps(
            {
                "counters": {
                    "events": 10,
                    "dead_letters": 1,
                    "scored": 4,
                    "batches": 2,
                    "commits": 2,
                },
                "latency": {"bounds": [0.1, 1.0], "counts": [3, 1, 0], "sum": 0.9},
                "batch_size": {"bounds": [1, 2], "counts": [0, 2, 0], "sum": 4},
                "lag": {"events:0": 5},
                "dead_letter_reasons": {"malformed_json": 1},
                "events_per_s": 12.5,
                "updated": time.time(),
            }
        ),
    )
    tokens = TokenStore(cli_settings)
    reader = {"Authorization": f"Bearer {tokens.development_token()}"}
    scraper = {"Authorization": f"Bearer {tokens.add(f'scraper-{uuid.uuid4().hex}', 'metrics')}"}
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "stream", "api", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                health = api.get("/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the API did not start listening in 60 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        for path in ["/admissions/777/risk", "/risk/top?n=2", "/metrics"]:
            assert api.get(path).status_code == 401
            assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        risk = api.get("/admissions/777/risk", headers=reader).json()
        assert risk["los_remaining_days"] == 4.5 and risk["mortality_prob"] == 0.25
        assert risk["feature_time"] == 100.0 and risk["expected_discharge"] == 100.0 + 4.5 * 86400
        assert api.get("/admissions/1/risk", headers=reader).status_code == 404
        # Other tests' admissions may share the ranking: these two keep their order in it.
        top = [r["hadm_id"] for r in api.get("/risk/top?n=1000", headers=reader).json()]
        assert [h for h in top if h in (777, 778)] == [778, 777]
        assert len(api.get("/risk/top?n=2", headers=reader).json()) == 2
        assert api.get("/risk/top?n=0", headers=reader).status_code == 422
        metrics = api.get("/metrics", headers=scraper).text
        assert 'm3t_events_total{worker="w1"} 10.0' in metrics
        assert 'm3t_consumer_lag{partition="events:0",worker="w1"} 5.0' in metrics
        assert 'm3t_scoring_latency_bucket{le="1.0",worker="w1"} 4.0' in metrics
        assert 'm3t_events_per_second{worker="w1"} 12.5' in metrics
        assert (
            'm3t_dead_letters_by_reason_total{reason="malformed_json",worker="w1"} 1.0' in metrics
        )
        # Failed sign-ins are limited by the socket's address: a forwarded-for header, each
        # time another, does not make the same client someone new (last: it blocks the rest).
        refused = [
            api.get(
                "/risk/top",
                headers={"Authorization": "Bearer wrong", "X-Forwarded-For": f"10.0.0.{i}"},
            ).status_code
            for i in range(40)
        ]
        assert 429 in refused and refused[-1] == 429
    finally:
        api.close()
        server.terminate()
        server.wait(30)
        redis_client.hdel(METRICS_KEY, "w1")
