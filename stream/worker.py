"""The stream worker: Kafka events in, current features and risk scores out.

One loop, one direction: poll (auto-commit off) -> validate -> apply to the feature store ->
mark admissions dirty -> score dirty admissions in micro-batches (by size or deadline) ->
write scores -> commit. Offsets are committed only after the Redis writes they cover have
succeeded, so delivery is at least once; the feature store and the score store are
idempotent, so a redelivered event changes nothing. Invalid events go to the dead-letter
topic with their reason before their offset is committed.

Scoring is pipelined: one micro-batch is scored on a background thread (feature read,
Triton, score writes) while the loop goes on polling and applying the next events, so
the worker's Python and Triton's model run at the same time. An offset is committed once
every event before it is in a written score: each poll gets a sequence number, each dirty
admission remembers the first poll whose change it has not had scored, and the commit
moves to the consumed positions of the last poll below all of those, once Kafka has
acknowledged every score and dead letter sent until then. Commits never block the loop:
they wait for those acknowledgements by delivery report, and go out asynchronously.
"""

from __future__ import annotations

import base64
import functools
import gc
import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol

import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from tritonclient.utils import InferenceServerException

from ingest import events as ev
from m3t.settings import Settings
from stream.metrics import WorkerMetrics
from stream.scores import RiskScore, ScoreStore
from stream.scoring import OUTAGE_STATUSES

log = logging.getLogger(__name__)


class FeatureSource(Protocol):
    def apply(self, events: list) -> None:
        """Apply events idempotently (an event seen before changes nothing)."""

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        """Model inputs for these admissions, and each one's feature time (epoch s)."""


class Scorer(Protocol):
    model: str

    def score(self, inputs: dict) -> tuple[list[float], list[float]]:
        """Length of stay (days) and mortality probability per admission."""


@dataclass
class WorkerStats:
    events: int = 0
    dead_letters: int = 0
    scored: int = 0
    batches: int = 0
    commits: int = 0
    retries: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Change:
    """An admission's events not yet in a written score."""

    arrived: float  # Kafka timestamp (s) of the oldest of them
    first: int  # the poll that brought it
    last: int  # the latest poll that changed the admission
    in_flight: bool = False  # in the batch being scored (which reads the features as of its launch)
    # Events that came while the admission was in flight: the next score's.
    next_arrived: float | None = None
    next_first: int | None = None


# Of an event's original bytes, what a dead letter carries: base64 and the envelope keep it
# well under Kafka's 1 MB record limit, which a whole large event would exceed.
DEAD_LETTER_MAX_BYTES = 256 * 1024


def dead_letter_record(record, reason: str, detail: str) -> bytes:
    """The original bytes travel base64-encoded so a repaired event can be replayed; past
    ``DEAD_LETTER_MAX_BYTES`` only their start, with their size and sha256 (the whole event
    stays in its topic at the partition and offset given, for the topic's retention)."""
    value = record.value() or b""
    kept = value[:DEAD_LETTER_MAX_BYTES]
    return json.dumps({
        "reason": reason,
        "detail": detail,
        "topic": record.topic(),
        "partition": record.partition(),
        "offset": record.offset(),
        "value_b64": base64.b64encode(kept).decode(),
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "truncated": len(kept) < len(value),
    }).encode()


def _log_commit_failure(error, partitions) -> None:
    if error is not None:
        log.warning("offset commit failed (%s); the next commit covers it", error)


REDIS_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def is_outage(exc: BaseException) -> bool:
    """Redis or Triton unreachable: worth waiting out. Anything else is a bug and stops
    the worker uncommitted (its events are redelivered to the next one)."""
    if isinstance(exc, REDIS_OUTAGES):
        return True
    return isinstance(exc, InferenceServerException) and exc.status() in OUTAGE_STATUSES


