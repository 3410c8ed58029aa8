"""The stream worker: Kafka events in, current features and risk scores out.

One loop, one direction: poll (auto-commit off) -> validate -> apply to the feature store ->
mark admissions pending -> score them in micro-batches -> write scores -> commit. Offsets
are committed only after the Redis writes they cover have succeeded, so delivery is at
least once; the feature store and the score store are idempotent, so a redelivered event
changes nothing. Invalid events go to the dead-letter topic with their reason before their
offset is committed.

Scoring is pipelined: one micro-batch is scored on a background thread (feature read,
Triton, score writes) while the loop goes on polling and applying the next events, so the
worker's Python and Triton's model run at the same time. A change is scored at once when no
batch is in flight; what comes while one is in flight makes the next batch (``batcher``).
One bad event or admission stops nothing else: it becomes a dead letter and the rest go
on. Each part is a module of ``stream``: ``kafka_io`` (source and sink), ``applying``,
``batcher`` (what to score and when), ``batch_scoring``, ``ledger`` and ``committer``
(which offsets are safe, and committing them), ``dead_letters``, ``outages`` (waiting out
Redis or Triton). This module wires them; ``stream.wiring.connect`` builds a worker from
the settings.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

from features.image_files import ImageAccess
from stream.applying import EventApplier
from stream.batch_scoring import BatchScorer
from stream.batcher import MicroBatcher
from stream.committer import Committer
from stream.dead_letters import DeadLetters
from stream.interfaces import FeatureSource, Scorer
from stream.kafka_io import KafkaSink, KafkaSource
from stream.ledger import CommitLedger
from stream.metrics import WorkerMetrics, WorkerStats
from stream.outages import Retrier, is_outage
from stream.scores import ScoreStore

log = logging.getLogger(__name__)


class StreamWorker:
    """The stream loop, wiring the parts that each do one job.

    Args:
        source: the events topic (``KafkaSource``); the worker closes it.
        sink: where scores and dead letters go (``KafkaSink``); the worker closes it.
        features: applies events and reads model inputs (the online feature store).
        scorer: scores model inputs (M3T-LM on Triton).
        scores: the score store in Redis.
        scores_topic: the topic every written score is also published to.
        dead_letter_topic: the topic of events the worker cannot take.
        max_batch: most admissions in one scoring batch.
        max_wait_ms: longest a change waits for a batch to fill while events keep coming
            (0: scored at once when no batch is in flight).
        worker_id: the name its metrics are published under (default: host-pid).
        max_event_bytes: larger events are dead letters, unparsed.
        max_event_lead_s: an event dated further after its Kafka timestamp is a dead letter
            (None: no limit).
        dead_letter_payload: whether dead letters carry the event's bytes.
        images: where X-ray URIs may point (None: not checked at the door).
        explain_share: with a scorer that explains, most of a thread's time spent on
            reasons after the scores are written (``stream.reasoner``).
    """

    # Ranking entries whose score expired are pruned this often.
    prune_interval_s = 60.0
    # A poll returns as soon as a record comes; with nothing to score it waits this long, so
    # the loop's other duties (commits, metrics, a stop) still run this often.
    idle_poll_s = 0.1
    # With a batch in flight, the loop comes back this often to collect it and launch the next.
    in_flight_poll_s = 0.001

    def __init__(
        self,
        source: KafkaSource,
        sink: KafkaSink,
        features: FeatureSource,
        scorer: Scorer,
        scores: ScoreStore,
        *,
        scores_topic: str,
        dead_letter_topic: str,
        max_batch: int = 256,
        max_wait_ms: int = 0,
        worker_id: str | None = None,
        max_event_bytes: int = 512 * 1024,
        max_event_lead_s: float | None = None,
        dead_letter_payload: bool = False,
        images: ImageAccess | None = None,
        explain_share: float = 0.5,
    ):
        self.source, self.sink = source, sink
        self.scorer, self.scores = scorer, scores
        # Scorers that wait for missing X-rays offer admissions for another try.
        self._retries_due = getattr(scorer, "retries_due", None)
        self.batcher = MicroBatcher(max_batch, max_wait_ms / 1000)
        self.ledger = CommitLedger()
        self.committer = Committer(source, sink, self.ledger)
        self.outages = Retrier(source, on_retry=self._count_retry)
        # Revoked partitions' events not yet in a written score are redelivered to the new
        # owner; the stores are idempotent, so that changes nothing.
        source.on_revoke = self.ledger.forget
        self.dead_letters = DeadLetters(sink, dead_letter_topic, dead_letter_payload)
        self.applier = EventApplier(
            features,
            self.dead_letters,
            self._retrying,
            max_event_bytes=max_event_bytes,
            max_event_lead_s=max_event_lead_s,
            images=images,
        )
        self._pruned_at = time.monotonic()
        self.stats = WorkerStats()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics(
            scores.client, self.worker_id, images=getattr(scorer, "image_errors", None)
        )
        self.batch_scorer = BatchScorer(
            features,
            scorer,
            scores,
            sink,
            scores_topic,
            self.dead_letters,
            self.metrics.stages,
            explain_share,
            busy=lambda: bool(self.batcher.pending),  # reasons take only idle time
        )
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="m3t-scoring")
        self._future: Future | None = None
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
        # worker: out of the collector's sight, full collections stay short.
        gc.freeze()
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                records = self.source.poll(
                    self.batcher.poll_wait_s(self.idle_poll_s, self.in_flight_poll_s)
                )
                if records:
                    last_data = time.monotonic()
                    self._apply(records)
                if self._future is not None and self._future.done():
                    self._collect()
                if self._future is None and self.batcher.due(polled=bool(records)):
                    self._launch()
                self.sink.serve()  # delivery reports: the acknowledgements commits wait for
                self._commit()
                self._retry_due_images()
                if self.metrics.due():
                    self._flush_metrics()
                if time.monotonic() - self._pruned_at >= self.prune_interval_s:
                    self._prune_ranking()
                if stop_after is not None and self.stats.events >= stop_after:
                    break
                if idle_timeout_s is not None and not records:
                    if not self.source.assignment():
                        last_data = time.monotonic()  # still joining the group: not idle yet
                    elif time.monotonic() - last_data > idle_timeout_s:
                        break
            self._retrying("scoring", self._score_all)
            self.committer.commit_all(self.batcher.floor(self.ledger.poll))
            self.stats.commits = self.committer.commits
            self._flush_metrics()
        finally:
            self.close()
        return self.stats

    def _retrying(self, what: str, step) -> None:
        self.outages.run(what, step, self._stop)

    def _count_retry(self) -> None:
        self.stats.retries += 1

    def _count_dead_letters(self) -> None:
        self.stats.dead_letters = self.dead_letters.total
        self.stats.dead_letter_reasons = dict(self.dead_letters.reasons)  # a copy: asdict-safe

    def _apply(self, records) -> None:
        polled_at, began = time.time(), time.perf_counter()
        # Kafka's timestamp (the producer's, in ms) to this poll: the broker and the fetch.
        sent = sum(r.timestamp()[1] for r in records) / 1000
        self.metrics.stages.add("consume", max(0.0, polled_at * len(records) - sent), len(records))
        changes = self.applier(records)
        self.metrics.stages.add("apply", time.perf_counter() - began, len(records))
        ends = {(r.topic(), r.partition()): r.offset() + 1 for r in records}  # in offset order
        self.batcher.add(self.ledger.polled(ends), changes)
        self.stats.events += len(records)
        self._count_dead_letters()

    # --- scoring, one batch in flight on a background thread ----------------------------

    def _launch(self) -> None:
        batch, discharged = self.batcher.launch(self.ledger.poll)
        self._future = self._scoring.submit(self.batch_scorer, batch, discharged)

    def _finish(self) -> None:
        """Collect the batch in flight. On failure its admissions wait for the next batch
        (the error is raised)."""
        future, self._future = self._future, None
        try:
            scored_at, refused = future.result()
        except BaseException:
            self.batcher.failed()
            raise
        arrivals = self.batcher.scored()
        for arrived in arrivals:
            self.metrics.latency.observe(max(0.0, scored_at - arrived))
        self.metrics.batch_size.observe(len(arrivals))
        self.stats.scored += len(arrivals) - refused
        self._count_dead_letters()
        self.stats.batches += 1

    def _collect(self) -> None:
        try:
            self._finish()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning(
                "scoring failed (%s); scoring synchronously until it recovers", type(exc).__name__
            )
            self._retrying("scoring", self._score_all)

    def _score_all(self) -> None:
        """Score until nothing is pending or in flight: at shutdown, and while recovering."""
        while self._future is not None or self.batcher.pending:
            if self._future is None:
                self._launch()
            self._future.exception()  # wait for it
            self._finish()

    def _commit(self) -> None:
        if self.committer.point_due():
            self.committer.take_point(self.batcher.floor(self.ledger.poll))
        self.committer.commit_acknowledged()
        self.stats.commits = self.committer.commits

    def _retry_due_images(self) -> None:
        """Admissions whose X-ray was missing and is due another try are scored again."""
        if self._retries_due is None:
            return
        now = time.time()
        hadm_ids = self._retries_due(now)
        if hadm_ids:
            self.batcher.add(self.ledger.poll, [(h, now, False) for h in hadm_ids])

    def _prune_ranking(self) -> None:
        self._pruned_at = time.monotonic()
        try:
            self.scores.prune_ranking()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("ranking not pruned (%s)", type(exc).__name__)  # the next prune is

    def _flush_metrics(self) -> None:
        self.metrics.lag = self.source.lag()
        reasoner = self.batch_scorer.reasoner
        if reasoner is not None:
            self.stats.reasons = {**asdict(reasoner.stats), "waiting": reasoner.waiting}
        try:
            self.metrics.flush(asdict(self.stats))
        except Exception as exc:
            if not is_outage(exc):
                raise
            # Metrics are best effort: an outage must not stop the worker (the next flush has them).
            log.warning("metrics not published (%s)", type(exc).__name__)

    def close(self) -> None:
        self._scoring.shutdown(wait=True)
        if self.batch_scorer.reasoner is not None:
            self.batch_scorer.reasoner.close()  # its scores go out through the sink
        self.sink.close()
        self.source.close()
