"""Kafka for the whole project, through librdkafka (confluent-kafka).

Clients are built here from ``Settings`` with the options every user of them needs, each
signed in as a role (``m3t.settings.Role``): its SCRAM user over TLS where the settings ask
for SASL_SSL (the default). The same sign-in is given to kafka-python and to kcat. The
helpers below are the ones more than one part of the project calls: producing with
backpressure, draining a poll's worth of records, looking up a topic's partitions, and
creating the project's topics with their retention and each role's ACLs.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from m3t import tls
from m3t.credentials import login, write_secret
from m3t.services.process import wait_until
from m3t.settings import Role, Settings

log = logging.getLogger(__name__)

SCRAM_ITERATIONS = 4096  # SCRAM-SHA-512's least in Kafka, and its tools' default
ALLOW = AclPermissionType.ALLOW


# --------------------------------------------------------------------------- signing in


def authenticates(settings: Settings) -> bool:
    """Whether clients sign in (SASL), so that ACLs decide what each may do."""
    return settings.kafka.security_protocol.startswith("SASL")


def encrypts(settings: Settings) -> bool:
    return settings.kafka.security_protocol.endswith("SSL")


def ca_file(settings: Settings) -> Path:
    """The CA that signed the brokers' certificates: the setting's, else the local CA."""
    return settings.kafka.ca_file or tls.ca_file(settings)


def client_config(settings: Settings, role: Role) -> dict[str, str]:
    """librdkafka's properties to reach the brokers as ``role``."""
    cfg = settings.kafka
    config = {
        "bootstrap.servers": cfg.bootstrap_servers,
        "security.protocol": cfg.security_protocol,
    }
    if authenticates(settings):
        username, password = login(settings, "kafka", role)
        config |= {
            "sasl.mechanisms": cfg.sasl_mechanism,
            "sasl.username": username,
            "sasl.password": password,
        }
    if encrypts(settings):
        config["ssl.ca.location"] = str(ca_file(settings))
    return config


def kafka_python_config(settings: Settings, role: Role) -> dict:
    """kafka-python's keyword arguments to reach the brokers as ``role`` (any of its
    clients takes them)."""
    cfg = settings.kafka
    config: dict = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "security_protocol": cfg.security_protocol,
    }
    if authenticates(settings):
        username, password = login(settings, "kafka", role)
        config |= {
            "sasl_mechanism": cfg.sasl_mechanism,
            "sasl_plain_username": username,
            "sasl_plain_password": password,
        }
    if encrypts(settings):  # Python's defaults: the certificate and its host name checked
        config["ssl_context"] = ssl.create_default_context(cafile=ca_file(settings))
    return config


def properties_file(settings: Settings, role: Role) -> Path:
    """``role``'s librdkafka properties in an owner-only file, for tools that read one
    (``kcat -F``) so the password stays off their command line."""
    path = settings.secrets_dir / f"kafka-{role}.properties"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_secret(path, "".join(f"{k}={v}\n" for k, v in client_config(settings, role).items()))
    return path


def reader_group(settings: Settings, name: str) -> str:
    """A consumer group the reader may use: its ACL covers the groups named after its user."""
    return f"{login(settings, 'kafka', 'reader')[0]}-{name}"


# --------------------------------------------------------------------------- clients


def producer(settings: Settings, *, role: Role, client_id: str, **options) -> Producer:
    """A producer signed in as ``role`` that waits for every in-sync replica and keeps each
    partition's order through retries (idempotence); ``options`` are librdkafka properties.

    Keys are hashed with murmur2, as Java clients and kafka-python do, so an admission lands
    on the same partition whichever client sent it.
    """
    return Producer(
        {
            **client_config(settings, role),
            "client.id": client_id,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            **options,
        },
        logger=log,
    )


def consumer(
    settings: Settings, *, role: Role, group_id: str, client_id: str, **options
) -> Consumer:
    """A group member signed in as ``role``, with auto-commit off, that starts from the
    earliest offset where its group has none; ``options`` are librdkafka properties."""
    return Consumer(
        {
            **client_config(settings, role),
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **options,
        },
        logger=log,
    )


def admin(settings: Settings, role: Role = "admin") -> AdminClient:
    """An admin client; keep it referenced until its futures resolve."""
    return AdminClient({**client_config(settings, role), "client.id": f"m3t-{role}", "logger": log})


def produce(
    client: Producer, topic: str, value: bytes, key: bytes | None = None, on_delivery=None
) -> None:
    """Queue one record; while librdkafka's local queue is full, serve delivery reports
    until there is room. A record refused before sending raises ``KafkaException``."""
    while True:
        try:
            client.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            client.poll(0.05)