class StreamWorker:
    backoff_s = (0.2, 5.0)
    kafka_timeout_s = 30.0
    # Under load, take a commit point at most this often. Idle, at once.
    commit_interval_s = 0.2
    # On SIGTERM during an outage, give up waiting: the uncommitted events are redelivered.
    give_up_on_stop = True

    def __init__(
        self,
        settings: Settings,
        features: FeatureSource,
        scorer: Scorer,
        scores: ScoreStore,
        *,
        max_batch: int = 256,
        max_wait_ms: int = 50,
        max_poll_records: int = 2048,
        group_id: str | None = None,
        topic: str | None = None,
        worker_id: str | None = None,
    ):
        self.settings = settings
        self.features = features
        self.scorer = scorer
        self.scores = scores
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        # Larger than a scoring batch: under a backlog, one poll's events fold into fewer
        # admission writes (each admission's events in it are loaded and committed once).
        self.max_poll_records = max_poll_records
        self.topic = topic or settings.kafka.topic_events
        # librdkafka's consumer: a record costs it a few microseconds to hand over, kafka-python's
        # about twenty (parsing the record batches in Python, on the loop's thread).
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": group_id or settings.kafka.consumer_group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "client.id": "m3t-worker",
            "on_commit": _log_commit_failure,
            "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms, "fetch.min.bytes": settings.kafka.fetch_min_bytes,
        }, logger=log)
        # Revoked partitions' events not yet in a written score are redelivered to the new
        # owner; the stores are idempotent, so that changes nothing.
        self.consumer.subscribe([self.topic], on_revoke=lambda _, partitions: self._forget(partitions))
        # librdkafka's producer: a score costs it a few microseconds to queue, kafka-python's
        # tens (on the scoring thread, one per scored admission). A batch's scores are queued
        # together, so a short linger loses no batching. murmur2 places keys where Java
        # clients and kafka-python do.
        self.producer = Producer({
            "bootstrap.servers": settings.kafka.bootstrap_servers, "acks": "all", "linger.ms": 1,
            "enable.idempotence": True, "partitioner": "murmur2_random", "client.id": "m3t-worker",
        }, logger=log)
        self._send_failure: Exception | None = None  # a score or dead letter Kafka did not take
        # Records sent and not yet acknowledged, by send number (sent from both threads).
        self._unacked: dict[int, None] = {}
        self._sends = itertools.count()
        self._send_lock = threading.Lock()
        self.stats = WorkerStats()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics(scores.client, self.worker_id)
        # Admissions with events not yet in a written score (in flight included).
        self._dirty: dict[int, Change] = {}
        self._firsts: Counter[int] = Counter()  # Change.first -> how many (the commit floor is the least)
        self._dirty_since = time.monotonic()  # when the oldest change waiting for a batch came
        self._discharged: set[int] = set()
        self._seq = 0  # polls that returned records
        self._consumed: dict = {}  # partition -> next offset, after the latest poll
        self._positions: deque[tuple[int, dict]] = deque()  # (poll, consumed positions), uncommitted
        # Commit points whose records Kafka may not have acknowledged yet: (positions, the
        # first send number after them). Each is newer than the one before.
        self._commit_points: deque[tuple[dict, int]] = deque()
        self._last_async_commit: dict | None = None  # positions, until a commit waits
        self._point_taken_at = time.monotonic()
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="m3t-scoring")
        self._future: Future | None = None
        self._batch: list[int] = []  # in flight
        self._batch_seq = 0  # the last poll whose events the batch in flight reads
        self._stop = threading.Event()

    def run(
        self,
        stop: threading.Event | None = None,
        idle_timeout_s: float | None = None,
        stop_after: int | None = None,
    ) -> WorkerStats:
        """Consume until ``stop`` is set (SIGTERM), ``stop_after`` records were processed, or
        nothing arrived for ``idle_timeout_s`` once partitions were assigned. The batch in
        hand is always finished and committed before returning."""
        self._stop = stop or threading.Event()
        # What exists by now (libraries, models, the DALI pipeline) lives as long as the
        # worker: out of the collector's sight, a full collection takes about a millisecond
        # instead of ~40 ms with the whole loop stopped.
        gc.freeze()
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                # With a batch in flight, come back soon to collect it.
                wait_s = min(self.max_wait_s, 0.005) if self._future else self.max_wait_s
                records = self._poll(wait_s)
                if records:
                    last_data = time.monotonic()
                    self._apply(records)
                if self._future is not None and self._future.done():
                    self._collect()
                waiting = len(self._dirty) - len(self._batch)
                if self._future is None and waiting and (
                    not records or waiting >= self.max_batch
                    or time.monotonic() - self._dirty_since >= self.max_wait_s
                ):
                    self._launch()
                self.producer.poll(0)  # delivery reports: the acknowledgements commits wait for
                if not records or time.monotonic() - self._point_taken_at >= self.commit_interval_s:
                    self._take_commit_point()
                self._commit_acknowledged()
                if self.metrics.due():
                    self._flush_metrics()
                if stop_after is not None and self.stats.events >= stop_after:
                    break
                if idle_timeout_s is not None and not records:  # (assignment() builds a list: not every loop)
                    if not self.consumer.assignment():
                        last_data = time.monotonic()  # still joining the group: not idle yet
                    elif time.monotonic() - last_data > idle_timeout_s:
                        break
            self._retrying("scoring", self._score_all)
            self._commit_all()
            self._flush_metrics()
        finally:
            self.close()
        return self.stats

    def _retrying(self, what: str, step) -> None:
        """Run ``step`` until it succeeds, backing off while Redis or Triton is down.

        Consumption is paused meanwhile (polls keep the group membership alive) and nothing
        is committed, so a crash during an outage loses nothing: the events are redelivered.
        """
        delay = self.backoff_s[0]
        paused = False
        while True:
            try:
                step()
                break
            except Exception as exc:
                if not is_outage(exc) or (self._stop.is_set() and self.give_up_on_stop):
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                self.stats.retries += 1
                if not paused:
                    self.consumer.pause(self.consumer.assignment())
                    paused = True
                self._stop.wait(delay)
                self._keep_alive()
                delay = min(delay * 2, self.backoff_s[1])
        if paused:
            self.consumer.resume(self.consumer.assignment())

    def _poll(self, timeout_s: float) -> list:
        """Up to ``max_poll_records`` records: waits for the first, takes what else is there."""
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        # consume(n, timeout) would wait out its timeout unless n records came.
        messages = [first, *self.consumer.consume(self.max_poll_records - 1, 0)] if self.max_poll_records > 1 else [first]
        records = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(message)
            elif error.fatal():
                raise KafkaException(error)
            else:  # e.g. the topic not created yet: librdkafka retries by itself
                log.warning("Kafka: %s", error)
        return records

    def _keep_alive(self) -> None:
        """While paused, serve the group protocol. A record from a partition assigned
        meanwhile (not paused) is put back, to be read again after the outage."""
        message = self.consumer.poll(0)
        if message is not None and message.error() is None:
            tp = TopicPartition(message.topic(), message.partition(), message.offset())
            self.consumer.seek(tp)
            self.consumer.pause([tp])

    def _apply(self, records) -> None:
        valid, arrived = [], []
        for record in records:
            try:
                valid.append(ev.decode(record.value()))
                arrived.append(record.timestamp()[1] / 1000)
            except ev.InvalidEvent as exc:
                self._dead_letter(record, exc.reason, exc.detail)
        self._retrying("feature update", lambda: self.features.apply(valid))
        self._seq += 1
        seq = self._seq
        if valid and len(self._dirty) == len(self._batch):
            self._dirty_since = time.monotonic()
        for event, t in zip(valid, arrived):
            if event.type == "discharge":
                self._discharged.add(event.hadm_id)
            change = self._dirty.get(event.hadm_id)
            if change is None:
                self._dirty[event.hadm_id] = Change(t, seq, seq)
                self._firsts[seq] += 1
            elif change.in_flight:
                change.next_arrived = min(t, change.next_arrived if change.next_arrived is not None else t)
                change.next_first = change.next_first or seq
                change.last = seq
            else:
                change.arrived, change.last = min(change.arrived, t), seq
        ends: dict[tuple[str, int], int] = {}
        for record in records:  # a partition's records come in offset order
            ends[record.topic(), record.partition()] = record.offset() + 1
        for (topic, partition), end in ends.items():
            tp = TopicPartition(topic, partition)
            self._consumed[tp] = max(self._consumed.get(tp, 0), end)
        self._positions.append((seq, dict(self._consumed)))
        self.stats.events += len(records)

    # --- scoring, one batch in flight on a background thread ----------------------------

    def _launch(self) -> None:
        # Nothing is in flight when a batch is launched: the oldest changes go first.
        batch = list(itertools.islice(self._dirty, self.max_batch))
        for h in batch:
            self._dirty[h].in_flight = True
        self._batch, self._batch_seq = batch, self._seq
        discharged = {h for h in batch if h in self._discharged}
        self._future = self._scoring.submit(self._score_batch, batch, discharged)
        if len(self._dirty) > len(batch):  # the rest waits for the next batch from now
            self._dirty_since = time.monotonic()

    def _score_batch(self, batch: list[int], discharged: set[int]) -> float:
        """(On the scoring thread.) Read, score, write and publish one batch; returns when."""
        inputs, feature_times = self.features.inputs(batch)
        los, mortality = self.scorer.score(inputs)
        now = time.time()
        scores = [RiskScore(h, float(l), float(m), self.scorer.model, t, now)
                  for h, l, m, t in zip(batch, los, mortality, feature_times)]
        self.scores.write_batch(scores, {h: h not in discharged for h in batch})
        self.scores.discharge(sorted(discharged))
        for score in scores:
            self._send(self.settings.kafka.topic_scores, str(score.hadm_id).encode(), score.as_json().encode())
        return now

    def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        with self._send_lock:  # numbered in the order they enter _unacked
            number = next(self._sends)
            self._unacked[number] = None
        while True:
            try:
                self.producer.produce(topic, value=value, key=key,
                                      on_delivery=functools.partial(self._delivered, number))
                return
            except BufferError:  # the local queue is full: wait for deliveries to make room
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused before sending (e.g. over message.max.bytes)
                self._send_failure = exc
                return

    def _delivered(self, number: int, error, message) -> None:
        # Runs in poll() or flush(); a failure is checked before every commit and stays
        # unacknowledged, so no commit point after it is ever committed.
        if error is not None:
            self._send_failure = KafkaException(error)
        else:
            with self._send_lock:
                del self._unacked[number]

    def _finish(self) -> None:
        """Collect the batch in flight. On failure its admissions wait, dirty, for the next
        batch (the error is raised)."""
        future, batch, self._future, self._batch = self._future, self._batch, None, []
        try:
            scored_at = future.result()
        except BaseException:
            for h in batch:
                change = self._dirty[h]
                change.in_flight = False
                if change.next_arrived is not None:
                    change.arrived = min(change.arrived, change.next_arrived)
                change.next_arrived = change.next_first = None
            raise
        for h in batch:
            change = self._dirty.pop(h)
            self.metrics.latency.observe(max(0.0, scored_at - change.arrived))
            self._firsts[change.first] -= 1
            if not self._firsts[change.first]:
                del self._firsts[change.first]
            if change.next_first is not None:  # changed again while in flight: score again
                self._dirty[h] = Change(change.next_arrived, change.next_first, change.last)
                self._firsts[change.next_first] += 1
            elif h in self._discharged and change.last <= self._batch_seq:
                self._discharged.discard(h)
        self.metrics.batch_size.observe(len(batch))
        self.stats.scored += len(batch)
        self.stats.batches += 1

    def _collect(self) -> None:
        try:
            self._finish()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("scoring failed (%s); scoring synchronously until it recovers", type(exc).__name__)
            self._retrying("scoring", self._score_all)

    def _score_all(self) -> None:
        """Score until nothing is dirty or in flight: at shutdown, and while recovering."""
        while self._future is not None or self._dirty:
            if self._future is None:
                self._launch()
            self._future.exception()  # wait for it
            self._finish()

    def _dead_letter(self, record, reason: str, detail: str) -> None:
        self._send(self.settings.kafka.topic_dead_letter, record.key(), dead_letter_record(record, reason, detail))
        self.stats.dead_letters += 1
        self.stats.dead_letter_reasons[reason] = self.stats.dead_letter_reasons.get(reason, 0) + 1
        log.warning("dead letter: %s at %s[%d]@%d", reason, record.topic(), record.partition(), record.offset())

    def _forget(self, partitions) -> None:
        """Revoked partitions' positions are no longer this worker's to commit: were it to
        get one back, its stale position would move the group's offset backwards."""
        gone = set(partitions)
        for tp in gone:
            self._consumed.pop(tp, None)
        for offsets in [offsets for _, offsets in self._positions] + [p[0] for p in self._commit_points]:
            for tp in gone:
                offsets.pop(tp, None)

    def _take_commit_point(self) -> None:
        """Note the consumed positions of the last poll whose events are all in written
        scores (or dead letters), if that moved, with the records sent until now: it is
        committed once Kafka has acknowledged them (``_commit_acknowledged``)."""
        floor = min(self._firsts, default=self._seq + 1) - 1
        offsets = None
        while self._positions and self._positions[0][0] <= floor:
            _, offsets = self._positions.popleft()
        if offsets is not None:
            with self._send_lock:
                sent = next(self._sends)  # every record sent before this point numbers less
            self._commit_points.append((offsets, sent))
        self._point_taken_at = time.monotonic()

    def _commit_acknowledged(self) -> None:
        """Commit the latest commit point whose records are all acknowledged, without
        waiting: neither for the acks (a commit used to flush the producer on this thread,
        2 to 50 ms every commit under load) nor for the broker's answer to the commit (a
        failed commit is logged; the next one covers it)."""
        self._check_sends()
        with self._send_lock:  # the scoring thread sends meanwhile
            oldest = next(iter(self._unacked), None)  # insertion order is send number order
        offsets = None
        while self._commit_points and (oldest is None or self._commit_points[0][1] <= oldest):
            offsets, _ = self._commit_points.popleft()
        if offsets is not None:
            self._commit(offsets, asynchronous=True)

    def _commit_all(self) -> None:
        """At the end: wait for every record's ack, then commit all that is scored."""
        self._take_commit_point()
        if self.producer.flush(self.kafka_timeout_s):
            # A broker that does not answer stops the worker uncommitted rather than hanging
            # it (its events are redelivered).
            raise RuntimeError(f"Kafka did not acknowledge {len(self.producer)} record(s) within "
                               f"{self.kafka_timeout_s:.0f} s")
        self._check_sends()
        # With nothing new, the last commit is sent again if it went out asynchronously: it
        # must land before the worker leaves the group (closing does not promise to wait).
        offsets = self._commit_points[-1][0] if self._commit_points else self._last_async_commit
        self._commit_points.clear()
        if offsets is not None:
            self._commit(offsets, asynchronous=False)

    def _check_sends(self) -> None:
        # A record Kafka refused stops the worker uncommitted rather than losing the record.
        if self._send_failure is not None:
            raise RuntimeError(f"Kafka did not take a record: {self._send_failure!r}") from self._send_failure

    def _commit(self, offsets: dict, asynchronous: bool) -> None:
        assigned = set(self.consumer.assignment())  # a revoked partition's events go to its new owner
        mine = [TopicPartition(tp.topic, tp.partition, offset) for tp, offset in offsets.items() if tp in assigned]
        if mine:
            self.consumer.commit(offsets=mine, asynchronous=asynchronous)
        self._last_async_commit = offsets if asynchronous else None
        self.stats.commits += 1

    def _flush_metrics(self) -> None:
        # librdkafka keeps the high watermark each fetch response carries: asking the broker
        # for the end offsets instead stalled the loop for ~0.1 s a flush under load.
        lag = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            _, end = self.consumer.get_watermark_offsets(tp, cached=True)
            if end >= 0 and tp.offset >= 0:  # both known once a fetch from the partition returned
                lag[f"{tp.topic}:{tp.partition}"] = max(0, end - tp.offset)
        self.metrics.lag = lag
        try:
            self.metrics.flush(asdict(self.stats))
        except REDIS_OUTAGES as exc:
            # Metrics are best effort: an outage must not stop the worker (the next flush has them).
            log.warning("metrics not published (%s)", type(exc).__name__)

    def close(self) -> None:
        self._scoring.shutdown(wait=True)
        self.producer.flush(self.kafka_timeout_s)
        self.producer = None  # librdkafka lets go of the broker when it is collected
        self.consumer.close()
