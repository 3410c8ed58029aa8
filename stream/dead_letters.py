"""Dead letters: what the worker cannot take, sent to their own topic with the reason.

An event's dead letter names where the event lies (topic, partition, offset), its id and
type where they could be read, its size and sha256: enough to find it, and no patient data.
It is keyed as the event was where that key is an admission id, else by the key's sha256.
Its bytes (base64, cut at ``DEAD_LETTER_MAX_BYTES`` so the record stays under Kafka's 1 MB
default limit) travel only where the settings ask for them. An admission that cannot be
scored gets a dead letter of its own, naming the admission and the reason.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import logging
import time
from collections import Counter

from confluent_kafka import Message

from stream.kafka_io import KafkaSink

log = logging.getLogger(__name__)

DEAD_LETTER_MAX_BYTES = 256 * 1024


def dead_letter_record(
    record: Message, reason: str, detail: str, event=None, payload: bool = False
) -> bytes:
    value = record.value() or b""
    letter = {
        "reason": reason,
        "detail": detail,
        "topic": record.topic(),
        "partition": record.partition(),
        "offset": record.offset(),
        "event_id": getattr(event, "event_id", None),
        "type": getattr(event, "type", None),
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
    }
    if payload:
        kept = value[:DEAD_LETTER_MAX_BYTES]
        letter["value_b64"] = base64.b64encode(kept).decode()
        letter["truncated"] = len(kept) < len(value)
    return json.dumps(letter).encode()


def letter_key(key: bytes | None) -> bytes | None:
    """An event's key as its dead letter's: an admission id (digits) as it came, anything
    else by its sha256, so a key that is not the contract's carries no patient data and no
    bulk into the dead-letter topic."""
    if key is None or (len(key) <= 20 and key.isdigit()):
        return key
    return hashlib.sha256(key).hexdigest().encode()


def admission_record(hadm_id: int, reason: str, detail: str) -> bytes:
    return json.dumps({"reason": reason, "detail": detail, "hadm_id": hadm_id}).encode()


class DeadLetters:
    """Sends dead letters through the worker's sink (so a commit waits for them as for
    scores), keyed as the event was, and counts them by reason.

    Args:
        sink: the worker's ``KafkaSink``.
        topic: the dead-letter topic.
        payload: whether an event's dead letter carries the event's bytes.
    """

    def __init__(self, sink: KafkaSink, topic: str, payload: bool = False):
        self.sink = sink
        self.topic = topic
        self.payload = payload
        self.reasons: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.reasons.total()

    def event(self, record: Message, reason: str, detail: str, event=None) -> None:
        letter = dead_letter_record(record, reason, detail, event, self.payload)
        self.sink.send(self.topic, letter_key(record.key()), letter)
        self.reasons[reason] += 1
        if self._worth_logging(reason):
            log.warning(
                "dead letter: %s at %s[%d]@%d (%d so far)",
                reason,
                record.topic(),
                record.partition(),
                record.offset(),
                self.reasons[reason],
            )

    def admission(self, hadm_id: int, reason: str, detail: str) -> None:
        self.sink.send(self.topic, str(hadm_id).encode(), admission_record(hadm_id, reason, detail))
        self.reasons[reason] += 1
        if self._worth_logging(reason):
            log.warning("dead letter: an admission's %s (%d so far)", reason, self.reasons[reason])

    def _worth_logging(self, reason: str) -> bool:
        """The 1st, 2nd, 4th, 8th... letter of each reason: a flood of bad events cannot
        flood the log (every letter is counted, and lies in the topic)."""
        count = self.reasons[reason]
        return count & (count - 1) == 0


def summarize(settings, latest: int = 10, timeout_s: float = 10.0) -> dict:
    """What the dead-letter topic holds, for an operator: counts by reason and the latest
    ``latest`` letters (newest first), read from the start of every partition without
    joining a group or committing anything.

    It reads as the admin: an operator's tool, and letters may carry events' bytes, which
    no service role reads back (the worker and the producer only write them; the reader
    sees scores alone)."""
    import uuid

    from confluent_kafka import TopicPartition

    from m3t import kafka

    topic = settings.kafka.topic_dead_letter
    consumer = kafka.consumer(
        settings,
        role="admin",
        group_id=f"m3t-dead-letters-{uuid.uuid4().hex[:8]}",
        client_id="m3t-cli",
    )
    try:
        ends = {}
        for p in kafka.partitions(consumer, topic, timeout_s):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])  # 0: the earliest kept
        reasons: Counter[str] = Counter()
        newest: list[tuple[int, int, dict]] = []  # a min-heap of the latest: (time, order, letter)
        remaining = dict(ends)
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            for message in kafka.poll_batch(consumer, 1000, 0.5):
                if message.offset() + 1 >= remaining.get(message.partition(), 0):
                    remaining.pop(message.partition(), None)
                try:
                    letter = json.loads(message.value())
                    reason = str(letter.get("reason", "?"))
                except (ValueError, AttributeError, TypeError):
                    letter, reason = {}, "unreadable_dead_letter"
                reasons[reason] += 1
                letter = {k: v for k, v in letter.items() if k != "value_b64"}
                item = (message.timestamp()[1], reasons.total(), {"reason": reason, **letter})
                if len(newest) < latest:
                    heapq.heappush(newest, item)
                elif latest:
                    heapq.heappushpop(newest, item)
    finally:
        consumer.close()
    return {
        "topic": topic,
        "total": sum(reasons.values()),
        "complete": not remaining,
        "by_reason": dict(reasons.most_common()),
        "latest": [dict(letter, kafka_time_ms=t) for t, _, letter in sorted(newest, reverse=True)],
    }
