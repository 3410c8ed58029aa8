"""Issue 20, items 1 and 2: each score's reasons (what moved it) and the freshness of the data
behind it. The method on small torch models whose answer is known; freshness on constructed
states; the score store's round trip; and a scored admission's hash, topic and API."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from features import definitions as fd
from features import model_inputs as mi
from features import reasons as fr
from features import sample
from features.fitted import FittedFeatures
from features.state import AdmissionState, hours
from features.vocab import Vocabulary
from ingest import events as ev
from ingest.itemids import LABS, VITALS
from stream.explanations import VALUES_FIELD, describe, top_reasons
from stream.scores import HISTORY_KEY, SCORE_KEY, RiskScore, ScoreStore
from trainer.explain import Explain

CREATININE = fd.NUMERIC_FEATURES.index("creatinine.last")
CREATININE_REASON = fr.REASON_NAMES.index("Creatinine (latest, mg/dL)")


def inputs(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = [torch.randn(batch, 8, generator=g) for _ in range(3)]
    return [
        torch.randn(batch, fd.N_NUMERIC, generator=g),
        torch.ones(batch, fd.N_NUMERIC),
        *emb,
        torch.ones(batch, len(mi.MODALITIES)),
    ]


class Driven(nn.Module):
    """Mortality driven by the latest creatinine; every other input counts a little."""

    def forward(self, numeric, numeric_mask, emb_rad, emb_dis, emb_cxr, modality_mask):
        logit = (
            3.0 * numeric[:, CREATININE] * numeric_mask[:, CREATININE]
            + 0.02 * (numeric * numeric_mask).sum(dim=1)
            + 0.05 * modality_mask.sum(dim=1)
            - 1.0
        )
        return torch.ones_like(logit)[:, None], torch.sigmoid(logit)[:, None]


class Additive(nn.Module):
    """A probability that is a sum over features and modalities: occlusion is then exact."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = torch.randn(fd.N_NUMERIC, generator=g) * 0.002
        self.b = torch.tensor([0.03, -0.02, 0.05])

    def forward(self, numeric, numeric_mask, emb_rad, emb_dis, emb_cxr, modality_mask):
        p = 0.3 + (numeric * numeric_mask) @ self.a + modality_mask @ self.b
        return torch.ones_like(p)[:, None], p[:, None]


def test_the_feature_that_drives_the_output_ranks_first():
    x = inputs()
    x[0][:, CREATININE] = torch.tensor([2.0, -2.0, 1.5, 3.0])  # high and low creatinine
    with torch.no_grad():
        los, score, contributions = Explain(Driven())(*x)
        _, want = Driven()(*x)
    assert torch.allclose(score, want) and contributions.shape == (4, fr.N_CONTRIBUTIONS)
    for row in range(4):
        top = top_reasons(contributions[row].numpy(), {}, {})
        assert top[0]["feature"] == "Creatinine (latest, mg/dL)"
        assert top[0]["modality"] == "labs_vitals"
        # High creatinine raised the risk, low creatinine lowered it.
        assert np.sign(top[0]["contribution"]) == np.sign(float(x[0][row, CREATININE]))
        assert len(top) <= 5
        sizes = [abs(r["contribution"]) for r in top]
        assert sizes == sorted(sizes, reverse=True)


def test_on_an_additive_model_contributions_sum_to_the_distance_from_the_baseline():
    """Occlusion promises completeness only where the model is additive over the groups;
    there each contribution is exact too."""
    x = inputs(batch=3, seed=4)
    x[1][1, : fd.N_DEMOGRAPHIC] = 0  # some features missing: they contribute nothing
    x[5][2] = torch.tensor([1.0, 0.0, 1.0])  # no discharge summary
    model = Additive()
    with torch.no_grad():
        _, score, contributions = Explain(model)(*x)
        baseline = [torch.zeros_like(t) if i in (0, 1, 5) else t for i, t in enumerate(x)]
        _, at_baseline = model(*baseline)
    assert torch.allclose(contributions.sum(dim=1), (score - at_baseline)[:, 0], atol=1e-6)
    groups = torch.from_numpy(fr.GROUP_MATRIX)
    per_feature = x[0] * x[1] * model.a
    assert torch.allclose(contributions[:, : len(fr.GROUPS)], per_feature @ groups.T, atol=1e-6)
    assert torch.allclose(contributions[:, len(fr.GROUPS) :], x[5] * model.b, atol=1e-6)
    assert torch.all(contributions[1, :3] == 0) and contributions[2, -2] == 0


