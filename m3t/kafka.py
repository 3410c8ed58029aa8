"""Kafka for the whole project, through librdkafka (confluent-kafka).

Clients are built here from ``Settings`` with the options every user of them needs; the
helpers below are the ones more than one part of the project calls: producing with
backpressure, draining a poll's worth of records, looking up a topic's partitions, and
creating the project's topics.
"""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from m3t.services.process import wait_until
from m3t.settings import Settings

log = logging.getLogger(__name__)


def producer(settings: Settings, *, client_id: str, **options) -> Producer:
    """A producer that waits for every in-sync replica and keeps each partition's order
    through retries (idempotence); ``options`` are librdkafka properties.

    Keys are hashed with murmur2, as Java clients and kafka-python do, so an admission lands
    on the same partition whichever client sent it.
    """
    return Producer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "client.id": client_id,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            **options,
        },
        logger=log,
    )


def consumer(settings: Settings, *, group_id: str, client_id: str, **options) -> Consumer:
    """A group member with auto-commit off that starts from the earliest offset where its
    group has none; ``options`` are librdkafka properties."""
    return Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **options,
        },
        logger=log,
    )


def admin(settings: Settings) -> AdminClient:
    """An admin client; keep it referenced until its futures resolve."""
    return AdminClient(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "client.id": "m3t-admin",
            "logger": log,
        }
    )


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


def brokers(settings: Settings, timeout_s: float = 3.0) -> int:
    """How many brokers the cluster reports (raises ``KafkaException`` if none answers)."""
    return len(admin(settings).list_topics(timeout=timeout_s).brokers)


def ensure_topics(
    settings: Settings, partitions: int | None = None, timeout_s: float = 30.0
) -> list[str]:
    """Create the project's topics that are missing; return the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    wanted = [t for t in settings.kafka.topics if t not in existing]
    count = partitions or settings.kafka.partitions
    futures = (
        client.create_topics([NewTopic(t, count, 1) for t in wanted], operation_timeout=timeout_s)
        if wanted
        else {}
    )
    for future in futures.values():
        try:
            future.result(timeout=timeout_s + 5)
        except KafkaException as exc:
            if (
                exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS
            ):  # another caller made it meanwhile
                raise
    return wanted


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
