"""Session fixtures: the real Redis, Kafka and Triton, started on test ports and torn down.

The test services use free ports picked at session start, their own state directory and a
copy of model_repo/ with the tests' stand-in model (tests/triton_models/placeholder) added, so
neither a running `make demo` nor another test session is touched. A service that cannot
start fails the tests that need it with the reason; nothing is skipped.

With ``M3T_TEST_CLUSTER=1`` (``make test-cluster``) the session runs the same tests against a
3-node Kafka cluster and a Redis Cluster of 3 primaries and 3 replicas instead.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from m3t import services
from m3t.services.process import free_ports
from m3t.settings import PROJECT_ROOT, Settings

CLUSTER = os.environ.get("M3T_TEST_CLUSTER", "") in ("1", "true", "yes")


def make_settings(root, cluster: bool = CLUSTER, **overrides) -> Settings:
    """Settings for services under ``root`` on free ports; the clusters' if ``cluster``."""
    redis, kafka, controller, http, grpc, metrics, *more = free_ports(24 if cluster else 6)
    redis_cfg = {"port": redis}
    kafka_cfg = {"port": kafka, "controller_port": controller, "partitions": 4}
    if cluster:
        redis_cfg |= {"cluster_ports": more[:6], "cluster_bus_ports": more[6:12]}
        kafka_cfg |= {"cluster_ports": more[12:15], "cluster_controller_ports": more[15:18]}
    return Settings(
        state_dir=root / "state",
        model_repo=root / "model_repo",
        cluster=cluster,
        redis=redis_cfg,
        kafka=kafka_cfg,
        triton={"http_port": http, "grpc_port": grpc, "metrics_port": metrics},
        **overrides,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """``M3T_*`` variables that point a CLI or a child process at these settings' services,
    state folder (its credentials) and topics."""
    kafka, triton = settings.kafka, settings.triton
    return {
        "M3T_STATE_DIR": str(settings.state_dir),
        "M3T_MODEL_REPO": str(settings.model_repo),
        "M3T_REDIS__PORT": str(settings.redis.port),
        "M3T_KAFKA__PORT": str(kafka.port),
        "M3T_KAFKA__CONTROLLER_PORT": str(kafka.controller_port),
        "M3T_KAFKA__PARTITIONS": str(kafka.partitions),
        "M3T_KAFKA__TOPIC_EVENTS": kafka.topic_events,
        "M3T_KAFKA__TOPIC_DEAD_LETTER": kafka.topic_dead_letter,
        "M3T_KAFKA__TOPIC_SCORES": kafka.topic_scores,
        "M3T_KAFKA__CONSUMER_GROUP": kafka.consumer_group,
        "M3T_KAFKA__TOPIC_ALERTS": kafka.topic_alerts,
        "M3T_KAFKA__ALERTS_GROUP": kafka.alerts_group,
        "M3T_TRITON__HTTP_PORT": str(triton.http_port),
        "M3T_TRITON__GRPC_PORT": str(triton.grpc_port),
        "M3T_TRITON__METRICS_PORT": str(triton.metrics_port),
        **(cluster_env(settings) if settings.cluster else {}),
    }


def cluster_env(settings: Settings) -> dict[str, str]:
    redis, kafka = settings.redis, settings.kafka
    return {
        "M3T_CLUSTER": "1",
        "M3T_REDIS__CLUSTER_PORTS": json.dumps(list(redis.cluster_ports)),
        "M3T_REDIS__CLUSTER_BUS_PORTS": json.dumps(list(redis.cluster_bus_ports)),
        "M3T_KAFKA__CLUSTER_PORTS": json.dumps(list(kafka.cluster_ports)),
        "M3T_KAFKA__CLUSTER_CONTROLLER_PORTS": json.dumps(list(kafka.cluster_controller_ports)),
    }


def replay_all(settings, admissions) -> None:
    """Replay ``admissions`` (each a list of events) onto the settings' events topic, as
    ``m3t ingest replay`` does, and assert none was a dead letter."""
    from ingest.replay import make_producer, replay

    producer = make_producer(settings)
    try:
        summary = replay(
            list(admissions),
            producer,
            settings.kafka.topic_events,
            dead_letter_topic=settings.kafka.topic_dead_letter,
        )
    finally:
        producer.close()
    assert not summary.dead_letters, summary.dead_letters


def consume(settings, topic: str, expected: int, role="stream", wait_ms=15_000) -> list:
    """Up to ``expected`` records of ``topic`` from its start, read with kafka-python (a
    client independent of the project's confluent-kafka code) as ``role``."""
    from kafka import KafkaConsumer

    from m3t.kafka import kafka_python_config

    consumer = KafkaConsumer(
        topic,
        **kafka_python_config(settings, role),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=wait_ms,
    )
    try:
        records = []
        for record in consumer:
            records.append(record)
            if len(records) >= expected:
                break
        return records
    finally:
        consumer.close()


def command_calls(client) -> dict[str, int]:
    """Calls per command the server ran for clients (on a Redis Cluster, its primaries together).

    REPLCONF is left out: a replica acknowledges its primary with it every second, on its own clock.
    """
    from m3t.clients import is_cluster

    if not is_cluster(client):
        return {k: v["calls"] for k, v in client.info("commandstats").items()}
    calls: dict[str, int] = {}
    for stats in client.info("commandstats", target_nodes=client.PRIMARIES).values():
        for k, v in stats.items():
            if k != "cmdstat_replconf":
                calls[k] = calls.get(k, 0) + v["calls"]
    return calls


@pytest.fixture(scope="session")
def services_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("m3t")
    shutil.copytree(PROJECT_ROOT / "model_repo", root / "model_repo")
    shutil.copytree(
        PROJECT_ROOT / "tests" / "triton_models" / "placeholder",
        root / "model_repo" / "placeholder",
    )
    return root


@pytest.fixture(scope="session")
def settings(services_root):
    """Settings whose Redis, Kafka and Triton are up (started once per test session)."""
    cfg = make_settings(services_root)
    try:
        services.up(cfg)
    except services.ServiceError as exc:
        services.down(cfg)
        pytest.fail(f"the test services could not start:\n{exc}", pytrace=False)
    yield cfg
    services.down(cfg)


@pytest.fixture
def redis_client(settings):
    """The admin's client: tests set up and inspect any key."""
    from m3t.clients import redis_client as connect

    client = connect(settings, role="admin")
    yield client
    client.close()


@pytest.fixture
def kafka_bootstrap(settings) -> str:
    return settings.kafka.bootstrap_servers


@pytest.fixture
def triton(settings):
    from m3t.clients import triton_client

    client = triton_client(settings)
    yield client
    client.close()


@pytest.fixture
def isolated_settings(settings):
    """The session's settings with this test's own, freshly created Kafka topics."""
    from m3t.kafka import own_topics

    return own_topics(settings)


@pytest.fixture(scope="session")
def cohort(settings):
    """A small synthetic cohort (every modality), grouped by admission, its images under
    the state folder (an image root)."""
    from features.offline import group_admissions
    from ingest.mimic import MimicReader
    from ingest.synth import generate

    root = settings.state_dir / "stream-cohort"
    generate(root, 24, seed=11, image_size=128)
    return group_admissions(MimicReader(root).admissions())


@pytest.fixture(scope="session")
def deployed(settings, cohort, tmp_path_factory):
    """The cohort's fitted features, and a small M3T-LM published to Triton."""
    from features.offline import CutoffPolicy, build
    from tests.tiny_model import publish_tiny
    from trainer.publish import load_in_triton

    fitted = build(list(cohort.values()), CutoffPolicy((24.0,))).fitted
    onnx_dir = tmp_path_factory.mktemp("stream-onnx")
    model, _, _ = publish_tiny(settings.model_repo, onnx_dir, len(fitted.vocab), seed=3)
    assert all(load_in_triton(settings).values())
    return fitted, model


@pytest.fixture
def scores_restored(redis_client):
    """The scores, histories and ranking entries a test writes are removed afterwards, so
    the tests that read them (the API's, the CLI's) see only their own admissions."""
    from m3t.clients import unlink
    from stream.scores import RANKING_KEY

    def written():
        keys = set(redis_client.scan_iter("m3t:score:*", count=1000))
        return keys | set(redis_client.scan_iter("m3t:score-history:*", count=1000))

    keys, ranked = written(), set(redis_client.zrange(RANKING_KEY, 0, -1))
    yield
    unlink(redis_client, written() - keys)
    added = set(redis_client.zrange(RANKING_KEY, 0, -1)) - ranked
    if added:
        redis_client.zrem(RANKING_KEY, *added)
