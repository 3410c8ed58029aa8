"""Issue 16: hostile events, sent by an independent producer (kcat) to a running worker.

The worker runs the product's pieces (the online store, the cached-encoder scorer on
Triton). Afterwards it must be alive and scoring, no stored score may be non-finite, and the
dead-letter topic (read back with kcat) must hold exactly one letter per hostile event, with
its reason and without the event's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from features.cxr import CxrPreprocessor
from features.online import OnlineStore
from ingest import events as ev
from m3t.services.process import wait_until
from stream.scores import SCORE_KEY, ScoreStore
from stream.scoring import CachedEncoderScorer, OnlineFeatures
from stream.wiring import connect
from stream.xrays import CxrInputs
from tests.kcat import kcat

pytestmark = pytest.mark.services

ADMIT = datetime(2150, 6, 1, 8, tzinfo=UTC)


def kcat_produce(settings, key: str, value: bytes | None, folder, *options: str) -> None:
    """One record through kcat, as the producer; ``None`` sends a tombstone (a record with
    no value); ``options``: kcat's own (``-X`` properties)."""
    if value is None:  # a line "key:" with -Z: an empty value sent as NULL
        args, stdin = ["-K:", "-Z"], f"{key}:\n".encode()
    else:
        path = folder / f"m{time.monotonic_ns()}"
        path.write_bytes(value)  # a file is one record, whatever bytes it holds
        args, stdin = ["-k", key, str(path)], None
    produce = ["-P", "-t", settings.kafka.topic_events, *options, *args]
    kcat(settings, "producer", *produce, input=stdin, check=True, timeout=60, capture_output=True)


