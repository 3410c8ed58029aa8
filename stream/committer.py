"""Committing the consumed offsets that are safe to commit, without stopping the loop.

The ledger (``stream.ledger``) says which positions are safe once Kafka has acknowledged
the records sent before them; the sink's delivery reports say which are acknowledged. A
point is taken at most every ``interval_s``, busy or quiet (a quiet stream's commit per
event was a request to the broker per event, and a redelivered event changes nothing), and
committed asynchronously once acknowledged (a failed commit is logged by the consumer; the
next one covers it). At the end everything is flushed and the last commit waits.
"""

from __future__ import annotations

import time

from stream.kafka_io import KafkaSink, KafkaSource
from stream.ledger import CommitLedger


class Committer:
    """Args:
    source: commits the offsets of the partitions it still holds.
    sink: numbers the records sent and tells which Kafka acknowledged.
    ledger: the positions that may be committed.
    interval_s: how often a commit point is taken at most.
    """

    def __init__(
        self, source: KafkaSource, sink: KafkaSink, ledger: CommitLedger, interval_s: float = 0.2
    ):
        self.source, self.sink, self.ledger = source, sink, ledger
        self.interval_s = interval_s
        self.commits = 0
        self._taken_at = time.monotonic()

    def point_due(self) -> bool:
        return time.monotonic() - self._taken_at >= self.interval_s

    def take_point(self, floor: int) -> None:
        """Polls up to ``floor`` are fully scored."""
        self.ledger.take_point(floor, self.sink.mark())
        self._taken_at = time.monotonic()

    def commit_acknowledged(self) -> None:
        """Commit the newest point whose records Kafka has acknowledged, without waiting for
        the broker's answer. A record Kafka refused stops the worker, uncommitted."""
        self.sink.check()
        positions = self.ledger.ready(self.sink.oldest_unacknowledged())
        if positions is not None:
            self._commit(positions, asynchronous=True)

    def commit_all(self, floor: int) -> None:
        """At the end: wait for every record's acknowledgement, then commit all that is
        scored, waiting for the commit (it must land before the worker leaves the group)."""
        self.take_point(floor)
        self.sink.flush()  # a broker that does not answer stops the worker uncommitted
        positions = self.ledger.final()
        if positions is not None:
            self._commit(positions, asynchronous=False)

    def _commit(self, positions, asynchronous: bool) -> None:
        self.source.commit(positions, asynchronous=asynchronous)
        self.ledger.committed(positions, asynchronous=asynchronous)
        self.commits += 1
