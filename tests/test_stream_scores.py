"""Issue 16, lifecycle: a discharge keeps the patient off the ranking for good, and scores
expire with the admission's features. Against the real Redis."""

from __future__ import annotations

import pytest

from features.online import DISCHARGED_TTL_S, OPEN_TTL_S
from stream.scores import HISTORY_KEY, RANKING_KEY, SCORE_KEY, RiskScore, ScoreStore

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("scores_restored")]


def score(hadm_id: int, t: float, risk: float = 0.3) -> RiskScore:
    return RiskScore.predicted(hadm_id, 4.0, risk, "m:1", t, t + 1)


def test_a_late_score_after_the_discharge_never_puts_the_patient_back(redis_client):
    hadm = 71_000_001
    store = ScoreStore(redis_client)
    store.write_batch([score(hadm, 100.0)])
    assert redis_client.zscore(RANKING_KEY, hadm) is not None
    store.write_batch([score(hadm, 200.0)], discharged={hadm})  # the discharge's score
    assert redis_client.zscore(RANKING_KEY, hadm) is None
    # A lab result after the discharge, scored by a worker that never saw it (a restart).
    assert ScoreStore(redis_client).write_batch([score(hadm, 300.0, risk=0.9)]) == 1
    assert redis_client.zscore(RANKING_KEY, hadm) is None
    assert store.get(hadm).mortality_prob == 0.9  # the score itself stays current


def test_scores_expire_with_the_features(redis_client):
    hadm = 71_000_002
    store = ScoreStore(redis_client)
    store.write_batch([score(hadm, 100.0)])
    for key in (SCORE_KEY, HISTORY_KEY):
        assert OPEN_TTL_S - 60 < redis_client.ttl(key.format(hadm_id=hadm)) <= OPEN_TTL_S
    store.write_batch([score(hadm, 200.0)], discharged={hadm})
    for key in (SCORE_KEY, HISTORY_KEY):
        ttl = redis_client.ttl(key.format(hadm_id=hadm))
        assert DISCHARGED_TTL_S - 60 < ttl <= DISCHARGED_TTL_S


def test_a_discharge_without_a_new_score_leaves_the_ranking_for_good(redis_client):
    hadm = 71_000_003
    store = ScoreStore(redis_client)
    store.write_batch([score(hadm, 100.0)])
    store.discharge([hadm])
    assert redis_client.zscore(RANKING_KEY, hadm) is None
    assert redis_client.ttl(SCORE_KEY.format(hadm_id=hadm)) <= DISCHARGED_TTL_S
    store.write_batch([score(hadm, 150.0)])
    assert redis_client.zscore(RANKING_KEY, hadm) is None


def test_ranking_entries_whose_score_expired_are_pruned(redis_client):
    kept, expired = 71_000_004, 71_000_005
    store = ScoreStore(redis_client)
    store.write_batch([score(kept, 100.0), score(expired, 100.0)])
    redis_client.delete(SCORE_KEY.format(hadm_id=expired))  # as its TTL would
    assert store.prune_ranking() >= 1
    assert redis_client.zscore(RANKING_KEY, expired) is None
    assert redis_client.zscore(RANKING_KEY, kept) is not None


def test_the_hash_and_history_carry_the_remaining_stay_and_the_expected_discharge(redis_client):
    hadm = 71_000_006
    store = ScoreStore(redis_client)
    store.write_batch([RiskScore.predicted(hadm, 2.25, 0.1, "m:1", 1_000_000.0, 1_000_001.0)])
    stored = redis_client.hgetall(SCORE_KEY.format(hadm_id=hadm))
    assert float(stored[b"los_remaining_days"]) == 2.25
    assert float(stored[b"expected_discharge"]) == 1_000_000.0 + 2.25 * 86400
    assert b"los_days" not in stored
    store.write_batch([RiskScore.predicted(hadm, 0.5, 0.2, "m:1", 1_086_400.0, 1_086_401.0)])
    (latest, first) = store.history(hadm)
    assert float(first["expected_discharge"]) == 1_000_000.0 + 2.25 * 86400
    assert float(latest["los_remaining_days"]) == 0.5
    assert float(latest["expected_discharge"]) == 1_086_400.0 + 0.5 * 86400
    got = store.get(hadm)
    assert (got.los_remaining_days, got.expected_discharge) == (0.5, 1_086_400.0 + 0.5 * 86400)


def test_a_hash_without_a_remaining_stay_is_no_score(redis_client):
    # A discharge recorded before any score was written, and a score from before the
    # remaining-stay contract (its los_days was the whole stay): neither is a current score.
    store = ScoreStore(redis_client)
    never_scored, old_contract = 71_000_007, 71_000_008
    store.discharge([never_scored])
    redis_client.hset(
        SCORE_KEY.format(hadm_id=old_contract),
        mapping={"los_days": 5.0, "mortality_prob": 0.4, "model": "m:1", "feature_time": 1.0},
    )
    redis_client.zadd(RANKING_KEY, {old_contract: 0.4})
    assert store.get(never_scored) is None and store.get(old_contract) is None
    assert old_contract not in [s.hadm_id for s in store.top(1000)]
    redis_client.zrem(RANKING_KEY, old_contract)


def test_a_reopened_admission_comes_back_on_the_ranking_with_its_ward(redis_client):
    """A cancelled discharge (A13): the feature state says open again, and the next score
    puts the patient back; the ward travels with every score and its history."""
    hadm = 71_000_006
    store = ScoreStore(redis_client)
    store.write_batch([RiskScore.predicted(hadm, 4.0, 0.3, "m:1", 100.0, 101.0, "MICU")])
    store.write_batch([score(hadm, 200.0)], discharged={hadm})
    assert redis_client.zscore(RANKING_KEY, hadm) is None
    store.write_batch([score(hadm, 150.0, risk=0.4)], reopened={hadm})  # a stale score, reopened
    assert redis_client.zscore(RANKING_KEY, hadm) == 0.3  # the stored, newer score ranks
    later = RiskScore.predicted(hadm, 3.0, 0.6, "m:1", 300.0, 301.0, "Medicine")
    store.write_batch([later], reopened={hadm})
    assert redis_client.zscore(RANKING_KEY, hadm) == 0.6
    assert store.get(hadm).ward == "Medicine"
    assert [h["ward"] for h in store.history(hadm)][-1] == "MICU"