def poll_batch(client: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """Up to ``max_records`` records: waits up to ``timeout_s`` for the first, then takes
    what else has arrived without waiting (``consume(n, timeout)`` would wait out its
    timeout unless n records came). Transient errors are logged and skipped (librdkafka
    retries them); a fatal one raises."""
    first = client.poll(timeout_s)
    if first is None:
        return []
    messages = [first, *client.consume(max_records - 1, 0)] if max_records > 1 else [first]
    records = []
    for message in messages:
        error = message.error()
        if error is None:
            records.append(message)
        elif error.fatal():
            raise KafkaException(error)
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("Kafka: %s", error)
    return records


def wait_for_partitions(lookup, topic: str, timeout_s: float = 30.0) -> list[int]:
    """``lookup()``'s partition ids of ``topic``, once it finds some: a topic just created
    takes a moment to reach the metadata a client holds, and assigning no partitions reads
    nothing. Any client's lookup will do (kafka-python's too)."""
    found: list = []

    def known() -> bool:
        found[:] = lookup() or ()
        return bool(found)

    if not wait_until(known, timeout_s, 0.1):
        raise TimeoutError(f"topic {topic!r} has no partitions after {timeout_s:.0f} s")
    return sorted(found)


def partitions(
    client: Consumer | Producer | AdminClient, topic: str, timeout_s: float = 30.0
) -> list[int]:
    """The topic's partition ids, from the cluster's metadata as ``client`` sees it."""

    def lookup():
        meta = client.list_topics(topic, timeout=10).topics.get(topic)
        return list(meta.partitions) if meta is not None and meta.error is None else None

    return wait_for_partitions(lookup, topic, timeout_s)


def brokers(settings: Settings, timeout_s: float = 3.0, role: Role = "admin") -> int:
    """How many brokers the cluster reports to ``role`` (raises ``KafkaException`` if none
    answers)."""
    return len(admin(settings, role).list_topics(timeout=timeout_s).brokers)


# --------------------------------------------------------------------------- topics and grants


def retention_ms(settings: Settings) -> dict[str, int]:
    """How long each of the project's topics keeps its records."""
    cfg = settings.kafka
    return {
        cfg.topic_events: cfg.retention_events_ms,
        cfg.topic_dead_letter: cfg.retention_dead_letter_ms,
        cfg.topic_scores: cfg.retention_scores_ms,
        cfg.topic_alerts: cfg.retention_alerts_ms,
    }


def grants(settings: Settings) -> list[AclBinding]:
    """What each role may do, and nothing else (the admin is a super user).

    READ and WRITE imply DESCRIBE (metadata, offsets, a group's coordinator), and WRITE on a
    topic lets a producer be idempotent. The stream's groups are its consumer group and
    those named after it; the reader's, those named after its user (``reader_group``); the
    alerting process's, its group and those named after it.
    """
    cfg = settings.kafka
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    read, write = AclOperation.READ, AclOperation.WRITE
    allowed = {
        "stream": [
            (topic, cfg.topic_events, literal, read),
            (topic, cfg.topic_scores, literal, write),
            (topic, cfg.topic_dead_letter, literal, write),
            (group, cfg.consumer_group, prefixed, read),
        ],
        "producer": [
            (topic, cfg.topic_events, literal, write),
            (topic, cfg.topic_dead_letter, literal, write),
        ],
        "reader": [
            (topic, cfg.topic_scores, literal, read),
            (topic, cfg.topic_alerts, literal, read),
            (group, login(settings, "kafka", "reader")[0], prefixed, read),
        ],
        "alerts": [
            (topic, cfg.topic_scores, literal, read),
            (topic, cfg.topic_alerts, literal, write),
            (group, cfg.alerts_group, prefixed, read),
        ],
    }
    return [
        AclBinding(kind, name, pattern, f"User:{login(settings, 'kafka', role)[0]}", "*", op, ALLOW)
        for role, rules in allowed.items()
        for kind, name, pattern, op in rules
    ]


def ensure_topics(
    settings: Settings, partitions: int | None = None, timeout_s: float = 30.0
) -> list[str]:
    """Create the project's topics that are missing and set every one's retention to the
    settings'; where clients sign in, grant each role its ACLs (``grants``). Every step may
    be repeated. Returns the names created."""
    client = admin(settings)
    retention = retention_ms(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    wanted = [t for t in settings.kafka.topics if t not in existing]
    count = partitions or settings.kafka.partitions
    factor, in_sync = settings.kafka.replicas
    new = [
        NewTopic(
            t,
            count,
            factor,
            config={"retention.ms": str(retention[t]), "min.insync.replicas": str(in_sync)},
        )
        for t in wanted
    ]
    futures = client.create_topics(new, operation_timeout=timeout_s) if new else {}
    for future in futures.values():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # made by another caller
                raise
    kept = [
        ConfigResource(
            ResourceType.TOPIC,
            t,
            incremental_configs=[
                ConfigEntry("retention.ms", str(ms), incremental_operation=AlterConfigOpType.SET)
            ],
        )
        for t, ms in retention.items()
        if t in existing
    ]
    if kept:
        _wait(client.incremental_alter_configs(kept, request_timeout=timeout_s), timeout_s)
    if authenticates(settings):
        grant(client, grants(settings), timeout_s)
        if len(settings.kafka.bootstrap_servers.split(",")) > 1:
            applied_everywhere(settings, grants(settings), timeout_s)
    return wanted


def grant(client: AdminClient, bindings: list[AclBinding], timeout_s: float = 30.0) -> None:
    """Create the ACLs (those that exist are kept) and wait until the broker applies them:
    a client that came sooner would be refused."""
    _wait(client.create_acls(bindings, request_timeout=timeout_s), timeout_s)

    def applied() -> bool:
        return set(bindings) <= set(acls(client, timeout_s))

    if not wait_until(applied, timeout_s, 0.05):
        raise TimeoutError(f"the broker did not apply the ACLs within {timeout_s:.0f} s")


def applied_everywhere(settings: Settings, bindings: list[AclBinding], timeout_s: float) -> None:
    """Wait until each bootstrap broker has applied the ACLs too: every broker applies them
    from the metadata log in its own time, and a producer whose partition leader has not yet
    is refused outright (TOPIC_AUTHORIZATION_FAILED, which librdkafka does not retry)."""
    for server in settings.kafka.bootstrap_servers.split(","):
        one = settings.model_copy(
            update={"kafka": settings.kafka.model_copy(update={"bootstrap": server})}
        )
        client = admin(one)  # a new client asks the one broker it knows

        def applied(client=client) -> bool:
            return set(bindings) <= set(acls(client, timeout_s))

        if not wait_until(applied, timeout_s, 0.05):
            raise TimeoutError(f"broker {server} did not apply the ACLs within {timeout_s:.0f} s")


def acls(client: AdminClient, timeout_s: float = 30.0) -> list[AclBinding]:
    """Every ACL binding the cluster holds."""
    everything = AclBindingFilter(
        ResourceType.ANY,
        None,
        ResourcePatternType.ANY,
        None,
        None,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    found = client.describe_acls(everything, request_timeout=timeout_s)
    return found.result(timeout=timeout_s + 5)


def own_topics(settings: Settings, prefix: str = "") -> Settings:
    """The settings with topics and a consumer group of their own (``<prefix>events-<tag>``,
    ...), made on the broker with each role's grants: a test's or a benchmark run's."""
    tag = uuid.uuid4().hex[:10]
    topics = settings.kafka.model_copy(
        update={
            "topic_events": f"{prefix}events-{tag}",
            "topic_dead_letter": f"{prefix}dead-letter-{tag}",
            "topic_scores": f"{prefix}scores-{tag}",
            "topic_alerts": f"{prefix}alerts-{tag}",
            "consumer_group": f"{prefix}group-{tag}",
            "alerts_group": f"{prefix}alerts-group-{tag}",
        }
    )
    cfg = settings.model_copy(update={"kafka": topics})
    ensure_topics(cfg)
    return cfg


def delete_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Delete the settings' topics and what was granted on them and on their consumer group
    (a run's own topics, as a benchmark makes; the reader's groups are shared)."""
    client = admin(settings)
    futures = client.delete_topics(list(settings.kafka.topics), operation_timeout=timeout_s)
    _wait(futures, timeout_s)
    if authenticates(settings):
        own = {*settings.kafka.topics, settings.kafka.consumer_group, settings.kafka.alerts_group}
        filters = [
            AclBindingFilter(
                b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, ALLOW
            )
            for b in grants(settings)
            if b.name in own
        ]
        _wait(client.delete_acls(filters, request_timeout=timeout_s), timeout_s)


def ensure_users(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create or update the SCRAM user of every role but the admin (whose credential the
    broker is formatted with) with its current password, then wait until each signs in."""
    roles: list[Role] = ["stream", "producer", "reader", "alerts"]
    mechanism = ScramMechanism[settings.kafka.sasl_mechanism.replace("-", "_")]
    upserts = []
    for role in roles:
        username, password = login(settings, "kafka", role)
        info = ScramCredentialInfo(mechanism, SCRAM_ITERATIONS)
        upserts.append(UserScramCredentialUpsertion(username, info, password.encode()))
    client = admin(settings)
    _wait(client.alter_user_scram_credentials(upserts, request_timeout=timeout_s), timeout_s)

    def signs_in(role: Role) -> bool:
        try:
            return brokers(settings, role=role) > 0
        except KafkaException:
            return False

    for role in roles:  # the broker applies the new credentials a moment after they commit
        if not wait_until(lambda role=role: signs_in(role), timeout_s, 0.2):
            raise TimeoutError(f"Kafka's {role} user cannot sign in after {timeout_s:.0f} s")


def _wait(futures: dict, timeout_s: float) -> None:
    for future in futures.values():
        future.result(timeout=timeout_s + 5)


def group_members(settings: Settings, group_id: str, timeout_s: float = 10.0) -> int:
    """Members of a consumer group once it is stable (0 while it forms or if it is unknown)."""
    from confluent_kafka import ConsumerGroupState

    client = admin(settings)  # held until the answer: a collected client never resolves its futures
    future = client.describe_consumer_groups([group_id], request_timeout=timeout_s)[group_id]
    try:
        group = future.result(timeout=timeout_s + 5)
    except KafkaException:
        return 0
    return len(group.members) if group.state == ConsumerGroupState.STABLE else 0
