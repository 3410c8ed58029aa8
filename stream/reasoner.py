"""New reasons for written scores, computed on a thread of their own, off the scoring path.

A score is written and published at once with its reasons pending (``stream.explanations``);
the scoring thread hands the row's ``m3t_explain`` inputs here. This thread explains them a
few at a time, newest first (under a backlog the latest changes get theirs soonest), writes
the reasons into the score's hash and history where it is still the admission's current
score, and publishes the score again, now with its reasons, on the scores topic (same
admission and feature time; the writer of scores holds the same lock, so an admission's
last record on the topic is its current score, as in Redis).

Only the latest score of an admission waits: a newer one replaces it, as its reasons would
be stale before they were shown; one replaced or gone by its turn costs no model call. The
thread explains only while no admission waits to be scored, and spends at most ``share`` of its
time explaining (it sleeps the rest), so under a load the machine cannot explain, the stream
keeps its pace and the reasons fall behind, never the scores. An outage is waited out with
the jobs kept.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stream.explanations import Pending, top_reasons
from stream.outages import is_outage
from stream.scores import RiskScore, ScoreStore

log = logging.getLogger(__name__)

BUSY_WAIT_S = 0.002  # how often a thread held back by the scoring looks again


@dataclass(frozen=True)
class Job:
    """A written score waiting for its reasons, with the inputs it was scored from."""

    score: RiskScore
    inputs: dict[str, np.ndarray]  # m3t_explain's inputs, this admission's row ([1, ...])
    pending: Pending


@dataclass
class ReasonerStats:
    explained: int = 0  # scores given their reasons
    superseded: int = 0  # replaced by a newer score of the admission before explained
    stale: int = 0  # a newer score was written meanwhile (or it expired): not written
    dropped: int = 0  # the oldest waiting, let go when more than ``max_waiting`` waited
    outages: int = 0  # explaining or writing waited out an outage


class Reasoner:
    """Args:
    contributions: ``m3t_explain`` on stacked inputs: [rows, N_CONTRIBUTIONS].
    scores: the score store the reasons go to.
    publish: sends a score (with its reasons) to the scores topic.
    share: most of its time the thread spends explaining (1: no pause).
    per_request: admissions explained per ``contributions`` call.
    max_waiting: most scores waiting; beyond it the oldest is let go.
    retry_s: the pause after an outage.
    lock: held while reasons are written and published (the scores' writer holds it too).
    busy: whether admissions wait to be scored (or are being scored); the thread waits
        until none do, so it takes only time the scoring leaves idle (None: never waits).
    """

    def __init__(
        self,
        contributions: Callable[[dict[str, np.ndarray]], np.ndarray],
        scores: ScoreStore,
        publish: Callable[[RiskScore], None],
        *,
        share: float = 0.5,
        per_request: int = 4,
        max_waiting: int = 10_000,
        retry_s: float = 1.0,
        lock: threading.Lock | None = None,
        busy: Callable[[], bool] | None = None,
    ):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.contributions, self.scores, self.publish = contributions, scores, publish
        self.share, self.per_request = share, per_request
        self.max_waiting, self.retry_s = max_waiting, retry_s
        self.lock = lock or threading.Lock()
        self.busy = busy
        self.stats = ReasonerStats()
        self._waiting: dict[int, Job] = {}  # by admission, oldest first
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Explain on a thread of its own from now on (until ``close``)."""
        self._thread = threading.Thread(target=self._run, name="m3t-reasons", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue scores for their reasons (a newer score of an admission replaces its older
        one)."""
        if not jobs:
            return
        with self._wake:
            for job in jobs:
                superseded = self._waiting.pop(job.score.hadm_id, None)
                if superseded is not None:
                    self.stats.superseded += 1
                self._waiting[job.score.hadm_id] = job
            while len(self._waiting) > self.max_waiting:
                del self._waiting[next(iter(self._waiting))]
                self.stats.dropped += 1
            self._wake.notify()

    @property
    def waiting(self) -> int:
        with self._wake:
            return len(self._waiting)

    def explain_waiting(self) -> int:
        """Explain the newest few waiting scores now; how many were taken (0: none waited).
        Newest first: under a backlog the latest changes get their reasons soonest. An
        outage puts them back, unless a newer score replaced them meanwhile."""
        with self._wake:
            newest = list(self._waiting)[-self.per_request :]
            taken = [self._waiting.pop(h) for h in reversed(newest)]
        if not taken:
            return 0
        try:
            self._explain(taken)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.stats.outages += 1
            log.warning("reasons wait for an outage to end (%s)", type(exc).__name__)
            with self._wake:
                for job in taken:
                    self._waiting.setdefault(job.score.hadm_id, job)
            raise
        return len(taken)

    def _explain(self, jobs: list[Job]) -> None:
        # A score replaced meanwhile (by another worker, or expired) is not worth the model.
        current = self.scores.feature_times([j.score.hadm_id for j in jobs])
        kept = [j for j, t in zip(jobs, current) if t == j.score.feature_time]
        self.stats.stale += len(jobs) - len(kept)
        if not kept:
            return
        jobs = kept
        stacked = {k: np.concatenate([j.inputs[k] for j in jobs]) for k in jobs[0].inputs}
        contributions = self.contributions(stacked)
        explained = [
            dataclasses.replace(
                j.score,
                reasons=top_reasons(c, j.pending.values, j.pending.previous),
            )
            for j, c in zip(jobs, contributions)
        ]
        with self.lock:
            written = self.scores.write_reasons(explained)
            for score, current in zip(explained, written):
                if current:
                    self.publish(score)
        self.stats.explained += sum(written)
        self.stats.stale += len(written) - sum(written)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            if self.busy is not None and self.busy():
                self._pause(BUSY_WAIT_S)
                continue
            began = time.perf_counter()
            try:
                self.explain_waiting()
            except Exception as exc:
                if not is_outage(exc):
                    log.exception("explaining failed; its scores keep no new reasons")
                    continue
                self._pause(self.retry_s)
                continue
            busy = time.perf_counter() - began
            self._pause(busy * (1.0 / self.share - 1.0))

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping, timeout=seconds)

    def close(self, drain_s: float = 30.0) -> None:
        """Stop the thread, first explaining what waits for up to ``drain_s``."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + drain_s
        while self.waiting and time.monotonic() < deadline:
            try:
                self.explain_waiting()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                break
        left = self.waiting
        if left:
            log.warning("%d score(s) left without new reasons at shutdown", left)
