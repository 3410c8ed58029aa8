"""Issue 17, Kafka: SCRAM over TLS on the client listener, mutual TLS alone on the
controller's, one principal per role allowed the least it needs, each topic's retention from
the settings, and a data folder left by an older plaintext install formatted afresh.

Refusals and successes are checked with kcat (an independent client) where it can tell
them apart, else with librdkafka's own error codes.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    ResourceType,
    ScramMechanism,
    UserScramCredentialDeletion,
)
from pydantic import SecretStr

from m3t import kafka, services
from m3t.credentials import login
from m3t.services.kafka_broker import KafkaBroker
from tests.conftest import make_settings
from tests.kcat import kcat

pytestmark = pytest.mark.services


def kcat_metadata(settings, role, *args: str):
    return kcat(
        settings, role, "-L", "-J", "-m", "5", *args, capture_output=True, text=True, timeout=60
    )


def delivery_errors(producer, topic: str, value: bytes = b"{}") -> list:
    """The delivery report of one record: ``[None]`` where it was taken."""
    reports: list = []
    producer.produce(topic, value, on_delivery=lambda error, _: reports.append(error))
    producer.flush(30)
    return [None if e is None else e.code() for e in reports]


def first_record(settings, role, group: str, topic: str):
    """The value of the first record ``role`` reads of ``topic`` in consumer group ``group``,
    its offset committed; or the error code the broker answered."""
    consumer = kafka.consumer(settings, role=role, group_id=group, client_id=f"t-{role}")
    consumer.subscribe([topic])
    try:
        for _ in range(60):
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                return message.error().code()
            consumer.commit(message, asynchronous=False)
            return message.value()
    finally:
        consumer.close()


# --------------------------------------------------------------------------- who gets in


def test_a_plaintext_client_gets_no_metadata(settings):
    plaintext = ["-b", settings.kafka.bootstrap_servers, "-X", "security.protocol=plaintext"]
    result = kcat_metadata(settings, None, *plaintext)
    assert result.returncode != 0 and "Failed to acquire metadata" in result.stderr
    assert "topics" not in result.stdout
    client = AdminClient({"bootstrap.servers": settings.kafka.bootstrap_servers})
    with pytest.raises(KafkaException):
        client.list_topics(timeout=3)


@pytest.mark.single_node
def test_the_controller_port_takes_only_clients_with_a_certificate_from_the_ca(settings):
    controller = ["-b", f"{settings.kafka.host}:{settings.kafka.controller_port}"]
    plaintext = kcat_metadata(settings, None, *controller, "-X", "security.protocol=plaintext")
    assert plaintext.returncode != 0 and "Failed to acquire metadata" in plaintext.stderr
    ca = f"ssl.ca.location={kafka.ca_file(settings)}"
    tls_alone = kcat_metadata(settings, None, *controller, "-X", "security.protocol=ssl", "-X", ca)
    assert tls_alone.returncode != 0 and "certificate" in tls_alone.stderr
    assert "brokers" not in plaintext.stdout + tls_alone.stdout


def test_a_wrong_password_is_refused(settings):
    errors: list = []
    config = kafka.client_config(settings, "reader") | {"sasl.password": "not-the-password"}
    client = AdminClient({**config, "error_cb": errors.append})
    with pytest.raises(KafkaException):
        client.list_topics(timeout=5)
    client.poll(1)  # serves the error callbacks
    assert KafkaError._AUTHENTICATION in {e.code() for e in errors}


def test_each_role_sees_only_the_topics_it_uses(settings):
    cfg = settings.kafka
    seen = {}
    for role in ("stream", "producer", "reader", "alerts"):
        result = kcat_metadata(settings, role)
        assert result.returncode == 0, result.stderr
        seen[role] = {t["topic"] for t in json.loads(result.stdout)["topics"]}
    # Other tests' topics carry grants of their own: only the project's are compared.
    project = set(cfg.topics)
    assert seen["reader"] & project == {cfg.topic_scores, cfg.topic_alerts}
    assert seen["alerts"] & project == {cfg.topic_scores, cfg.topic_alerts}
    assert seen["producer"] & project == {cfg.topic_events, cfg.topic_dead_letter}
    assert seen["stream"] & project == {cfg.topic_events, cfg.topic_dead_letter, cfg.topic_scores}
    assert not any("__consumer_offsets" in topics for topics in seen.values())


@pytest.mark.single_node
def test_no_secret_on_the_brokers_command_line_and_its_files_are_owner_only(settings):
    broker = KafkaBroker(settings)
    for name in ("server.properties", "keystore.pem", "admin-credential.json"):
        mode = stat.S_IMODE((broker.home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(broker.home.stat().st_mode) == 0o700  # the events' log segments
    command_line = Path(f"/proc/{broker.pid()}/cmdline").read_bytes()
    for role in ("admin", "stream", "producer", "reader", "alerts"):
        assert login(settings, "kafka", role)[1].encode() not in command_line
    assert login(settings, "kafka", "admin")[1] in (broker.home / "server.properties").read_text()


# --------------------------------------------------------------------------- what each may do


def test_the_stream_cannot_write_events_and_writes_scores_and_dead_letters(isolated_settings):
    cfg = isolated_settings.kafka
    producer = kafka.producer(isolated_settings, role="stream", client_id="t-stream")
    assert delivery_errors(producer, cfg.topic_events) == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    assert delivery_errors(producer, cfg.topic_scores) == [None]
    assert delivery_errors(producer, cfg.topic_dead_letter) == [None]


def test_the_alerts_role_reads_scores_in_its_group_and_writes_only_alerts(isolated_settings):
    cfg = isolated_settings.kafka
    stream = kafka.producer(isolated_settings, role="stream", client_id="t-stream")
    assert delivery_errors(stream, cfg.topic_scores, b"score") == [None]
    assert delivery_errors(stream, cfg.topic_alerts) == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    alerts = kafka.producer(isolated_settings, role="alerts", client_id="t-alerts")
    assert delivery_errors(alerts, cfg.topic_alerts) == [None]
    for topic in (cfg.topic_scores, cfg.topic_events, cfg.topic_dead_letter):
        assert delivery_errors(alerts, topic) == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    mine, theirs = f"{cfg.alerts_group}-t", f"{cfg.consumer_group}-t"
    assert first_record(isolated_settings, "alerts", mine, cfg.topic_scores) == b"score"
    refused = first_record(isolated_settings, "alerts", theirs, cfg.topic_scores)
    assert refused == KafkaError.GROUP_AUTHORIZATION_FAILED
    assert first_record(isolated_settings, "alerts", mine, cfg.topic_events) == (
        KafkaError.TOPIC_AUTHORIZATION_FAILED
    )


def test_the_producer_cannot_read_scores(isolated_settings):
    cfg = isolated_settings.kafka
    stream = kafka.producer(isolated_settings, role="stream", client_id="t-stream")
    assert delivery_errors(stream, cfg.topic_scores) == [None]  # something to refuse
    read = ["-C", "-t", cfg.topic_scores, "-o", "beginning", "-e"]
    result = kcat(isolated_settings, "producer", *read, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Topic authorization failed" in result.stderr
    assert result.stdout == ""
    producer = kafka.producer(isolated_settings, role="producer", client_id="t-producer")
    assert delivery_errors(producer, cfg.topic_events) == [None]


def test_the_reader_reads_scores_in_its_own_groups_and_cannot_write_them(isolated_settings):
    cfg = isolated_settings.kafka
    marker = uuid.uuid4().hex.encode()
    stream = kafka.producer(isolated_settings, role="stream", client_id="t-stream")
    assert delivery_errors(stream, cfg.topic_scores, marker) == [None]

    written = kcat(
        isolated_settings,
        "reader",
        *["-P", "-t", cfg.topic_scores],
        input="a forged score\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode != 0 and "Topic authorization failed" in written.stderr

    mine, theirs = kafka.reader_group(isolated_settings, "t"), cfg.consumer_group
    assert first_record(isolated_settings, "reader", mine, cfg.topic_scores) == marker
    refused = first_record(isolated_settings, "reader", theirs, cfg.topic_scores)
    assert refused == KafkaError.GROUP_AUTHORIZATION_FAILED


def test_the_stream_reads_events_in_its_groups_and_no_other(isolated_settings):
    cfg = isolated_settings.kafka
    marker = uuid.uuid4().hex.encode()
    producer = kafka.producer(isolated_settings, role="producer", client_id="t-producer")
    assert delivery_errors(producer, cfg.topic_events, marker) == [None]
    for group in (cfg.consumer_group, f"{cfg.consumer_group}-replica"):  # `--group` may add one
        assert first_record(isolated_settings, "stream", group, cfg.topic_events) == marker
    refused = first_record(isolated_settings, "stream", "another-group", cfg.topic_events)
    assert refused == KafkaError.GROUP_AUTHORIZATION_FAILED


# --------------------------------------------------------------------------- retention


def retention(settings) -> dict[str, int]:
    client = kafka.admin(settings)
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in settings.kafka.topics]
    described = client.describe_configs(resources)
    return {
        resource.name: int(future.result(timeout=30)["retention.ms"].value)
        for resource, future in described.items()
    }


def test_each_topic_keeps_records_as_long_as_the_settings_say(settings, isolated_settings):
    for cfg in (settings, isolated_settings):  # made at the broker's start; made by a test
        assert retention(cfg) == {
            cfg.kafka.topic_events: cfg.kafka.retention_events_ms,
            cfg.kafka.topic_scores: cfg.kafka.retention_scores_ms,
            cfg.kafka.topic_dead_letter: cfg.kafka.retention_dead_letter_ms,
            cfg.kafka.topic_alerts: cfg.kafka.retention_alerts_ms,
        }
    shorter = isolated_settings.kafka.model_copy(
        update={
            "retention_events_ms": 3_600_000,
            "retention_scores_ms": 7_200_000,
            "retention_dead_letter_ms": 10_800_000,
            "retention_alerts_ms": 14_400_000,
        }
    )
    changed = isolated_settings.model_copy(update={"kafka": shorter})
    assert kafka.ensure_topics(changed) == []  # none made: the existing ones are altered
    assert retention(changed) == {
        shorter.topic_events: 3_600_000,
        shorter.topic_scores: 7_200_000,
        shorter.topic_dead_letter: 10_800_000,
        shorter.topic_alerts: 14_400_000,
    }


# --------------------------------------------------------------------------- upgrades


@pytest.mark.single_node
def test_an_older_plaintext_install_is_formatted_afresh_and_passwords_follow_the_settings(
    tmp_path,
):
    # An admin password with what .properties, JAAS, Java argument files and StorageTool's
    # --add-scram each read specially.
    awkward = SecretStr('a "quoted", back\\slashed = password')
    base = make_settings(tmp_path)
    secure = base.model_copy(
        update={"kafka": base.kafka.model_copy(update={"admin_password": awkward})}
    )
    plaintext = secure.model_copy(
        update={"kafka": secure.kafka.model_copy(update={"security_protocol": "PLAINTEXT"})}
    )
    broker = KafkaBroker(secure)
    try:
        # What the older install left: a data folder formatted with no admin credential,
        # holding an event.
        services.up(plaintext, ["kafka"])
        old = kafka.producer(plaintext, role="producer", client_id="t-old")
        assert delivery_errors(old, plaintext.kafka.topic_events) == [None]
        client = kafka.admin(plaintext)
        admin_user = login(plaintext, "kafka", "admin")[0]
        deletion = UserScramCredentialDeletion(admin_user, ScramMechanism.SCRAM_SHA_512)
        for future in client.alter_user_scram_credentials([deletion]).values():
            future.result(timeout=30)
        services.down(plaintext, ["kafka"])
        broker.formatted_with.unlink()

        [health] = services.up(secure, ["kafka"])
        assert health.healthy
        for role in ("admin", "stream", "producer", "reader"):
            assert kafka.brokers(secure, role=role) == 1
        events = kcat(
            secure,
            "stream",
            *["-C", "-t", secure.kafka.topic_events, "-o", "beginning", "-e", "-q"],
            capture_output=True,
            timeout=60,
        )
        assert events.returncode == 0 and events.stdout == b""  # formatted afresh

        # A service's new password takes effect when the broker (re)starts.
        new = secure.kafka.model_copy(
            update={"reader_password": SecretStr("a-new-reader-password")}
        )
        kafka.ensure_users(secure.model_copy(update={"kafka": new}))
        assert kafka.brokers(secure.model_copy(update={"kafka": new}), role="reader") == 1
        with pytest.raises(KafkaException):
            kafka.brokers(secure, role="reader")

        # The admin's password cannot change under a formatted folder: the start stops and
        # says so, and nothing is lost.
        services.down(secure, ["kafka"])
        moved = secure.kafka.model_copy(
            update={"admin_password": SecretStr("another-admin-password")}
        )
        with pytest.raises(services.ServiceError, match="formatted with"):
            services.up(secure.model_copy(update={"kafka": moved}), ["kafka"])
        assert (broker.data / "meta.properties").exists()
    finally:
        services.down(secure, ["kafka"])
