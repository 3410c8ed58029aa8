"""Issue 20, item 1: reasons computed after the score is written, off the scoring path
(``stream.reasoner``), against the session's Redis: where they land, what a newer score does
to them, an outage, a backlog, and the shutdown."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from benchmarks.browser import wait_for
from features import reasons as fr
from stream.explanations import Pending
from stream.reasoner import Job, Reasoner
from stream.scores import HISTORY_KEY, SCORE_KEY, RiskScore, ScoreStore

pytestmark = pytest.mark.services

CREATININE = fr.REASON_NAMES.index("Creatinine (latest, mg/dL)")
FRESH = {"lab_age_h": 1.0, "vital_age_h": None, "note_age_h": None, "cxr_age_h": None}


def pending_score(hadm_id: int, feature_time: float, risk: float) -> RiskScore:
    """A score as the stream writes it when its reasons are to come (no thread runs in
    these tests unless started: they drive the reasoner step by step, or ``close`` does)."""
    explanation = {"reasons": None, "freshness": FRESH, "previous_mortality_prob": 0.1}
    return RiskScore.predicted(
        hadm_id, 2.0, risk, "m:1", feature_time, feature_time + 1, "", explanation
    )


def job(score: RiskScore, driver: float) -> Job:
    """``driver``: the row's one input, which the fake model below turns into creatinine's
    contribution."""
    return Job(
        score,
        {"x": np.array([[driver]], np.float32)},
        Pending(0, {"Creatinine (latest, mg/dL)": 2.3}, {"Creatinine (latest, mg/dL)": 1.1}),
    )


class Model:
    """``m3t_explain`` stand-in: creatinine contributes each row's input; it can be told to
    fail as Triton down does."""

    def __init__(self):
        self.calls: list[int] = []
        self.down = False

    def __call__(self, arrays):
        if self.down:
            raise redis.exceptions.ConnectionError("down")
        self.calls.append(len(arrays["x"]))
        out = np.zeros((len(arrays["x"]), fr.N_CONTRIBUTIONS), np.float32)
        out[:, CREATININE] = arrays["x"][:, 0]
        return out


def explained_on_its_thread(reasoner: Reasoner, store: ScoreStore, hadm_id: int) -> None:
    """Start the reasoner's thread, hand it the admission's score and wait for its reasons;
    the thread is stopped without a drain, so only the thread can have written them."""
    reasoner.start()
    reasoner.submit([job(store.get(hadm_id), 0.03)])
    try:
        wait_for(lambda: store.get(hadm_id).reasons, timeout_s=10)
    finally:
        reasoner.close(drain_s=0)


@pytest.fixture
def store(redis_client, scores_restored):
    return ScoreStore(redis_client)


def test_reasons_land_in_the_hash_and_the_scores_own_history_entry_and_are_published(store):
    hadm = 73_100_001
    store.write_batch([pending_score(hadm, 100.0, 0.10)])
    store.write_batch([pending_score(hadm, 200.0, 0.14)])
    assert store.get(hadm).reasons is None
    published = []
    model = Model()
    reasoner = Reasoner(model, store, published.append)
    reasoner.submit([job(store.get(hadm), 0.04)])
    reasoner.close()

    got = store.get(hadm)
    assert got.reasons == [
        {
            "feature": "Creatinine (latest, mg/dL)",
            "modality": "labs_vitals",
            "value": 2.3,
            "previous": 1.1,
            "contribution": 0.04,
        }
    ]
    assert published == [got] and reasoner.stats.explained == 1
    latest, first = store.history(hadm)
    assert json.loads(latest["reasons"]) == got.reasons and latest["feature_time"] == "200.0"
    assert first["reasons"] == "null" and first["feature_time"] == "100.0"
    assert store.client.xlen(HISTORY_KEY.format(hadm_id=hadm)) == 2


def test_a_newer_score_before_the_reasons_keeps_them_out_and_replaces_a_waiting_one(store):
    stale, replaced = 73_100_011, 73_100_012
    older = pending_score(stale, 100.0, 0.10)
    store.write_batch([older])
    store.write_batch([pending_score(stale, 200.0, 0.30)])  # came while ``older`` waited
    published = []
    reasoner = Reasoner(Model(), store, published.append)
    reasoner.submit([job(older, 0.05)])
    first = pending_score(replaced, 100.0, 0.10)
    second = pending_score(replaced, 200.0, 0.20)
    store.write_batch([second])
    reasoner.submit([job(first, 0.01), job(second, 0.02)])  # one call: no thread races it
    reasoner.close()

    assert store.get(stale).reasons is None and reasoner.stats.stale == 1
    assert reasoner.stats.superseded == 1 and reasoner.stats.explained == 1
    assert store.get(replaced).reasons[0]["contribution"] == 0.02
    assert [p.hadm_id for p in published] == [replaced]


def test_an_outage_keeps_the_jobs_and_a_backlog_lets_the_oldest_go(store):
    hadm = [73_100_021 + i for i in range(5)]
    scores = [pending_score(h, 100.0, 0.1) for h in hadm]
    store.write_batch(scores)
    model = Model()
    reasoner = Reasoner(model, store, lambda s: None, max_waiting=3, per_request=2)
    model.down = True
    reasoner.submit([job(s, 0.03) for s in scores])
    assert reasoner.stats.dropped == 2 and reasoner.waiting == 3
    with pytest.raises(redis.exceptions.ConnectionError):
        reasoner.explain_waiting()
    assert reasoner.stats.outages == 1 and reasoner.waiting == 3
    model.down = False
    assert reasoner.explain_waiting() == 2  # the newest first
    assert [store.get(h).reasons is not None for h in hadm[2:]] == [False, True, True]
    assert reasoner.explain_waiting() == 1 and model.calls == [2, 1]
    assert [store.get(h).reasons is not None for h in hadm] == [False, False, True, True, True]


def test_a_score_gone_before_its_turn_costs_no_model_call(store):
    hadm = 73_100_041
    score = pending_score(hadm, 100.0, 0.1)
    store.write_batch([score])
    model = Model()
    reasoner = Reasoner(model, store, lambda s: None)
    reasoner.submit([job(score, 0.03)])
    store.client.delete(SCORE_KEY.format(hadm_id=hadm))  # expired, or pruned
    reasoner.close()
    assert model.calls == [] and reasoner.stats.stale == 1 and store.get(hadm) is None


def test_the_share_must_leave_the_thread_some_time():
    for share in (0.0, 1.5):
        with pytest.raises(ValueError):
            Reasoner(Model(), None, print, share=share)


def test_the_thread_explains_while_it_runs(store):
    hadm = 73_100_031
    store.write_batch([pending_score(hadm, 100.0, 0.1)])
    reasoner = Reasoner(Model(), store, lambda s: None, share=1.0)
    explained_on_its_thread(reasoner, store, hadm)
    assert reasoner.stats.explained == 1


def test_the_thread_waits_while_admissions_wait_to_be_scored(store):
    hadm = 73_100_051
    store.write_batch([pending_score(hadm, 100.0, 0.1)])
    seen: list[str] = []
    model = Model()

    def busy() -> bool:  # the stream has admissions to score for its first three looks
        seen.append("busy")
        return seen.count("busy") <= 3

    def explain(arrays):
        seen.append("explain")
        return model(arrays)

    reasoner = Reasoner(explain, store, lambda s: None, share=1.0, busy=busy)
    explained_on_its_thread(reasoner, store, hadm)
    assert seen[:4] == ["busy"] * 4 and seen[4] == "explain"
