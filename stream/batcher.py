"""Which admissions to score next, and when.

Admissions with events not yet in a written score are *pending*. They are scored in
micro-batches of at most ``max_batch``, oldest change first, one batch in flight at a time.
With no fill wait (``max_wait_s`` 0, the default) a batch is due as soon as a change waits
and nothing is in flight: a quiet stream scores each event at once, and a busy one batches
what piled up while the previous batch was scored, so batches grow with the load. With a
fill wait, a batch is due when the stream paused (a poll came back empty), when a full batch
is waiting, or when the oldest waiting change has waited ``max_wait_s``. An admission that
changes again while its batch is in flight is scored again by a later batch, since the
batch in flight read its features as of its launch.

The batcher also tells the commit ledger the *floor*: the last poll whose every change is
in a written score.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass


@dataclass
class Change:
    """An admission's events not yet in a written score."""

    arrived: float  # Kafka timestamp (s) of the oldest of them
    first: int  # the poll that brought it
    last: int  # the latest poll that changed the admission
    in_flight: bool = False  # in the batch being scored
    # Events that came while the admission was in flight: the next score's.
    next_arrived: float | None = None
    next_first: int | None = None


class MicroBatcher:
    """Pending admissions and when to score them.

    Args:
        max_batch: most admissions in one scoring batch.
        max_wait_s: longest a change waits for a batch to fill while events keep coming
            (0: no wait, a batch is due whenever nothing is in flight).
    """

    def __init__(self, max_batch: int = 256, max_wait_s: float = 0.0):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.pending: dict[int, Change] = {}  # in flight included, oldest first
        self.batch: list[int] = []  # in flight
        self._batch_poll = 0  # the last poll whose events the batch in flight reads
        self._firsts: Counter[int] = (
            Counter()
        )  # Change.first -> how many (the floor is below the least)
        self._since = time.monotonic()  # when the oldest change waiting for a batch came
        self._discharged: set[int] = set()

    @property
    def waiting(self) -> int:
        """Pending admissions not in flight."""
        return len(self.pending) - len(self.batch)

    def add(self, poll: int, changes: list[tuple[int, float, bool]]) -> None:
        """A poll's applied events as (admission, Kafka timestamp in s, is a discharge)."""
        if changes and not self.waiting:
            self._since = time.monotonic()
        for hadm_id, arrived, discharge in changes:
            if discharge:
                self._discharged.add(hadm_id)
            change = self.pending.get(hadm_id)
            if change is None:
                self.pending[hadm_id] = Change(arrived, poll, poll)
                self._firsts[poll] += 1
            elif change.in_flight:
                change.next_arrived = min(
                    arrived, change.next_arrived if change.next_arrived is not None else arrived
                )
                change.next_first = change.next_first or poll
                change.last = poll
            else:
                change.arrived, change.last = min(change.arrived, arrived), poll

    def due(self, polled: bool) -> bool:
        """Whether to launch a batch now (nothing being in flight); ``polled``: the last
        poll returned records."""
        waiting = self.waiting
        return bool(waiting) and (
            not self.max_wait_s
            or not polled
            or waiting >= self.max_batch
            or time.monotonic() - self._since >= self.max_wait_s
        )

    def poll_wait_s(self, idle_s: float, in_flight_s: float) -> float:
        """How long the loop's next poll may wait for a record: ``in_flight_s`` with a batch
        in flight (to launch the next as soon as it is written), the fill wait while changes
        wait for a batch (an empty poll launches it), else ``idle_s``."""
        if self.batch:
            return in_flight_s
        if self.waiting:
            return self.max_wait_s
        return idle_s

    def launch(self, poll: int) -> tuple[list[int], set[int]]:
        """The next batch, reading the events of polls up to ``poll``, and which of its
        admissions are discharged."""
        if self.batch:
            raise RuntimeError("a batch is already in flight")
        batch = list(itertools.islice(self.pending, self.max_batch))  # none in flight: oldest first
        for hadm_id in batch:
            self.pending[hadm_id].in_flight = True
        self.batch, self._batch_poll = batch, poll
        if self.waiting:  # the rest waits for the next batch from now
            self._since = time.monotonic()
        return batch, {h for h in batch if h in self._discharged}

    def scored(self) -> list[float]:
        """The batch in flight is written: each admission's Kafka timestamp of its oldest
        change. Admissions changed meanwhile stay pending."""
        arrivals = []
        for hadm_id in self.batch:
            change = self.pending.pop(hadm_id)
            arrivals.append(change.arrived)
            self._firsts[change.first] -= 1
            if not self._firsts[change.first]:
                del self._firsts[change.first]
            if change.next_first is not None:
                self.pending[hadm_id] = Change(change.next_arrived, change.next_first, change.last)
                self._firsts[change.next_first] += 1
            elif hadm_id in self._discharged and change.last <= self._batch_poll:
                self._discharged.discard(hadm_id)
        self.batch = []
        return arrivals

    def failed(self) -> None:
        """The batch in flight was not written: its admissions wait for the next batch."""
        for hadm_id in self.batch:
            change = self.pending[hadm_id]
            change.in_flight = False
            if change.next_arrived is not None:
                change.arrived = min(change.arrived, change.next_arrived)
            change.next_arrived = change.next_first = None
        self.batch = []

    def floor(self, poll: int) -> int:
        """The last poll, up to ``poll``, whose every change is in a written score."""
        return min(self._firsts, default=poll + 1) - 1
