"""Dead letters: events the worker cannot take, sent to their own topic with the reason.

A dead letter names where the event lies (topic, partition, offset), so the event can be
found, repaired and replayed. It carries the event's bytes base64-encoded, cut at
``DEAD_LETTER_MAX_BYTES`` so the record stays under Kafka's 1 MB default limit, with their
size and sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections import Counter

from confluent_kafka import Message

from stream.kafka_io import KafkaSink

log = logging.getLogger(__name__)

DEAD_LETTER_MAX_BYTES = 256 * 1024


def dead_letter_record(record: Message, reason: str, detail: str) -> bytes:
    value = record.value() or b""
    kept = value[:DEAD_LETTER_MAX_BYTES]
    return json.dumps(
        {
            "reason": reason,
            "detail": detail,
            "topic": record.topic(),
            "partition": record.partition(),
            "offset": record.offset(),
            "value_b64": base64.b64encode(kept).decode(),
            "value_bytes": len(value),
            "value_sha256": hashlib.sha256(value).hexdigest(),
            "truncated": len(kept) < len(value),
        }
    ).encode()


class DeadLetters:
    """Sends dead letters through the worker's sink (so a commit waits for them as for
    scores), keyed as the event was, and counts them by reason.

    Args:
        sink: the worker's ``KafkaSink``.
        topic: the dead-letter topic.
    """

    def __init__(self, sink: KafkaSink, topic: str):
        self.sink = sink
        self.topic = topic
        self.reasons: Counter[str] = Counter()

    def send(self, record: Message, reason: str, detail: str) -> None:
        self.sink.send(self.topic, record.key(), dead_letter_record(record, reason, detail))
        self.reasons[reason] += 1
        log.warning(
            "dead letter: %s at %s[%d]@%d",
            reason,
            record.topic(),
            record.partition(),
            record.offset(),
        )