def test_every_numeric_feature_has_a_readable_name_and_a_group():
    labels = [fr.feature_label(n) for n in fd.NUMERIC_FEATURES]
    assert len(set(labels)) == fd.N_NUMERIC
    assert fr.feature_label("creatinine.mean_24h") == "Creatinine (mean, last 24 h, mg/dL)"
    assert fr.feature_label("heart_rate.hours_since_last") == "Heart Rate (hours since latest)"
    assert (fr.GROUP_MATRIX.sum(axis=0) == 1).all()  # every feature in exactly one group
    assert len(set(fr.REASON_NAMES)) == fr.N_CONTRIBUTIONS


def test_a_reason_reads_as_the_change_since_the_previous_score():
    reason = {
        "feature": "Creatinine (latest, mg/dL)",
        "modality": "labs_vitals",
        "value": 2.3,
        "previous": 1.1,
        "contribution": 0.06,
    }
    assert (
        describe(reason, 0.14, 0.08)
        == "Creatinine (latest, mg/dL) 1.1 -> 2.3 raised mortality risk 0.08 -> 0.14 (by 0.060)"
    )
    first = {**reason, "previous": None, "contribution": -0.02}
    assert describe(first, 0.14, None).startswith("Creatinine (latest, mg/dL) 2.3 lowered")


# --- freshness ---------------------------------------------------------------------------

T0 = sample.T0
VOCAB = Vocabulary.fit(["chest film clear"])


def _env(hadm_id: int, name: str, when) -> dict:
    return dict(
        event_id=ev.event_id("t", (hadm_id, name)),
        hadm_id=hadm_id,
        subject_id=1,
        event_time=when,
        source="t",
    )


def _events(hadm_id: int, with_labs_and_images: bool) -> list:
    admit = ev.AdmissionEvent(
        **_env(hadm_id, "admit", T0),
        payload=ev.AdmissionPayload(admittime=T0, admission_type="URGENT", gender="F", age=70.0),
    )
    at = lambda h: T0 + timedelta(hours=h)  # noqa: E731

    def observation(item, h, value):
        return ev.ObservationEvent(
            **_env(hadm_id, f"{item.name}-{h}", at(h)),
            payload=ev.ObservationPayload(
                itemid=item.itemid, value=value, charttime=at(h), kind=item.kind
            ),
        )

    events = [admit, observation(VITALS[0], 6, 88.0)]
    if with_labs_and_images:
        events += [
            observation(LABS[0], 2, 1.1),
            ev.NoteEvent(
                **_env(hadm_id, "rad", at(3)),
                payload=ev.NotePayload(
                    note_type="radiology",
                    text="chest film clear",
                    charttime=at(3),
                    note_id="r1",
                    from_hadm_id=hadm_id,
                ),
            ),
            ev.CxrEvent(
                **_env(hadm_id, "cxr", at(1)),
                payload=ev.CxrPayload(
                    study_id=1, dicom_id="d1", uri="file:///x.png", studytime=at(1)
                ),
            ),
        ]
    return events


def test_freshness_is_the_age_of_the_newest_of_each_kind_at_feature_time():
    fitted = FittedFeatures.unnormalised(VOCAB)
    states = []
    for hadm_id, full in ((1, True), (2, False)):
        state = AdmissionState()
        for event in _events(hadm_id, full):
            state.apply(event, VOCAB)
        states.append(state)
    batch = fitted.assemble([s.to_blob() for s in states])  # as of each one's latest event
    assert list(batch["as_of"]) == [hours(T0) + 6] * 2
    raw = fr.raw_values(batch[mi.NUMERIC], batch[mi.NUMERIC_MASK], fitted.mean, fitted.std)
    times = np.array([fr.newest_times(s.notes) for s in states])
    got = fr.freshness(raw, batch[mi.MODALITY_MASK], times[:, 0], times[:, 1], batch["as_of"])
    assert got[0] == {
        "lab_age_h": 4.0,
        "vital_age_h": 0.0,
        "note_age_h": 3.0,
        "cxr_age_h": 5.0,
        "absent": [],
    }
    assert got[1] == {
        "lab_age_h": None,
        "vital_age_h": 0.0,
        "note_age_h": None,
        "cxr_age_h": None,
        "absent": ["labs", "notes", "cxr"],
    }
    shown = fr.shown_values(raw)
    assert shown[0, CREATININE_REASON] == pytest.approx(1.1)
    assert np.isnan(shown[1, CREATININE_REASON])


