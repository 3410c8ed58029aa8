"""Replay a cohort's events into Kafka in event-time order, optionally time-compressed.

Admissions arrive from the reader by admit time, and none of an admission's events
precedes its ``admission`` event, so a k-way merge (a heap holding only the admissions
still open) yields the global event-time order without holding the cohort's events.

Every message is encoded, validated against the contract on its way out, keyed by
``hadm_id`` (one admission stays in one partition, in order) and produced with
``acks=all``. Events that fail validation go to the dead-letter topic with their reason,
source and event id, never their content. The producer is librdkafka's (``m3t.kafka``);
kafka-python's sits behind the same small interface for those who ask for it.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Protocol

from ingest.accounting import DeadLetter
from ingest.events import InvalidEvent, encode, key, sort_key, validate_json
from m3t import kafka
from m3t.settings import Settings

Client = Literal["confluent", "kafka-python"]


class ReplayError(RuntimeError):
    """The broker did not take the events (nothing about their content)."""


class EventProducer(Protocol):
    def send(self, topic: str, key: bytes, value: bytes) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class ConfluentProducer:
    """librdkafka's producer (``m3t.kafka``), batching by size or linger time; delivery
    failures raise at flush."""

    def __init__(
        self,
        settings: Settings,
        *,
        linger_ms: int = 20,
        batch_size: int = 512 * 1024,
        compression: str | None = None,
        acks: str | int = "all",
    ):
        self._producer = kafka.producer(
            settings,
            role="producer",
            client_id="m3t-replay",
            **{
                "acks": str(acks),
                "enable.idempotence": str(acks) == "all",
                "linger.ms": linger_ms,
                "batch.size": batch_size,
                "compression.type": compression or "none",
                "queue.buffering.max.messages": 1_000_000,
            },
        )
        self._failures: list[str] = []

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._failures.append(str(error.name()))

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        kafka.produce(self._producer, topic, value, key, self._delivered)
        self._producer.poll(0)

    def flush(self) -> None:
        remaining = self._producer.flush(60)
        if remaining or self._failures:
            raise ReplayError(f"{remaining + len(self._failures)} message(s) not delivered")

    def close(self) -> None:
        self._producer.flush(10)


class KafkaPythonProducer:
    """kafka-python's KafkaProducer behind the same interface (``--client kafka-python``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        linger_ms: int = 20,
        batch_size: int = 512 * 1024,
        compression: str | None = None,
        acks: str | int = "all",
    ):
        from kafka import KafkaProducer

        self._producer = KafkaProducer(
            **kafka.kafka_python_config(settings, "producer"),
            acks=acks,
            linger_ms=linger_ms,
            batch_size=batch_size,
            compression_type=compression,
            max_request_size=4 * 1024 * 1024,
            # Idempotence keeps each partition's order through retries (an admission's
            # events must arrive in order), with several requests in flight.
            enable_idempotence=acks == "all",
            retries=5,
            client_id="m3t-replay",
        )
        self._failures: list[Exception] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._producer.send(topic, key=key, value=value).add_errback(self._failures.append)

    def flush(self) -> None:
        self._producer.flush()
        if self._failures:
            raise ReplayError(
                f"{len(self._failures)} message(s) not delivered: "
                f"{type(self._failures[0]).__name__}"
            )

    def close(self) -> None:
        self._producer.close()


def make_producer(settings: Settings, client: Client = "confluent", **options) -> EventProducer:
    if client == "confluent":
        return ConfluentProducer(settings, **options)
    if client == "kafka-python":
        return KafkaPythonProducer(settings, **options)
    raise ValueError(f"unknown Kafka client {client!r} (confluent or kafka-python)")


# --------------------------------------------------------------------------- ordering and pacing


def in_event_time_order(admissions: Iterable[list]) -> Iterator:
    """Merge per-admission event lists (each sorted, arriving by admit time) by ``sort_key``."""
    heap: list = []
    for seq, events in enumerate(admissions):
        if not events:
            continue
        opens = sort_key(events[0])
        # Everything earlier than this admission's first event can go out now.
        while heap and heap[0][0] < opens:
            yield _pop(heap)
        heapq.heappush(heap, (opens, seq, 0, events))
    while heap:
        yield _pop(heap)


