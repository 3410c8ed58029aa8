"""Scoring one batch: read its features, run the model, guard the outputs, write and
publish the scores, and hand those waiting for new reasons to the reasoner.

It runs on the worker's scoring thread. An admission that cannot be scored on its own
(``stream.isolation``), or whose score is not finite or out of range, is a dead letter with
its reason and is never written; the rest of the batch is scored. Outages are raised, for
the worker to wait them out with the whole batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from features.state import CANCELLED, DISCHARGED, OPEN
from stream.dead_letters import DeadLetters
from stream.explanations import Pending
from stream.interfaces import FeatureSource, Scorer
from stream.isolation import isolate
from stream.kafka_io import KafkaSink
from stream.metrics import StageTimes
from stream.outages import is_outage
from stream.reasoner import Job, Reasoner
from stream.scores import RiskScore, ScoreStore, valid_score

log = logging.getLogger(__name__)


class BatchScorer:
    """Args:
    features: reads model inputs.
    scorer: the model.
    scores: the score store in Redis.
    sink: where scores and dead letters go.
    scores_topic: the topic every written score is also published to.
    dead_letters: where admissions that cannot be scored go.
    stages: where the time of the read, the model and the writes is added up.
    explain_share: with a scorer that explains (``stream.explanations``), most of a
        thread's time spent giving scores their reasons after they are written
        (``stream.reasoner``).
    busy: whether admissions wait to be scored; the reasons wait until none do.
    """

    def __init__(
        self,
        features: FeatureSource,
        scorer: Scorer,
        scores: ScoreStore,
        sink: KafkaSink,
        scores_topic: str,
        dead_letters: DeadLetters,
        stages: StageTimes | None = None,
        explain_share: float = 0.5,
        busy: Callable[[], bool] | None = None,
    ):
        self.features, self.scorer, self.scores = features, scorer, scores
        self.sink, self.scores_topic = sink, scores_topic
        self.dead_letters = dead_letters
        self.stages = stages or StageTimes()
        # Scores and their reasons are written and published under one lock, so the
        # topic's order is Redis's: an admission's last record is its current score.
        self._writing = threading.Lock()
        self.reasoner = (
            Reasoner(
                scorer.contributions,
                scores,
                self.publish,
                share=explain_share,
                lock=self._writing,
                busy=busy,
            )
            if getattr(scorer, "explainer", None) is not None
            else None
        )
        if self.reasoner is not None:
            self.reasoner.start()

    def __call__(self, batch: list[int], discharged: set[int]) -> tuple[float, int]:
        """Score ``batch`` (``discharged``: those whose discharge it includes); returns when
        it was scored and how many admissions were dead-lettered instead."""
        now = time.time()
        refused = []  # (hadm_id, reason, detail)

        def score(group):
            refused.extend(self._score(list(group), discharged, now))

        for hadm_id, exc in isolate(batch, score, is_outage):
            log.warning("an admission failed to score (%s)", type(exc).__name__)
            refused.append((hadm_id, "scoring_failed", type(exc).__name__))
        for hadm_id, reason, detail in refused:
            self.dead_letters.admission(hadm_id, reason, detail)
        return now, len(refused)

    def _score(self, group: list[int], discharged: set[int], now: float) -> list[tuple]:
        began = time.perf_counter()
        inputs, feature_times = self.features.inputs(group)
        # The feature state's status, where the features give it, rules the ranking: a
        # cancelled discharge reopens an admission, a cancelled admission is not scored.
        status = inputs.get("status")
        status = list(status) if status is not None else [""] * len(group)
        wards = inputs.get("ward")
        wards = list(wards) if wards is not None else [""] * len(group)
        if status.count(CANCELLED):
            self.scores.discharge([h for h, s in zip(group, status) if s == CANCELLED])
        if any(status):
            discharged = {h for h, s in zip(group, status) if s == DISCHARGED}
        reopened = {h for h, s in zip(group, status) if s == OPEN}
        read = time.perf_counter()
        explainer = getattr(self.scorer, "explainer", None) if self.reasoner else None
        pending: dict[int, Pending] = {}
        if explainer is None:
            los, mortality = self.scorer.score(inputs)
            scored = explained_at = time.perf_counter()
            explained = [None] * len(group)
        else:
            los, mortality, seen = self.scorer.score_explained(inputs)
            scored = time.perf_counter()
            explained, waiting = explainer.annotate(group, inputs, mortality, seen)
            pending = {p.row: p for p in waiting}
            explained_at = time.perf_counter()
        scores, refused, hash_only, rows_of = [], [], [], []
        rows = zip(group, los, mortality, feature_times, status, wards, explained)
        for row, (h, days, risk, t, s, ward, why) in enumerate(rows):
            if s == CANCELLED:
                continue
            reason = valid_score(float(days), float(risk))
            if reason is None:
                scores.append(
                    RiskScore.predicted(
                        h,
                        float(days),
                        float(risk),
                        self.scorer.model,
                        t,
                        now,
                        ward=ward or "",
                        explanation=why,
                    )
                )
                hash_only.append(explainer.hash_fields(why) if why else {})
                rows_of.append(row)
            else:
                refused.append((h, reason, f"model {self.scorer.model}"))
        with self._writing:
            self.scores.write_batch(scores, discharged, reopened, hash_only if explainer else None)
            for s in scores:
                self.publish(s)
        self.scores.discharge([h for h, *_ in refused if h in discharged])
        if pending:
            waits = [(s, row) for s, row in zip(scores, rows_of) if row in pending]
            inputs = self.scorer.explain_inputs([row for _, row in waits])
            self.reasoner.submit(
                [Job(s, arrays, pending[row]) for (s, row), arrays in zip(waits, inputs)]
            )
        n = len(group)
        self.stages.add("read", read - began, n)
        self.stages.add("model", scored - read, n)
        self.stages.add("explain", explained_at - scored, n)
        self.stages.add("write", time.perf_counter() - explained_at, n)
        return refused

    def publish(self, score: RiskScore) -> None:
        """Send a score to the scores topic, keyed by its admission."""
        self.sink.send(self.scores_topic, str(score.hadm_id).encode(), score.as_json().encode())
