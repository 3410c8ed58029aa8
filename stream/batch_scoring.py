"""Scoring one batch: read its features, run the model, guard the outputs, write and
publish the scores.

It runs on the worker's scoring thread. An admission that cannot be scored on its own
(``stream.isolation``), or whose score is not finite or out of range, is a dead letter with
its reason and is never written; the rest of the batch is scored. Outages are raised, for
the worker to wait them out with the whole batch.
"""

from __future__ import annotations

import logging
import time

from stream.dead_letters import DeadLetters
from stream.interfaces import FeatureSource, Scorer
from stream.isolation import isolate
from stream.kafka_io import KafkaSink
from stream.outages import is_outage
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
    """

    def __init__(
        self,
        features: FeatureSource,
        scorer: Scorer,
        scores: ScoreStore,
        sink: KafkaSink,
        scores_topic: str,
        dead_letters: DeadLetters,
    ):
        self.features, self.scorer, self.scores = features, scorer, scores
        self.sink, self.scores_topic = sink, scores_topic
        self.dead_letters = dead_letters

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
        inputs, feature_times = self.features.inputs(group)
        los, mortality = self.scorer.score(inputs)
        scores, refused = [], []
        for h, days, risk, t in zip(group, los, mortality, feature_times):
            reason = valid_score(float(days), float(risk))
            if reason is None:
                scores.append(
                    RiskScore.predicted(h, float(days), float(risk), self.scorer.model, t, now)
                )
            else:
                refused.append((h, reason, f"model {self.scorer.model}"))
        self.scores.write_batch(scores, discharged)
        self.scores.discharge([h for h, *_ in refused if h in discharged])
        for s in scores:
            self.sink.send(self.scores_topic, str(s.hadm_id).encode(), s.as_json().encode())
        return refused