def _pop(heap: list):
    _, seq, index, events = heap[0]
    if index + 1 < len(events):
        heapq.heapreplace(heap, (sort_key(events[index + 1]), seq, index + 1, events))
    else:
        heapq.heappop(heap)
    return events[index]


class Pacer:
    """Waits so event time advances ``speed`` times faster than wall time (0: no waiting).

    A gap in event time longer than ``max_wait_s`` of wall time is cut to it, so the years
    between MIMIC's shifted admissions do not stall a replay.
    """

    def __init__(
        self, speed: float, max_wait_s: float = 1.0, clock=time.monotonic, sleep=time.sleep
    ):
        self.speed, self.max_wait_s, self.clock, self.sleep = speed, max_wait_s, clock, sleep
        self._origin: tuple[float, float] | None = None  # (event seconds, wall seconds)

    def wait_for(self, event_time) -> None:
        if self.speed <= 0:
            return
        t, now = event_time.timestamp(), self.clock()
        if self._origin is None:
            self._origin = (t, now)
            return
        due = self._origin[1] + (t - self._origin[0]) / self.speed
        if due - now > self.max_wait_s:
            self._origin = (t, now + self.max_wait_s)  # skip the idle stretch
            due = now + self.max_wait_s
        if due > now:
            self.sleep(due - now)


# --------------------------------------------------------------------------- replay


@dataclass
class ReplaySummary:
    events: int = 0
    seconds: float = 0.0
    by_type: Counter = field(default_factory=Counter)
    dead_letters: Counter = field(default_factory=Counter)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
            "by_type": dict(sorted(self.by_type.items())),
            "dead_letters": dict(sorted(self.dead_letters.items())),
        }


def first_hours(admissions: Iterable[list], hours: float) -> Iterator[list]:
    """Each admission's events up to ``hours`` after its admit time (the rest are not sent)."""
    for events in admissions:
        if events:
            end = events[0].event_time + timedelta(hours=hours)
            yield [e for e in events if e.event_time <= end]


def replay(
    admissions: Iterable[list],
    producer: EventProducer,
    topic: str,
    *,
    dead_letter_topic: str,
    speed: float = 0.0,
    max_wait_s: float = 1.0,
    progress: Callable[[int], None] | None = None,
    validate: bool = True,
) -> ReplaySummary:
    """Produce every event in global event-time order; returns counts and throughput.

    ``progress`` is called now and then with the number of events handled so far.
    ``validate=False`` skips the outgoing check (benchmarks measure what it costs).
    """
    summary = ReplaySummary()
    pacer = Pacer(speed, max_wait_s)
    started = time.perf_counter()
    for n, event in enumerate(in_event_time_order(admissions), 1):
        pacer.wait_for(event.event_time)
        raw = encode(event)
        try:
            if validate:
                validate_json(raw)  # the bytes that leave are the bytes that were checked
        except InvalidEvent as exc:
            letter = DeadLetter(exc.reason, event.source, f"event {event.event_id}", exc.detail)
            producer.send(dead_letter_topic, key(event), letter.to_json())
            summary.dead_letters[exc.reason] += 1
            continue
        producer.send(topic, key(event), raw)
        summary.events += 1
        summary.by_type[event.type] += 1
        if progress is not None and n % 2000 == 0:
            progress(n)
    producer.flush()
    if progress is not None:
        progress(summary.events + sum(summary.dead_letters.values()))
    summary.seconds = time.perf_counter() - started
    return summary


class KafkaDeadLetters:
    """A dead-letter sink onto a Kafka topic (keyed by source table)."""

    def __init__(self, producer: EventProducer, topic: str):
        self.producer, self.topic = producer, topic
        self.count = 0

    def __call__(self, letter: DeadLetter) -> None:
        self.producer.send(self.topic, letter.source.encode(), letter.to_json())
        self.count += 1