# --- the score store, the stream, the topic and the API (real services) -----------------

EXPLANATION = {
    "reasons": [
        {
            "feature": "Creatinine (latest, mg/dL)",
            "modality": "labs_vitals",
            "value": 2.3,
            "previous": 1.1,
            "contribution": 0.06,
        }
    ],
    "freshness": {
        "lab_age_h": 1.0,
        "vital_age_h": 0.5,
        "note_age_h": None,
        "cxr_age_h": None,
        "absent": ["notes", "cxr"],
    },
    "previous_mortality_prob": 0.08,
}


@pytest.mark.services
def test_the_score_store_keeps_an_explanation_in_the_hash_and_history(
    redis_client, scores_restored
):
    hadm = 73_000_001
    store = ScoreStore(redis_client)
    plain = RiskScore.predicted(hadm, 3.0, 0.08, "m:1", 100.0, 101.0, ward="")
    explained = RiskScore.predicted(
        hadm, 3.0, 0.14, "m:1", 200.0, 201.0, ward="", explanation=EXPLANATION
    )
    store.write_batch([plain])
    assert store.get(hadm).reasons is None and store.get(hadm).freshness is None
    assert json.loads(plain.as_json())["reasons"] is None
    store.write_batch([explained], hash_only=[{VALUES_FIELD: json.dumps({"a": 1.0})}])
    got = store.get(hadm)
    assert got == explained
    assert json.loads(explained.as_json())["reasons"] == EXPLANATION["reasons"]
    latest, first = store.history(hadm)
    assert json.loads(latest["reasons"]) == EXPLANATION["reasons"]
    assert json.loads(latest["freshness"]) == EXPLANATION["freshness"]
    assert VALUES_FIELD not in latest and "reasons" not in first
    assert redis_client.hget(SCORE_KEY.format(hadm_id=hadm), VALUES_FIELD) == b'{"a": 1.0}'
    # A stale score changes nothing, its explanation included.
    stale = RiskScore.predicted(
        hadm, 1.0, 0.5, "m:1", 150.0, 300.0, explanation={**EXPLANATION, "reasons": []}
    )
    assert store.write_batch([stale]) == 0 and store.get(hadm) == explained
    assert redis_client.xlen(HISTORY_KEY.format(hadm_id=hadm)) == 2


class Store:
    """What the explainer reads of the online store: normalisation and note times."""

    fitted = FittedFeatures.unnormalised(VOCAB)

    def modality_times(self, hadm_ids):
        return np.full((len(hadm_ids), 2), np.nan)


@pytest.mark.services
def test_a_score_that_barely_moved_keeps_the_previous_reasons(redis_client, scores_restored):
    from stream.explanations import Explainer

    moved, still, first = 73_000_011, 73_000_012, 73_000_013
    ScoreStore(redis_client).write_batch(
        [
            RiskScore.predicted(moved, 3.0, 0.10, "m:1", 100.0, 101.0, explanation=EXPLANATION),
            RiskScore.predicted(still, 3.0, 0.10, "m:1", 100.0, 101.0, explanation=EXPLANATION),
        ]
    )
    batch = {
        mi.NUMERIC: np.zeros((3, fd.N_NUMERIC), np.float32),
        mi.NUMERIC_MASK: np.zeros((3, fd.N_NUMERIC), np.float32),
        "as_of": np.full(3, 1000.0),
    }
    explainer = Explainer(redis_client, Store(), min_change=0.02)
    got, pending = explainer.annotate(
        [moved, still, first], batch, np.array([0.15, 0.11, 0.2]), np.zeros((3, 3), np.float32)
    )
    assert [p.row for p in pending] == [0, 2]  # the one that barely moved waits for none
    assert got[0]["reasons"] is None and got[2]["reasons"] is None
    assert pending[0].previous == {}  # EXPLANATION's score kept no values
    assert got[1]["reasons"] == EXPLANATION["reasons"]
    assert [g["previous_mortality_prob"] for g in got] == [0.10, 0.10, None]
    assert got[2]["freshness"]["absent"] == ["labs", "vitals", "notes", "cxr"]