def kcat_positions(settings, topic: str) -> set[tuple[int, int]]:
    """(partition, offset) of every record of the events topic (whatever bytes it holds),
    read as the stream reads it."""
    out = kcat(
        settings,
        "stream",
        *["-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%p %o\n"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return {tuple(map(int, line.split())) for line in out.stdout.decode().splitlines() if line}


def kcat_consume(settings, topic: str) -> list[dict]:
    """Every record of the dead-letter topic as kcat's JSON envelope (key, payload,
    partition, offset), read as the operator's tool reads it (the admin)."""
    out = kcat(
        settings,
        "admin",
        *["-C", "-t", topic, "-o", "beginning", "-e", "-q", "-J"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def admission(hadm_id: int, when: datetime = ADMIT) -> dict:
    event = ev.AdmissionEvent(
        event_id=ev.event_id("hostile/adm", hadm_id),
        hadm_id=hadm_id,
        subject_id=hadm_id,
        event_time=when,
        source="hostile",
        payload=ev.AdmissionPayload(admittime=when, admission_type="URGENT", gender="F", age=70),
    )
    return json.loads(ev.encode(event))


def observation(hadm_id: int, when: datetime, value=1.0, itemid=50912, tag="") -> dict:
    return {
        "schema_version": 1,
        "event_id": ev.event_id("hostile/obs", f"{hadm_id}/{when.isoformat()}/{tag}"),
        "hadm_id": hadm_id,
        "subject_id": hadm_id,
        "event_time": when.isoformat(),
        "source": "hostile",
        "type": "observation",
        "payload": {
            "itemid": itemid,
            "value": value,
            "unit": "mg/dL",
            "charttime": when.isoformat(),
            "kind": "lab",
        },
    }


def cxr(hadm_id: int, when: datetime, uri: str, tag: str) -> dict:
    return {
        "schema_version": 1,
        "event_id": ev.event_id("hostile/cxr", f"{hadm_id}/{tag}"),
        "hadm_id": hadm_id,
        "subject_id": hadm_id,
        "event_time": when.isoformat(),
        "source": "hostile",
        "type": "cxr",
        "payload": {
            "study_id": 1,
            "dicom_id": tag,
            "view_position": "PA",
            "uri": uri,
            "studytime": when.isoformat(),
        },
    }


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture
def worker(isolated_settings, deployed, redis_client, tmp_path, scores_restored):
    """The product's worker on this test's topics, with ``tmp_path`` as its image root."""
    fitted, _ = deployed
    images = isolated_settings.images.model_copy(update={"roots": (tmp_path,)})
    settings = isolated_settings.model_copy(update={"images": images})
    store = OnlineStore(redis_client, fitted, scratch=settings.kafka.consumer_group)
    scorer = CachedEncoderScorer(
        settings, redis_client, cxr=CxrInputs(CxrPreprocessor(device="cpu"))
    )
    running = connect(
        settings, OnlineFeatures(store), scorer, ScoreStore(redis_client), max_wait_ms=20
    )
    stop = threading.Event()
    failure = []

    def run():
        try:
            running.run(stop=stop)
        except BaseException as exc:  # the test reports it
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield settings, running, thread, failure
    stop.set()
    thread.join(60)


def score_of(redis_client, hadm_id: int) -> dict:
    fields = redis_client.hgetall(SCORE_KEY.format(hadm_id=hadm_id))
    return {k.decode(): v.decode() for k, v in fields.items()}


def scored_at(redis_client, hadm_id: int, when: datetime) -> bool:
    score = score_of(redis_client, hadm_id)
    return bool(score) and float(score["feature_time"]) >= when.timestamp() - 1e-3


def assert_no_stored_score_is_non_finite(redis_client) -> None:
    for key in redis_client.scan_iter("m3t:score:*", count=1000):
        fields = redis_client.hgetall(key)
        for name in (b"los_remaining_days", b"mortality_prob"):
            assert math.isfinite(float(fields[name])), key
    for member, risk in redis_client.zrange("m3t:risk:inpatients", 0, -1, withscores=True):
        assert math.isfinite(risk), member


def hostile_events(tmp_path, hadm: int) -> list[tuple[str, bytes | None, str]]:
    """(name, value, the reason its dead letter must give) for every class of the issue."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    later = ADMIT + timedelta(hours=2)
    surrogate = raw(observation(hadm, later, tag="surrogate")).replace(
        b'"source": "hostile"', b'"source": "\\ud800"'
    )
    huge_int = observation(hadm, later, tag="int64")
    huge_int["hadm_id"] = 2**63
    future = observation(hadm, datetime(9999, 1, 1, tzinfo=UTC), tag="9999")
    ahead = observation(hadm, ADMIT + timedelta(days=500), tag="ahead")
    before = observation(hadm, ADMIT - timedelta(days=2), tag="before")
    long_id = observation(hadm, later, tag="long-id")
    long_id["event_id"] = "x" * 900_000
    version = observation(hadm, later, tag="version")
    version["schema_version"] = 99
    from_the_future = observation(hadm, later, tag="charted-later")
    from_the_future["payload"]["charttime"] = (later + timedelta(days=30)).isoformat()
    return [
        ("nested 2,000 deep", b"[" * 2000 + b"]" * 2000, "too_deep"),
        (
            "Infinity",
            raw(observation(hadm, later, tag="inf")).replace(b"1.0", b"Infinity"),
            "non_finite",
        ),
        ("a lone surrogate", surrogate, "invalid_utf8"),
        ("hadm_id 2^63", raw(huge_int), "schema_violation"),
        ("year 9999", raw(future), "schema_violation"),
        ("a 900 KB event id", raw(long_id), "oversized_event"),
        ("not JSON", b"\xff\xfe{", "invalid_utf8"),
        ("a tombstone", None, "tombstone"),
        ("an unknown schema version", raw(version), "unsupported_schema_version"),
        ("dated before its admission", raw(before), "before_admission"),
        ("charted after it was known", raw(from_the_future), "charted_after_event_time"),
        ("dated after any stay", raw(ahead), "after_max_stay"),
        ("a FIFO", raw(cxr(hadm, later, fifo.as_uri(), "fifo")), "image_refused"),
        ("/etc/passwd", raw(cxr(hadm, later, "file:///etc/passwd", "passwd")), "image_refused"),
        ("an escape", raw(cxr(hadm, later, "file:///../../etc/hostname", "up")), "image_refused"),
        ("an unclosed IPv6 host", raw(cxr(hadm, later, "//[x/a.dcm", "ipv6")), "image_refused"),
    ]


def test_hostile_events_are_dead_lettered_and_the_stream_goes_on(worker, redis_client, tmp_path):
    settings, running, thread, failure = worker
    hadm = 62_000_001
    kcat_produce(settings, str(hadm), raw(admission(hadm)), tmp_path)
    assert wait_until(lambda: scored_at(redis_client, hadm, ADMIT), 120), failure

    hostile = hostile_events(tmp_path, hadm)
    for _, value, _ in hostile:
        kcat_produce(settings, str(hadm), value, tmp_path)
    # A tombstone under a key that is no admission id, as big as the broker takes.
    huge_key = "k" * 999_700
    kcat_produce(settings, huge_key, None, tmp_path, "-X", "message.max.bytes=1040000")
    after = ADMIT + timedelta(hours=3)
    kcat_produce(settings, str(hadm), raw(observation(hadm, after, tag="after")), tmp_path)
    other = hadm + 1
    kcat_produce(settings, str(other), raw(admission(other)), tmp_path)

    assert wait_until(
        lambda: scored_at(redis_client, hadm, after) and scored_at(redis_client, other, ADMIT),
        120,
    ), failure
    assert thread.is_alive() and not failure
    assert_no_stored_score_is_non_finite(redis_client)

    positions = kcat_positions(settings, settings.kafka.topic_events)
    wanted = {
        hashlib.sha256(value or b"").hexdigest(): (name, reason) for name, value, reason in hostile
    }
    assert wait_until(
        lambda: len(kcat_consume(settings, settings.kafka.topic_dead_letter)) > len(hostile), 60
    )
    letters = kcat_consume(settings, settings.kafka.topic_dead_letter)
    assert len(letters) == len(hostile) + 1, [json.loads(m["payload"])["reason"] for m in letters]
    keys = [m["key"] for m in letters]
    assert keys.count(hashlib.sha256(huge_key.encode()).hexdigest()) == 1  # its key, hashed
    assert keys.count(str(hadm)) == len(hostile)
    seen = set()
    for message in letters:
        letter = json.loads(message["payload"])
        assert "value_b64" not in letter  # no payload by default: it may be patient data
        name, reason = wanted[letter["value_sha256"]]
        assert letter["reason"] == reason or (reason is None and letter["reason"]), (name, letter)
        seen.add(name)
        assert letter["topic"] == settings.kafka.topic_events
        assert (letter["partition"], letter["offset"]) in positions  # where the event lies
    assert seen == {name for name, _, _ in hostile}


def test_an_event_sent_under_a_real_events_id_is_one_dead_letter(
    worker, deployed, redis_client, tmp_path
):
    settings, running, thread, failure = worker
    hadm = 64_000_001
    first = ADMIT + timedelta(hours=1)
    real = observation(hadm, first, value=1.2, tag="real")
    kcat_produce(settings, str(hadm), raw(admission(hadm)), tmp_path)
    kcat_produce(settings, str(hadm), raw(real), tmp_path)
    assert wait_until(lambda: scored_at(redis_client, hadm, first), 120), failure

    store = OnlineStore(redis_client, deployed[0], scratch=settings.kafka.consumer_group)
    serving, state, seen = store.keys(hadm)

    def kept():
        return redis_client.get(serving), redis_client.hgetall(state), redis_client.hgetall(seen)

    before = kept()
    assert before[2][real["event_id"].encode()] == ev.content_digest(ev.decode(raw(real)))
    forged = dict(real, payload=dict(real["payload"], value=9.9))  # the same id, another value
    resent = json.dumps(dict(reversed(real.items())), indent=1).encode()  # spelled otherwise
    kcat_produce(settings, str(hadm), resent, tmp_path)
    kcat_produce(settings, str(hadm), raw(forged), tmp_path)
    assert wait_until(lambda: kcat_consume(settings, settings.kafka.topic_dead_letter), 60)
    assert kept() == before  # the resend and the forgery changed nothing

    # An event behind both in the partition: once it is scored, both were taken.
    after = ADMIT + timedelta(hours=2)
    kcat_produce(settings, str(hadm), raw(observation(hadm, after, tag="after")), tmp_path)
    assert wait_until(lambda: scored_at(redis_client, hadm, after), 120), failure
    assert thread.is_alive() and not failure
    letters = [
        json.loads(m["payload"]) for m in kcat_consume(settings, settings.kafka.topic_dead_letter)
    ]
    assert len(letters) == 1, letters  # the forgery only: the resend was a duplicate
    (letter,) = letters
    assert letter["reason"] == "event_id_conflict"
    assert letter["event_id"] == real["event_id"] and letter["type"] == "observation"
    assert letter["value_sha256"] == hashlib.sha256(raw(forged)).hexdigest()
    assert redis_client.hget(seen, real["event_id"]) == before[2][real["event_id"].encode()]


# --- generated: random JSON, and random fields in valid envelopes ------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_values = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.none()
    | st.lists(st.integers(), max_size=3)
)


@st.composite
def mutated_envelopes(draw, hadm: int) -> bytes:
    event = observation(hadm, ADMIT + timedelta(minutes=draw(st.integers(1, 10_000))), tag="h")
    event["event_id"] = draw(st.text(min_size=1, max_size=40))
    where = draw(st.sampled_from(["envelope", "payload"]))
    target = event if where == "envelope" else event["payload"]
    target[draw(st.sampled_from(sorted(target)))] = draw(field_values)
    return json.dumps(event).encode()


@hypothesis_settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_generated_events_never_stop_the_worker(worker, redis_client, tmp_path, data):
    settings, running, thread, failure = worker
    hadm = 63_000_000 + data.draw(st.integers(0, 999_999))
    key = f"{hadm}-{uuid.uuid4().hex}"  # this example's letters carry it: examples share topics
    letter_key = hashlib.sha256(key.encode()).hexdigest()  # no admission id: keyed by its hash
    kcat_produce(settings, str(hadm), raw(admission(hadm)), tmp_path)
    sent = [json.dumps(data.draw(json_values)).encode() for _ in range(5)]
    sent += [data.draw(mutated_envelopes(hadm)) for _ in range(10)]
    for value in sent:
        kcat_produce(settings, key, value, tmp_path)
    done = ADMIT + timedelta(days=30)
    kcat_produce(settings, str(hadm), raw(observation(hadm, done, tag="done")), tmp_path)
    assert wait_until(lambda: scored_at(redis_client, hadm, done), 120), failure
    assert thread.is_alive() and not failure
    assert_no_stored_score_is_non_finite(redis_client)
    # Each event the contract refuses has exactly one dead letter, without its payload.
    refused = {}
    for value in sent:
        try:
            ev.decode(value)
        except ev.InvalidEvent:
            digest = hashlib.sha256(value).hexdigest()
            refused[digest] = refused.get(digest, 0) + 1

    def letters() -> list[dict]:
        return [
            json.loads(m["payload"])
            for m in kcat_consume(settings, settings.kafka.topic_dead_letter)
            if m["key"] == letter_key
        ]

    def counted() -> dict[str, int]:
        found = {}
        for letter in letters():
            found[letter["value_sha256"]] = found.get(letter["value_sha256"], 0) + 1
        return {digest: found.get(digest, 0) for digest in refused}

    assert wait_until(lambda: counted() == refused, 60), (counted(), refused)
    assert all("value_b64" not in letter and letter["reason"] for letter in letters())
