"""Issue 21: the same cohort by two doors. The synthetic cohort written as an HL7 v2 message
stream (``m3t ingest synth --format hl7``) and sent by python-hl7's own MLLP client to the
listener, then applied by the stream worker, gives the online features ``ingest replay``
gives; corrections and cancels sent the same way change the store as the state says."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import numpy as np
import pytest
from hl7.client import MLLPClient
from typer.testing import CliRunner

from features.fitted import FittedFeatures
from features.online import OnlineStore
from features.state import AdmissionState
from features.vocab import Vocabulary
from ingest import events as ev
from ingest import hl7_writer
from ingest.cli import app as ingest_app
from ingest.cli import msa_code, split_messages
from ingest.mimic import MimicReader
from ingest.mllp import MllpListener
from m3t.kafka import own_topics
from stream.scores import HISTORY_KEY, RANKING_KEY, SCORE_KEY, ScoreStore
from stream.scoring import OnlineFeatures
from stream.wiring import connect
from tests.conftest import replay_all
from tests.test_ingest_hl7 import _Running

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("scores_restored")]


class ConstantScorer:
    """A stand-in model: the test is about the features, not the scores' values."""

    model = "constant:1"

    def score(self, inputs):
        n = len(inputs["hadm_id"])
        return np.full(n, 2.0), np.full(n, 0.25)


@pytest.fixture(scope="module")
def hl7_cohort(settings):
    root = settings.state_dir / f"hl7-parity-{uuid.uuid4().hex[:6]}"  # under an image root
    result = CliRunner().invoke(
        ingest_app,
        ["synth", "--admissions", "5", "--seed", "21", "--out", str(root), "--image-size", "32",
         "--no-dicom", "--format", "hl7", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    admissions = list(MimicReader(root).admissions())
    messages = split_messages((root / "hl7" / "messages.hl7").read_text())
    assert json.loads(result.stdout)["hl7_messages"] == len(messages)
    return admissions, messages


def apply_topic(settings, store, expected: int):
    """The stream worker applies the settings' events topic to ``store``."""
    worker = connect(
        settings, OnlineFeatures(store), ConstantScorer(), ScoreStore(store.client), max_batch=8
    )
    stats = worker.run(stop_after=expected, idle_timeout_s=30)
    assert stats.events == expected and stats.dead_letters == 0
    return stats


def cancel(events, what: str, when=None) -> ev.CancelEvent:
    last = events[-1]
    return ev.CancelEvent(
        event_id=f"cancel-{what}",
        hadm_id=last.hadm_id,
        subject_id=last.subject_id,
        event_time=when or last.event_time + timedelta(hours=2),
        source="test",
        payload=ev.CancelPayload(cancels=what),
    )


def send(settings, messages) -> list[str]:
    running = _Running(MllpListener(settings))
    try:
        with MLLPClient(running.host, running.port) as client:
            return [msa_code(client.send_message(m)) for m in messages]
    finally:
        running.stop()


def test_the_hl7_stream_gives_the_features_the_replay_gives(settings, hl7_cohort, redis_client):
    admissions, messages = hl7_cohort
    events = [e for evs in admissions for e in evs]
    fitted = FittedFeatures.unnormalised(
        Vocabulary.fit(e.payload.text for e in events if e.type == "note")
    )
    by_replay, by_hl7 = own_topics(settings), own_topics(settings)
    replayed = OnlineStore(redis_client, fitted, scratch=f"replay-{uuid.uuid4().hex[:6]}")
    streamed = OnlineStore(redis_client, fitted, scratch=f"hl7-{uuid.uuid4().hex[:6]}")
    for evs in admissions:  # other tests score the same cohort: no score of theirs stays
        h = evs[0].hadm_id
        redis_client.delete(SCORE_KEY.format(hadm_id=h), HISTORY_KEY.format(hadm_id=h))
    try:
        replay_all(by_replay, admissions)
        apply_topic(by_replay, replayed, len(events))

        assert send(by_hl7, messages) == ["AA"] * len(messages)
        apply_topic(by_hl7, streamed, len(events))

        hadm_ids = [evs[0].hadm_id for evs in admissions]
        assert {e.type for e in events} >= {"admission", "transfer", "note", "cxr", "discharge"}
        assert streamed.read_blobs(hadm_ids) == replayed.read_blobs(hadm_ids)
        serving_keys = [streamed.keys(h)[0] for h in hadm_ids]
        # One GET a key: on a Redis Cluster the admissions' keys lie in different slots.
        assert [redis_client.get(k) for k in serving_keys] == [
            redis_client.get(replayed.keys(h)[0]) for h in hadm_ids
        ]
        status = streamed.read_status(hadm_ids)
        assert status == replayed.read_status(hadm_ids)
        assert all(s == "discharged" and ward for s, ward in status)

        # Corrections and cancels, by the same door: an A13 reopens one admission, an A11
        # takes another off, a corrected result replaces the value it corrects.
        reopened, cancelled = admissions[0], admissions[1]
        observation = next(e for e in reopened if e.type == "observation")
        after = reopened[-1].event_time + timedelta(hours=1)
        correction = observation.model_copy(
            update={
                "event_id": "correction",
                "event_time": after,
                "payload": observation.payload.model_copy(
                    update={"status": "corrected", "value": observation.payload.value + 1}
                ),
            }
        )
        fixes = [correction, cancel(reopened, "discharge", after), cancel(cancelled, "admission")]
        writer = hl7_writer.Hl7Writer()
        writer.count = 10**6  # control ids of their own
        writer.admitted = {evs[0].hadm_id: evs[0] for evs in admissions}
        codes = send(by_hl7, [writer.message(e) for e in fixes])
        assert codes == ["AA"] * 3
        apply_topic(by_hl7, streamed, 3)

        want = AdmissionState()
        for e in [*reopened, *fixes[:2]]:  # the correction and the A13
            want.apply(e, fitted.vocab)
        got = streamed.read_blobs([reopened[0].hadm_id])[0]
        np.testing.assert_array_equal(
            fitted.assemble([got])["numeric_raw"], fitted.assemble([want.to_blob()])["numeric_raw"]
        )
        assert got != replayed.read_blobs([reopened[0].hadm_id])[0]  # the value changed
        statuses = streamed.read_status([reopened[0].hadm_id, cancelled[0].hadm_id])
        assert [s for s, _ in statuses] == ["open", "cancelled"]
        assert redis_client.zscore(RANKING_KEY, reopened[0].hadm_id) == 0.25  # back on it
        assert redis_client.zscore(RANKING_KEY, cancelled[0].hadm_id) is None

        # An A11 takes the reopened admission, open and ranked, off the ranking.
        withdrawn = cancel(reopened, "admission", after + timedelta(hours=1))
        assert send(by_hl7, [writer.message(withdrawn)]) == ["AA"]
        apply_topic(by_hl7, streamed, 1)
        assert streamed.read_status([reopened[0].hadm_id])[0][0] == "cancelled"
        assert redis_client.zscore(RANKING_KEY, reopened[0].hadm_id) is None
    finally:
        replayed.drop()
        streamed.drop()