@pytest.mark.services
def test_a_scored_admission_carries_reasons_and_freshness_in_redis_the_topic_and_the_api(
    isolated_settings, cohort, deployed, redis_client, tmp_path, scores_restored
):
    from features.cxr import CxrPreprocessor
    from features.online import OnlineStore
    from stream.api_tokens import TokenStore
    from stream.explanations import Explainer
    from stream.scoring import CachedEncoderScorer, OnlineFeatures
    from stream.wiring import connect
    from stream.xrays import CxrInputs
    from tests.conftest import consume, replay_all
    from tests.test_api_security import bearer, own_state, serving

    settings = isolated_settings
    fitted, _ = deployed
    chosen = {h: cohort[h] for h in sorted(cohort)[:6]}
    store = OnlineStore(redis_client, fitted, scratch=f"explain-{settings.kafka.consumer_group}")
    scorer = CachedEncoderScorer(
        settings,
        redis_client,
        cxr=CxrInputs(CxrPreprocessor(device="cpu")),
        explainer=Explainer(redis_client, store),
    )
    assert scorer.explain.name == "m3t_explain"
    for h in chosen:
        redis_client.delete(SCORE_KEY.format(hadm_id=h), HISTORY_KEY.format(hadm_id=h))
    scores = ScoreStore(redis_client)
    scored = published_again = 0  # scores, and the same scores once their reasons came
    try:
        # Each stay up to its last event, then that event: every stay is scored twice at least.
        for part in ([e[:-1] for e in chosen.values()], [e[-1:] for e in chosen.values()]):
            replay_all(settings, part)
            worker = connect(
                settings, OnlineFeatures(store), scorer, scores, max_batch=8, max_wait_ms=20
            )
            total = sum(len(events) for events in part)
            worker.run(stop_after=total, idle_timeout_s=60)  # its reasons written by the end
            assert worker.stats.events == total and worker.stats.dead_letters == 0
            reasons = worker.batch_scorer.reasoner.stats
            assert reasons.dropped == reasons.outages == 0
            scored += worker.stats.scored
            published_again += reasons.explained
    finally:
        store.drop()

    for h in chosen:
        score = scores.get(h)
        assert score is not None and score.reasons, h
        assert 1 <= len(score.reasons) <= 5
        for reason in score.reasons:
            assert reason["feature"] in fr.REASON_NAMES
            assert reason["modality"] in ("labs_vitals", "demographics", "notes", "cxr")
        fresh = score.freshness
        assert set(fresh) == {"lab_age_h", "vital_age_h", "note_age_h", "cxr_age_h", "absent"}
        assert fresh["lab_age_h"] is None or fresh["lab_age_h"] >= 0
        assert score.previous_mortality_prob is not None  # each stay was scored before
        history = scores.history(h)
        assert len(history) > 1 and all("reasons" in entry for entry in history)
        # Each reason's previous value is its value at the score before.
        values = json.loads(redis_client.hget(SCORE_KEY.format(hadm_id=h), VALUES_FIELD))
        for reason in score.reasons:
            assert reason["value"] == values.get(reason["feature"])
    assert any(s.freshness["note_age_h"] is not None for s in map(scores.get, chosen))
    assert any(
        r["previous"] is not None for h in chosen for r in scores.get(h).reasons
    )  # a lab or vital measured before

    expected = scored + published_again
    records = consume(settings, settings.kafka.topic_scores, expected=expected, role="reader")
    published = [json.loads(r.value) for r in records]
    assert len(published) == expected
    assert all("reasons" in p and "freshness" in p for p in published)
    # An admission's last record is its current score, reasons and all (as in Redis).
    last = {p["hadm_id"]: p for p in published}
    for h in chosen:
        assert last[h]["reasons"] == scores.get(h).reasons
        assert last[h]["feature_time"] == scores.get(h).feature_time

    cfg = own_state(settings, tmp_path)
    reader = TokenStore(cfg).add("ward", "reader")
    h = sorted(chosen)[0]
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        body = api.get(f"/admissions/{h}/risk", headers=bearer(reader)).json()
    assert body["reasons"] == scores.get(h).reasons
    assert body["freshness"] == scores.get(h).freshness
    assert body["previous_mortality_prob"] == scores.get(h).previous_mortality_prob
