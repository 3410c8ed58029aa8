"""The worker's two ends of Kafka: the events it consumes and the records it sends.

Positions and offsets are plain ``(topic, partition) -> offset`` dicts, so the commit
bookkeeping (``stream.ledger``) needs no Kafka types.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from m3t import kafka

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class KafkaSource:
    """A topic read by a consumer group, with auto-commit off.

    Args:
        consumer: a group member (``m3t.kafka.consumer``); the source subscribes it.
        topic: the events topic.
        max_records: most records a poll returns.
        on_revoke: called with the ``(topic, partition)`` pairs taken from this member in a
            rebalance, before they go to their new owner (also settable later).
    """

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        *,
        max_records: int = 2048,
        on_revoke: Callable[[list[Partition]], None] | None = None,
    ):
        self.consumer = consumer
        self.topic = topic
        self.max_records = max_records
        self.on_revoke = on_revoke
        consumer.subscribe([topic], on_revoke=self._revoked)

    def _revoked(self, _consumer, partitions) -> None:
        if self.on_revoke is not None:
            self.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def poll(self, timeout_s: float) -> list[Message]:
        """Up to ``max_records`` records: waits for the first, takes what else is there."""
        return kafka.poll_batch(self.consumer, self.max_records, timeout_s)

    def assignment(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def pause(self) -> None:
        self.consumer.pause(self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(self.consumer.assignment())

    def keep_alive(self) -> None:
        """While paused, serve the group protocol. A record from a partition assigned
        meanwhile (so not paused) is put back, to be read again after the pause."""
        message = self.consumer.poll(0)
        if message is not None and message.error() is None:
            tp = TopicPartition(message.topic(), message.partition(), message.offset())
            self.consumer.seek(tp)
            self.consumer.pause([tp])

    def commit(self, offsets: dict[Partition, int], *, asynchronous: bool) -> None:
        """Commit the offsets of the partitions still assigned (a revoked partition's
        events belong to its new owner)."""
        assigned = set(self.assignment())
        mine = [
            TopicPartition(t, p, offset) for (t, p), offset in offsets.items() if (t, p) in assigned
        ]
        if mine:
            self.consumer.commit(offsets=mine, asynchronous=asynchronous)

    def lag(self) -> dict[str, int]:
        """Records behind the end of each assigned partition, from the high watermarks the
        fetch responses carried (asking the broker would stall the caller)."""
        lag = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            _, end = self.consumer.get_watermark_offsets(tp, cached=True)
            if end >= 0 and tp.offset >= 0:  # both known once a fetch from the partition returned
                lag[f"{tp.topic}:{tp.partition}"] = max(0, end - tp.offset)
        return lag

    def close(self) -> None:
        self.consumer.close()


def log_commit_failure(error, partitions) -> None:
    """librdkafka's ``on_commit`` callback: an asynchronous commit that failed is covered
    by the next one."""
    if error is not None:
        log.warning("offset commit failed (%s); the next commit covers it", error)


class KafkaSink:
    """Sends records from any thread and tracks which Kafka has acknowledged.

    Records are numbered in the order they are sent; ``mark()`` gives the number the next
    one will get, and ``oldest_unacknowledged()`` the lowest number still waiting, so a
    caller can tell when every record sent before a mark is durable. A record Kafka refuses
    stays unacknowledged and is raised by ``check()``.

    Args:
        producer: ``m3t.kafka.producer``'s; acknowledgements arrive as its delivery reports.
        timeout_s: how long ``flush`` waits for the last acknowledgements.
    """

    def __init__(self, producer: Producer, *, timeout_s: float = 30.0):
        self.producer = producer
        self.timeout_s = timeout_s
        self._numbers = itertools.count()
        self._unacked: dict[int, None] = {}  # insertion order is send order
        self._lock = threading.Lock()
        self._failure: Exception | None = None

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        with self._lock:  # numbered in the order they enter _unacked
            number = next(self._numbers)
            self._unacked[number] = None
        try:
            kafka.produce(
                self.producer, topic, value, key, functools.partial(self._delivered, number)
            )
        except KafkaException as exc:  # refused before sending (e.g. over message.max.bytes)
            self._failure = exc

    def _delivered(self, number: int, error, _message) -> None:
        if error is not None:
            self._failure = KafkaException(error)
        else:
            with self._lock:
                del self._unacked[number]

    def mark(self) -> int:
        """A number above every record sent so far."""
        with self._lock:
            return next(self._numbers)

    def oldest_unacknowledged(self) -> int | None:
        with self._lock:
            return next(iter(self._unacked), None)

    def serve(self) -> None:
        """Take the delivery reports that have arrived (the acknowledgements)."""
        self.producer.poll(0)

    def check(self) -> None:
        """Raise if Kafka refused a record (stopping uncommitted rather than losing it)."""
        if self._failure is not None:
            raise RuntimeError(f"Kafka did not take a record: {self._failure!r}") from self._failure

    def flush(self) -> None:
        """Wait for every record's acknowledgement; raise if one does not come in time."""
        if self.producer.flush(self.timeout_s):
            raise RuntimeError(
                f"Kafka did not acknowledge {len(self.producer)} record(s) within "
                f"{self.timeout_s:.0f} s"
            )
        self.check()

    def close(self) -> None:
        self.producer.flush(self.timeout_s)
        self.producer = None  # librdkafka lets go of the broker when it is collected
