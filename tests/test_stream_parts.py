"""The worker's pure parts, without Kafka: the commit ledger and the micro-batcher."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stream.batcher import MicroBatcher
from stream.ledger import CommitLedger

A, B = ("events", 0), ("events", 1)


# --- the commit ledger ----------------------------------------------------------------------


def test_a_point_is_the_newest_position_whose_polls_are_all_scored():
    ledger = CommitLedger()
    assert ledger.polled({A: 10}) == 1
    assert ledger.polled({B: 4}) == 2
    assert ledger.polled({A: 12}) == 3
    assert ledger.consumed == {A: 12, B: 4}
    assert not ledger.take_point(floor=0, mark=7)  # poll 1 not fully scored yet
    assert ledger.take_point(floor=2, mark=7)
    assert ledger.points[-1] == ({A: 10, B: 4}, 7)  # poll 3's position is not in it
    assert not ledger.take_point(floor=2, mark=9)  # nothing moved
    assert ledger.take_point(floor=3, mark=9)
    assert [p for p, _ in ledger.points] == [{A: 10, B: 4}, {A: 12, B: 4}]


def test_a_position_never_moves_back_within_a_partition():
    ledger = CommitLedger()
    ledger.polled({A: 10})
    ledger.polled({A: 8})  # a redelivery after a rebalance
    assert ledger.consumed == {A: 10}


def test_a_point_is_ready_only_once_every_record_sent_before_it_is_acknowledged():
    ledger = CommitLedger()
    ledger.polled({A: 1})
    ledger.take_point(floor=1, mark=5)  # records 0-4 were sent before it
    ledger.polled({A: 2})
    ledger.take_point(floor=2, mark=8)
    assert ledger.ready(oldest_unacknowledged=4) is None  # record 4 still waits
    assert ledger.ready(oldest_unacknowledged=5) == {A: 1}
    assert ledger.ready(oldest_unacknowledged=7) is None
    assert ledger.ready(oldest_unacknowledged=None) == {A: 2}  # nothing unacknowledged
    assert not ledger.points


def test_the_newest_ready_point_is_committed_and_older_ones_dropped():
    ledger = CommitLedger()
    for poll in range(1, 4):
        ledger.polled({A: poll})
        ledger.take_point(floor=poll, mark=poll)
    assert ledger.ready(oldest_unacknowledged=None) == {A: 3}
    assert ledger.ready(oldest_unacknowledged=None) is None


def test_final_resends_the_last_asynchronous_commit_when_nothing_is_newer():
    ledger = CommitLedger()
    ledger.polled({A: 3})
    ledger.take_point(floor=1, mark=0)
    positions = ledger.ready(None)
    ledger.committed(positions, asynchronous=True)
    assert ledger.final() == {A: 3}
    ledger.committed(positions, asynchronous=False)
    assert ledger.final() is None
    ledger.polled({A: 5})
    ledger.take_point(floor=2, mark=0)
    assert ledger.final() == {A: 5} and not ledger.points


def test_revoked_partitions_are_forgotten_everywhere():
    ledger = CommitLedger()
    ledger.polled({A: 3, B: 2})
    ledger.take_point(floor=1, mark=0)
    ledger.polled({A: 4, B: 6})
    ledger.forget([B])
    assert ledger.consumed == {A: 4}
    assert ledger.points[0][0] == {A: 3}
    ledger.take_point(floor=2, mark=0)
    assert ledger.points[-1][0] == {A: 4}


def test_a_revoked_partition_is_not_in_the_commit_at_shutdown():
    ledger = CommitLedger()
    ledger.polled({A: 3, B: 100})
    ledger.take_point(floor=1, mark=0)
    ledger.committed(ledger.ready(None), asynchronous=True)
    ledger.forget([B])  # B moves to another member, which commits past 100
    assert ledger.final() == {A: 3}  # not B at 100 again, which would move it backwards


# --- the micro-batcher -----------------------------------------------------------------------


def test_batches_take_the_oldest_changes_first_up_to_max_batch():
    batcher = MicroBatcher(max_batch=2, max_wait_s=60)
    batcher.add(1, [(10, 1.0, False), (11, 2.0, False)])
    batcher.add(2, [(12, 3.0, False), (10, 4.0, False)])  # 10 changes again before any batch
    assert batcher.waiting == 3
    batch, discharged = batcher.launch(poll=2)
    assert batch == [10, 11] and discharged == set()
    assert batcher.waiting == 1
    with pytest.raises(RuntimeError):
        batcher.launch(poll=2)
    assert batcher.scored() == [1.0, 2.0]  # the oldest change of each admission
    assert list(batcher.pending) == [12]


def test_a_change_while_in_flight_is_scored_by_the_next_batch():
    batcher = MicroBatcher(max_batch=8, max_wait_s=60)
    batcher.add(1, [(10, 1.0, False)])
    batcher.launch(poll=1)
    batcher.add(2, [(10, 5.0, False), (10, 6.0, False)])
    change = batcher.pending[10]
    assert change.in_flight and change.next_first == 2 and change.next_arrived == 5.0
    assert batcher.waiting == 0  # it waits for its batch to land
    assert batcher.scored() == [1.0]
    again = batcher.pending[10]
    assert not again.in_flight and (again.arrived, again.first) == (5.0, 2)
    assert batcher.launch(poll=2)[0] == [10]


def test_a_failed_batch_waits_for_the_next_keeping_its_oldest_arrival():
    batcher = MicroBatcher(max_batch=8, max_wait_s=60)
    batcher.add(1, [(10, 3.0, False)])
    batcher.launch(poll=1)
    batcher.add(2, [(10, 1.5, False)])
    batcher.failed()
    change = batcher.pending[10]
    assert not change.in_flight and change.arrived == 1.5 and change.next_first is None
    assert batcher.launch(poll=2)[0] == [10]


def test_the_floor_is_the_last_poll_whose_every_change_is_scored():
    batcher = MicroBatcher(max_batch=1, max_wait_s=60)
    assert batcher.floor(poll=0) == 0
    batcher.add(1, [(10, 1.0, False)])
    batcher.add(2, [(11, 2.0, False)])
    assert batcher.floor(poll=2) == 0
    batcher.launch(poll=2)
    batcher.scored()  # 10, from poll 1
    assert batcher.floor(poll=2) == 1
    batcher.launch(poll=2)
    batcher.add(3, [(11, 3.0, False)])  # while 11 is in flight
    batcher.scored()
    assert batcher.floor(poll=3) == 2  # poll 3's change to 11 is not scored yet
    batcher.launch(poll=3)
    batcher.scored()
    assert batcher.floor(poll=3) == 3 and not batcher.pending


def test_a_discharge_is_reported_until_a_batch_that_read_it_is_written():
    batcher = MicroBatcher(max_batch=8, max_wait_s=60)
    batcher.add(1, [(10, 1.0, True)])
    assert batcher.launch(poll=1)[1] == {10}
    batcher.add(2, [(10, 2.0, False)])  # a late result, while the discharge is scored
    batcher.scored()
    assert batcher.launch(poll=2)[1] == {
        10
    }  # still discharged: the next score keeps it off the ranking
    batcher.scored()
    batcher.add(3, [(10, 3.0, False)])
    assert batcher.launch(poll=3)[1] == set()


def test_a_batch_is_due_when_the_stream_pauses_a_batch_is_full_or_a_change_waited():
    batcher = MicroBatcher(max_batch=2, max_wait_s=60)
    assert not batcher.due(polled=False)  # nothing waiting
    batcher.add(1, [(10, 1.0, False)])
    assert not batcher.due(polled=True)
    assert batcher.due(polled=False)
    batcher.add(2, [(11, 1.0, False)])
    assert batcher.due(polled=True)  # a full batch
    impatient = MicroBatcher(max_batch=100, max_wait_s=0.0)
    impatient.add(1, [(10, 1.0, False)])
    assert impatient.due(polled=True)


def test_with_no_fill_wait_a_change_is_scored_at_once_and_batches_grow_while_one_is_in_flight():
    batcher = MicroBatcher(max_batch=4)  # no fill wait: the default
    batcher.add(1, [(10, 1.0, False)])
    assert batcher.due(polled=True)  # the stream is busy, yet nothing is in flight
    assert batcher.launch(poll=1)[0] == [10]
    batcher.add(2, [(11, 2.0, False), (12, 2.0, False)])
    batcher.add(3, [(13, 3.0, False), (14, 3.0, False), (15, 3.0, False)])
    assert batcher.waiting == 5  # what piled up while the batch was scored
    batcher.scored()
    assert batcher.due(polled=True)
    assert batcher.launch(poll=3)[0] == [11, 12, 13, 14]  # up to max_batch, oldest first
    batcher.scored()
    assert batcher.launch(poll=3)[0] == [15]


def test_the_loop_polls_briefly_with_a_batch_in_flight_and_long_when_idle():
    eager, filling = MicroBatcher(max_batch=8), MicroBatcher(max_batch=8, max_wait_s=0.02)
    for batcher in (eager, filling):
        assert batcher.poll_wait_s(idle_s=0.1, in_flight_s=0.001) == 0.1  # nothing pending
        batcher.add(1, [(10, 1.0, False)])
    assert eager.poll_wait_s(idle_s=0.1, in_flight_s=0.001) == 0.0  # launch it now
    assert filling.poll_wait_s(idle_s=0.1, in_flight_s=0.001) == 0.02  # an empty poll launches
    for batcher in (eager, filling):
        batcher.launch(poll=1)
        assert batcher.poll_wait_s(idle_s=0.1, in_flight_s=0.001) == 0.001
        batcher.scored()
        assert batcher.poll_wait_s(idle_s=0.1, in_flight_s=0.001) == 0.1


def test_stage_times_add_up_seconds_runs_and_items_per_stage():
    from stream.metrics import STAGES, StageTimes

    stages = StageTimes()
    stages.add("read", 0.002, 10)
    stages.add("read", 0.004, 30)
    snapshot = stages.as_dict()
    assert set(snapshot) == set(STAGES)
    assert snapshot["read"] == {"seconds": pytest.approx(0.006), "count": 2, "items": 40}
    assert snapshot["model"] == {"seconds": 0.0, "count": 0, "items": 0}
    json.dumps(snapshot)  # published as JSON


# --- isolation and outages -------------------------------------------------------------------


def test_isolate_finds_the_items_that_fail_alone_and_runs_the_rest():
    from stream.isolation import isolate

    applied, calls = [], []

    def step(group):
        calls.append(list(group))
        if any(x % 7 == 3 for x in group):
            raise ValueError("bad item")
        applied.extend(group)

    failed = isolate(list(range(20)), step, outage=lambda exc: False)
    assert [item for item, _ in failed] == [3, 10, 17]
    assert all(isinstance(exc, ValueError) for _, exc in failed)
    assert sorted(applied) == [x for x in range(20) if x % 7 != 3]
    assert calls[0] == list(range(20))  # the whole group first, halves only after it failed


def test_isolate_raises_an_outage_at_once():
    from stream.isolation import isolate

    class Down(Exception):
        pass

    def step(group):
        raise Down()

    with pytest.raises(Down):
        isolate([1, 2, 3], step, outage=lambda exc: isinstance(exc, Down))
    assert isolate([], step, outage=lambda exc: False) == []


def test_outages_are_unreachable_servers_and_redis_refusing_writes_nothing_else():
    import redis
    from tritonclient.utils import InferenceServerException

    from stream.outages import is_outage

    assert is_outage(redis.exceptions.ConnectionError("refused"))
    assert is_outage(redis.exceptions.TimeoutError())
    assert is_outage(redis.exceptions.OutOfMemoryError("command not allowed"))
    assert is_outage(redis.exceptions.ReadOnlyError("You can't write against a read only replica"))
    assert is_outage(redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB"))
    script = "Error running script: @user_script:3: -OOM command not allowed when used memory"
    assert is_outage(redis.exceptions.ResponseError(script))
    assert is_outage(InferenceServerException("down", status="StatusCode.UNAVAILABLE"))
    assert is_outage(InferenceServerException("slow", status="StatusCode.DEADLINE_EXCEEDED"))
    assert not is_outage(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_outage(
        InferenceServerException("bad input", status="StatusCode.INVALID_ARGUMENT")
    )
    assert not is_outage(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert not is_outage(OverflowError())


def test_a_score_must_be_finite_and_in_range():
    from stream.scores import valid_score

    assert valid_score(4.2, 0.1) is None
    assert valid_score(float("nan"), 0.1) == "non_finite_score"
    assert valid_score(3.0, float("inf")) == "non_finite_score"
    assert valid_score(3.0, 1.2) == "score_out_of_range"
    assert valid_score(-1.0, 0.2) == "score_out_of_range"


# --- the door of the event applier ------------------------------------------------------------


class Record:
    """What the applier reads of a Kafka record: its value and its timestamp."""

    def __init__(self, value: bytes, timestamp_s: float):
        self._value, self._ms = value, int(timestamp_s * 1000)

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ms)


def _observation(when):
    from ingest import events as ev

    return ev.ObservationEvent(
        event_id=ev.event_id("door", when.isoformat()),
        hadm_id=1,
        subject_id=1,
        event_time=when,
        source="door",
        payload=ev.ObservationPayload(itemid=50912, value=1.0, charttime=when, kind="lab"),
    )


def test_an_event_dated_too_far_after_its_kafka_timestamp_is_refused():
    from datetime import UTC, datetime, timedelta

    from ingest import events as ev
    from stream.applying import EventApplier

    sent = datetime(2030, 1, 1, tzinfo=UTC)
    ahead = Record(ev.encode(_observation(sent + timedelta(hours=2))), sent.timestamp())
    on_time = Record(ev.encode(_observation(sent + timedelta(seconds=30))), sent.timestamp())
    live = EventApplier(None, None, None, max_event_lead_s=60)
    with pytest.raises(ev.InvalidEvent) as refused:
        live.decode(ahead)
    assert refused.value.reason == "event_time_ahead"
    assert live.decode(on_time).event_time == sent + timedelta(seconds=30)
    replay = EventApplier(None, None, None, max_event_lead_s=None)  # shifted historical dates
    assert replay.decode(ahead).hadm_id == 1


def test_an_xray_that_can_never_be_read_is_refused_at_the_door(tmp_path):
    import os
    from datetime import UTC, datetime

    from features.image_files import UNCONFINED
    from ingest import events as ev
    from stream.applying import EventApplier

    access = dataclasses.replace(UNCONFINED, roots=(tmp_path,))
    os.mkfifo(tmp_path / "fifo.png")
    when = datetime(2030, 1, 1, tzinfo=UTC)

    def cxr(uri: str) -> Record:
        event = ev.CxrEvent(
            event_id=ev.event_id("door", uri),
            hadm_id=1,
            subject_id=1,
            event_time=when,
            source="door",
            payload=ev.CxrPayload(study_id=1, dicom_id="d", uri=uri, studytime=when),
        )
        return Record(ev.encode(event), when.timestamp())

    applier = EventApplier(None, None, None, images=access)
    for uri in ("file:///etc/passwd", (tmp_path / "fifo.png").as_uri(), "s3://bucket/x.png"):
        with pytest.raises(ev.InvalidEvent) as refused:
            applier.decode(cxr(uri))
        assert refused.value.reason == "image_refused" and "/" not in refused.value.detail
    # A file not there yet may still land: the scorer waits for it.
    assert applier.decode(cxr((tmp_path / "later.png").as_uri())).type == "cxr"


def test_dead_letters_are_all_sent_and_counted_but_logged_at_1_2_4_8(caplog):
    from stream.dead_letters import DeadLetters

    class Sink:
        def __init__(self):
            self.sent = []

        def send(self, topic, key, value):
            self.sent.append((topic, key, json.loads(value)))

    class Message:
        def __init__(self, offset):
            self._offset = offset

        def value(self):
            return b'{"name": "a patient"}'

        def key(self):
            return b"7"

        def topic(self):
            return "events"

        def partition(self):
            return 0

        def offset(self):
            return self._offset

    sink = Sink()
    letters = DeadLetters(sink, "dead")
    with caplog.at_level("WARNING", logger="stream.dead_letters"):
        for offset in range(20):
            letters.event(Message(offset), "malformed_json", "line 1")
        letters.admission(7, "scoring_failed", "ValueError")
    assert len(sink.sent) == 21 and letters.total == 21
    assert letters.reasons == {"malformed_json": 20, "scoring_failed": 1}
    assert [m for m in caplog.messages if "malformed_json" in m] == [
        f"dead letter: malformed_json at events[0]@{n - 1} ({n} so far)" for n in (1, 2, 4, 8, 16)
    ]
    letter = sink.sent[0][2]
    assert "value_b64" not in letter and letter["value_bytes"] == 21  # no payload by default
    assert not any("patient" in m for m in caplog.messages)
    assert sink.sent[0][1] == b"7"  # keyed as the event, an admission id


def test_a_dead_letter_is_keyed_by_the_admission_or_a_hash_never_a_foreign_key():
    import hashlib

    from stream.dead_letters import letter_key

    assert letter_key(b"20000019") == b"20000019" and letter_key(None) is None
    huge = b"9" * 999_700  # under the broker's limit, over the worker producer's
    for key in (huge, b"Jane Doe", "\u00b2".encode()):
        assert letter_key(key) == hashlib.sha256(key).hexdigest().encode()


def test_a_commit_point_is_taken_at_most_every_interval_busy_or_quiet():
    import time

    from stream.committer import Committer

    class Sink:
        def mark(self) -> int:
            return 0

    committer = Committer(source=None, sink=Sink(), ledger=CommitLedger(), interval_s=0.2)
    committer.take_point(0)
    assert not committer.point_due()  # a quiet stream's next event does not commit at once
    time.sleep(0.25)
    assert committer.point_due()
    committer.take_point(1)
    assert not committer.point_due()
