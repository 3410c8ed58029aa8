"""Replay: global event-time order, pacing, and a round trip through the real Kafka broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from ingest import events as ev
from ingest.mimic import MimicReader
from ingest.replay import Pacer, first_hours, in_event_time_order, make_producer, replay
from ingest.synth import generate
from tests.conftest import consume, settings_env


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    generate(out, 25, seed=5, image_size=64, dicom=False)
    return out


@pytest.fixture(scope="module")
def admissions(cohort):
    return list(MimicReader(cohort).admissions())


# --------------------------------------------------------------------------- pure logic


def test_merge_gives_global_event_time_order_and_keeps_every_event(admissions):
    merged = list(in_event_time_order(admissions))
    assert len(merged) == sum(map(len, admissions))
    assert merged == sorted(merged, key=ev.sort_key)
    per_admission = {}
    for event in merged:
        per_admission.setdefault(event.hadm_id, []).append(event)
    assert all(per_admission[events[0].hadm_id] == events for events in admissions)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_pacer_compresses_time_and_cuts_long_gaps():
    clock = FakeClock()
    pacer = Pacer(speed=60, max_wait_s=2.0, clock=clock, sleep=clock.sleep)
    t0 = datetime(2150, 1, 1, tzinfo=UTC)
    for minutes in (0, 1, 1, 3, 60 * 24 * 365):  # the last: a year later
        pacer.wait_for(t0 + timedelta(minutes=minutes))
    assert clock.slept == [1.0, 2.0, 2.0]  # 1 min -> 1 s, 2 min -> 2 s, a year -> capped at 2 s
    unpaced = Pacer(speed=0, clock=clock, sleep=clock.sleep)
    unpaced.wait_for(t0)
    unpaced.wait_for(t0 + timedelta(days=1))
    assert len(clock.slept) == 3


# --------------------------------------------------------------------------- the real broker


@pytest.mark.services
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_replay_round_trip_through_kafka_in_order_per_admission(
    isolated_settings, admissions, client
):
    kafka = isolated_settings.kafka
    producer = make_producer(isolated_settings, client)
    try:
        summary = replay(
            admissions, producer, kafka.topic_events, dead_letter_topic=kafka.topic_dead_letter
        )
    finally:
        producer.close()
    total = sum(map(len, admissions))
    assert summary.events == total and not summary.dead_letters
    assert summary.by_type["admission"] == len(admissions)

    records = consume(isolated_settings, kafka.topic_events, total)
    assert len(records) == total
    received: dict[int, list] = {}
    partitions: dict[int, set] = {}
    for record in records:
        event = ev.decode(record.value)  # validated on the consuming side too
        assert record.key == str(event.hadm_id).encode()
        received.setdefault(event.hadm_id, []).append(event.event_id)
        partitions.setdefault(event.hadm_id, set()).add(record.partition)
    for events in admissions:
        assert received[events[0].hadm_id] == [e.event_id for e in events]
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # keys spread over partitions


@pytest.mark.services
def test_both_clients_put_an_admission_on_the_same_partition(isolated_settings, admissions):
    kafka = isolated_settings.kafka
    sample = [events[:1] for events in admissions]
    for client in ("kafka-python", "confluent"):
        producer = make_producer(isolated_settings, client)
        replay(sample, producer, kafka.topic_events, dead_letter_topic=kafka.topic_dead_letter)
        producer.close()
    records = consume(isolated_settings, kafka.topic_events, 2 * len(sample))
    partitions: dict[bytes, set] = {}
    for record in records:
        partitions.setdefault(record.key, set()).add(record.partition)
    assert len(partitions) == len(sample) and all(len(p) == 1 for p in partitions.values())


@pytest.mark.services
def test_an_invalid_event_goes_to_the_dead_letter_topic_without_its_content(
    isolated_settings, admissions
):
    kafka = isolated_settings.kafka
    opened = admissions[0][0]
    secret = "SECRET-NOTE-TEXT " * 7000  # over the contract's note size limit
    note = ev.NoteEvent(
        event_id=ev.event_id("test", 1),
        hadm_id=opened.hadm_id,
        subject_id=opened.subject_id,
        event_time=opened.event_time,
        source="note/radiology",
        payload=dict(
            note_type="radiology",
            text="fine",
            charttime=opened.payload.admittime,
            note_id="n1",
            from_hadm_id=opened.hadm_id,
        ),
    )
    # model_copy does not validate: this is how a broken event could reach a producer.
    broken = note.model_copy(update={"payload": note.payload.model_copy(update={"text": secret})})
    producer = make_producer(isolated_settings)
    summary = replay(
        [[opened, broken]], producer, kafka.topic_events, dead_letter_topic=kafka.topic_dead_letter
    )
    producer.close()
    assert summary.events == 1 and summary.dead_letters == {"schema_violation": 1}
    [letter] = consume(isolated_settings, kafka.topic_dead_letter, 1, role="admin")
    body = json.loads(letter.value)
    assert body["reason"] == "schema_violation" and body["source"] == "note/radiology"
    assert body["position"] == f"event {broken.event_id}" and "text" in body["detail"]
    assert b"SECRET" not in letter.value


@pytest.mark.services
def test_cli_replay_streams_a_cohort(isolated_settings, cohort, monkeypatch):
    from ingest.cli import app
    from m3t.settings import get_settings

    for name, value in settings_env(isolated_settings).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["replay", str(cohort), "--speed", "0", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["events"] > 0 and summary["dead_letters"] == {}
    assert (
        len(consume(isolated_settings, isolated_settings.kafka.topic_events, summary["events"]))
        == summary["events"]
    )


def test_first_hours_keeps_each_admissions_opening_window(admissions):
    from datetime import timedelta

    cut = list(first_hours(admissions, 24.0))
    assert len(cut) == len(admissions)
    for full, kept in zip(admissions, cut):
        admit = full[0].event_time
        assert full[0].type == "admission" and kept[0] == full[0]
        assert kept == [e for e in full if e.event_time <= admit + timedelta(hours=24)]
        stay = next(e for e in full if e.type == "discharge").event_time - admit
        assert any(e.type == "discharge" for e in kept) == (stay <= timedelta(hours=24))
