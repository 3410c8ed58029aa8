"""Issue 6, faults: Triton down, Redis down, SIGKILL mid-stream, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from ingest import events as ev
from m3t import services
from m3t.clients import redis_client
from m3t.kafka import kafka_python_config, own_topics, poll_batch
from stream.scores import ScoreStore
from stream.scoring import ModelScorer
from stream.wiring import connect, worker_consumer
from tests.conftest import settings_env
from tests.skeleton import KEY, SkeletonFeatures, produce


def cohort(n_admissions: int, observations: int, first_hadm: int) -> list:
    start = datetime(2150, 3, 1, tzinfo=UTC)
    out = []
    for i in range(n_admissions):
        hadm, admit = first_hadm + i, start + timedelta(minutes=i)
        out.append(
            ev.AdmissionEvent(
                event_id=ev.event_id("faults/adm", hadm),
                hadm_id=hadm,
                subject_id=hadm,
                event_time=admit,
                source="faults",
                payload=ev.AdmissionPayload(
                    admittime=admit, admission_type="URGENT", gender="M", age=60
                ),
            )
        )
        for j in range(observations):
            t = admit + timedelta(minutes=j + 1)
            out.append(
                ev.ObservationEvent(
                    event_id=ev.event_id("faults/obs", (hadm, j)),
                    hadm_id=hadm,
                    subject_id=hadm,
                    event_time=t,
                    source="faults",
                    payload=ev.ObservationPayload(itemid=50912, value=1.0, charttime=t, kind="lab"),
                )
            )
    return out


def observations(client, hadm_ids) -> dict[int, int]:
    return {h: int(client.hget(KEY.format(hadm_id=h), "observations") or 0) for h in hadm_ids}


def group_offsets(settings) -> tuple[dict, dict]:
    """(end offset, the stream's committed offset) per partition of the events topic."""
    consumer = KafkaConsumer(
        **kafka_python_config(settings, "stream"),
        group_id=settings.kafka.consumer_group,
        enable_auto_commit=False,
    )
    parts = [
        TopicPartition(settings.kafka.topic_events, p) for p in range(settings.kafka.partitions)
    ]
    ends = consumer.end_offsets(parts)
    committed = {tp: consumer.committed(tp) or 0 for tp in parts}
    consumer.close()
    return ends, committed


def committed_everything(settings) -> bool:
    ends, committed = group_offsets(settings)
    return all(committed[tp] == ends[tp] for tp in ends)


def with_dead_letter_payload(settings):
    return settings.model_copy(
        update={"stream": settings.stream.model_copy(update={"dead_letter_payload": True})}
    )


def start_worker(settings, client, prepare=None, **kwargs):
    """A placeholder-scoring worker on a thread; ``prepare(worker)`` runs before it starts."""
    worker = connect(
        settings,
        SkeletonFeatures(client),
        ModelScorer(settings, "placeholder"),
        ScoreStore(client),
        **kwargs,
    )
    worker.outages.backoff_s = (0.1, 0.5)
    if prepare is not None:
        prepare(worker)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    return worker, stop, thread


def wait_for(check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_triton_down_keeps_dirty_set_and_recovers(isolated_settings, redis_client):
    settings = isolated_settings
    events = cohort(5, 3, 81_000_000)
    store = ScoreStore(redis_client)
    worker, stop, thread = start_worker(settings, redis_client)
    try:
        services.down(settings, ["triton"])
        produce(settings, events)
        assert wait_for(lambda: worker.stats.retries >= 3)
        assert all(store.get(e.hadm_id) is None for e in events)
        # Kept, not committed: those polled before the first failure (all five, or fewer
        # where they came in more than one poll) wait for Triton with the rest unread.
        assert worker.stats.commits == 0 and 1 <= len(worker.batcher.pending) <= 5
        services.up(settings, ["triton"])
        assert wait_for(lambda: all(store.get(e.hadm_id) for e in events))
        assert wait_for(lambda: committed_everything(settings))
    finally:
        stop.set()
        thread.join(30)
        services.up(settings, ["triton"])
    assert observations(redis_client, {e.hadm_id for e in events}) == dict.fromkeys(
        {e.hadm_id for e in events}, 3
    )


def ride_out_a_redis_outage(settings, first_hadm: int, start, end) -> None:
    """Events sent while ``start()`` has Redis out: the worker retries with nothing committed
    and nothing dead-lettered; after ``end()`` every event is applied once and scored."""
    events = cohort(4, 2, first_hadm)
    client = redis_client(settings)
    worker, stop, thread = start_worker(settings, client)
    worker.metrics.flush_every_s = 0.0  # metrics are published every loop, into the outage too
    try:
        assert wait_for(lambda: worker.source.assignment())
        start()
        try:
            produce(settings, events)
            assert wait_for(lambda: worker.stats.retries >= 3)
            assert worker.stats.commits == 0 and worker.stats.dead_letters == 0
            assert thread.is_alive()
        finally:
            end()
        assert wait_for(lambda: committed_everything(settings))
    finally:
        stop.set()
        thread.join(30)
    assert worker.stats.dead_letters == 0
    store = ScoreStore(client)
    assert all(store.get(e.hadm_id) for e in events)
    assert observations(client, {e.hadm_id for e in events}) == dict.fromkeys(
        {e.hadm_id for e in events}, 2
    )


@pytest.mark.single_node
def test_redis_down_pauses_without_commit(isolated_settings):
    ride_out_a_redis_outage(
        isolated_settings,
        82_000_000,
        start=lambda: services.down(isolated_settings, ["redis"]),
        end=lambda: services.up(isolated_settings, ["redis"]),
    )


def test_redis_refusing_writes_pauses_without_dead_letters_or_commit(isolated_settings):
    # Out of memory (maxmemory reached, nothing to evict) is no event's fault: the worker
    # must wait, not dead-letter the events it could not write.
    client = redis_client(isolated_settings, role="admin")
    limits = client.config_get("maxmemory*")

    def refuse_writes():
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")

    def take_writes():
        client.config_set("maxmemory", limits["maxmemory"])
        client.config_set("maxmemory-policy", limits["maxmemory-policy"])

    ride_out_a_redis_outage(isolated_settings, 82_100_000, refuse_writes, take_writes)


def worker_process(settings, *extra):
    env = {**os.environ, **settings_env(settings)}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "skeleton.py"), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_sigkill_mid_stream_then_restart_applies_each_event_once(isolated_settings, redis_client):
    settings = isolated_settings
    events = cohort(200, 20, 83_000_000)
    hadm_ids = sorted({e.hadm_id for e in events})
    produce(settings, events)
    first = worker_process(
        settings, "--max-batch", "8", "--max-poll", "16"
    )  # small steps: the kill lands mid-stream
    # Kill it once part of the stream is applied, not all of it.
    assert wait_for(lambda: sum(observations(redis_client, hadm_ids[:50]).values()) > 0, 120)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    partial = sum(observations(redis_client, hadm_ids).values())
    assert 0 < partial < 200 * 20, "the kill should land mid-stream"
    second = worker_process(settings, "--idle-timeout", "5")
    output = second.communicate(timeout=240)[0].decode()
    assert second.returncode == 0, output
    assert observations(redis_client, hadm_ids) == dict.fromkeys(hadm_ids, 20)  # exactly once
    store = ScoreStore(redis_client)
    assert all(store.get(h) is not None for h in hadm_ids)
    assert committed_everything(settings)


def test_sigterm_finishes_batch_and_commits(isolated_settings, redis_client):
    settings = isolated_settings
    events = cohort(50, 10, 84_000_000)
    produce(settings, events)
    worker = worker_process(settings, "--max-batch", "8")
    assert wait_for(
        lambda: sum(observations(redis_client, [e.hadm_id for e in events[:1]]).values()) > 0, 120
    )
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=60)[0].decode()
    assert worker.returncode == 0, output
    # Everything it consumed was applied and scored before its offsets were committed.
    committed = sum(group_offsets(settings)[1].values())
    hadm_ids = {e.hadm_id for e in events}
    applied = sum(observations(redis_client, hadm_ids).values()) + sum(
        1 for h in hadm_ids if redis_client.hget(KEY.format(hadm_id=h), "age") is not None
    )
    assert 0 < committed == applied


def test_events_arriving_while_their_admission_is_scored_get_the_next_score(
    isolated_settings, redis_client
):
    # Scoring runs beside consumption: events for an admission in the batch being scored
    # must be scored again, and nothing is committed before a score covers it.
    settings = isolated_settings
    events = cohort(3, 4, 85_000_000)
    early = [e for e in events if e.type == "admission"]
    later = [e for e in events if e.type != "admission"]
    started, release = threading.Event(), threading.Event()

    class HeldScorer(ModelScorer):
        def score(self, inputs):
            if not release.is_set():
                started.set()
                assert release.wait(60)
            return super().score(inputs)

    worker = connect(
        settings,
        SkeletonFeatures(redis_client),
        HeldScorer(settings, "placeholder"),
        ScoreStore(redis_client),
        max_wait_ms=20,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    try:
        produce(settings, early)
        assert wait_for(started.is_set)
        produce(settings, later)
        assert wait_for(lambda: worker.stats.events == len(events))
        in_flight = [h for h, change in worker.batcher.pending.items() if change.in_flight]
        assert in_flight and all(worker.batcher.pending[h].next_first for h in in_flight)
        assert worker.stats.commits == 0 and not committed_everything(settings)
        release.set()
        assert wait_for(lambda: committed_everything(settings))
        assert wait_for(lambda: not worker.batcher.pending)
    finally:
        release.set()
        stop.set()
        thread.join(30)
    store = ScoreStore(redis_client)
    last = {e.hadm_id: e.event_time.timestamp() for e in later}
    assert {
        h: store.get(h).feature_time for h in last
    } == last  # the newest events are in the scores
    assert worker.stats.batches >= 2
    assert observations(redis_client, last) == dict.fromkeys(last, 4)


def test_a_commit_waits_for_kafka_to_acknowledge_the_scores_it_covers_without_blocking(
    isolated_settings, redis_client
):
    # Scores and dead letters must be durable in Kafka before the offsets of their events
    # move; the loop meanwhile goes on consuming. Kafka's acknowledgements reach the worker
    # as delivery reports, served by the producer's poll(): held here, then let through.
    settings = isolated_settings
    held = threading.Event()
    held.set()

    class HeldReports:
        def __init__(self, producer):
            self.producer = producer

        def poll(self, timeout=0):
            return 0 if held.is_set() else self.producer.poll(timeout)

        def __len__(self):
            return len(self.producer)

        def __getattr__(self, name):
            return getattr(self.producer, name)

    class RecordedCommits:
        def __init__(self, consumer):
            self.consumer, self.commits = consumer, []

        def commit(self, offsets, asynchronous):
            self.commits.append(([(tp.partition, tp.offset) for tp in offsets], asynchronous))
            return self.consumer.commit(offsets=offsets, asynchronous=asynchronous)

        def __getattr__(self, name):
            return getattr(self.consumer, name)

    def wrap(worker):
        worker.sink.producer = HeldReports(worker.sink.producer)
        worker.source.consumer = RecordedCommits(worker.source.consumer)

    worker, stop, thread = start_worker(settings, redis_client, prepare=wrap)
    try:
        first = cohort(4, 1, 89_000_000)
        produce(settings, first)
        assert wait_for(lambda: worker.stats.scored >= 4 and not worker.batcher.pending)
        later = cohort(4, 1, 89_000_100)
        produce(settings, later)  # consumed and scored while the first commit point waits
        assert wait_for(
            lambda: worker.stats.events == len(first) + len(later) and not worker.batcher.pending
        )
        assert wait_for(lambda: len(worker.ledger.points) >= 2)
        assert worker.stats.commits == 0 and not committed_everything(settings)
        held.clear()
        assert wait_for(lambda: committed_everything(settings))
        assert worker.source.consumer.commits[-1][1] is True  # the loop's commits do not wait
    finally:
        held.clear()
        stop.set()
        thread.join(30)
    assert observations(redis_client, [e.hadm_id for e in first + later]) == {
        e.hadm_id: 1 for e in first + later
    }
    # Leaving, the worker waits for its last commit: sent again synchronously.
    (last_async, _), (final, synchronous) = worker.source.consumer.commits[-2:]
    assert final == last_async and synchronous is False


def test_a_huge_poison_event_is_dead_lettered_and_the_stream_goes_on(
    isolated_settings, redis_client
):
    # Base64 makes a 900 KB event a 1.2 MB dead letter, over Kafka's 1 MB, where the payload
    # is asked for: it must not crash the worker (after a restart it would crash again on
    # the same event).
    import base64
    import hashlib
    import json

    from kafka import KafkaProducer

    settings = with_dead_letter_payload(isolated_settings)
    huge = b"{" + b"x" * 900_000
    good = cohort(1, 0, 86_000_000)
    producer = KafkaProducer(
        **kafka_python_config(settings, "producer"), max_request_size=2_000_000
    )
    producer.send(settings.kafka.topic_events, key=b"86000000", value=huge)
    producer.flush()
    producer.close()
    produce(settings, good)
    worker = connect(
        settings,
        SkeletonFeatures(redis_client),
        ModelScorer(settings, "placeholder"),
        ScoreStore(redis_client),
    )
    stats = worker.run(stop_after=2, idle_timeout_s=30.0)
    assert stats.dead_letter_reasons == {"oversized_event": 1}
    assert ScoreStore(redis_client).get(good[0].hadm_id) is not None
    assert committed_everything(settings)
    consumer = KafkaConsumer(
        settings.kafka.topic_dead_letter,
        **kafka_python_config(settings, "admin"),
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    (letter,) = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert letter["reason"] == "oversized_event" and letter["truncated"] is True
    assert (
        letter["value_bytes"] == len(huge)
        and letter["value_sha256"] == hashlib.sha256(huge).hexdigest()
    )
    kept = base64.b64decode(letter["value_b64"])
    assert 0 < len(kept) < len(huge) and huge.startswith(kept)
    assert (letter["topic"], letter["offset"]) == (
        settings.kafka.topic_events,
        0,
    )  # where the whole event lies


def test_a_record_kafka_refuses_stops_the_worker_uncommitted(
    isolated_settings, redis_client, monkeypatch
):
    # Without the cap the dead letter is too large for Kafka: the send fails after send()
    # returned, and the worker must notice before committing, not lose the dead letter.
    from kafka import KafkaProducer

    from stream import dead_letters

    monkeypatch.setattr(dead_letters, "DEAD_LETTER_MAX_BYTES", 10**9)
    settings = with_dead_letter_payload(isolated_settings)
    producer = KafkaProducer(
        **kafka_python_config(settings, "producer"), max_request_size=2_000_000
    )
    producer.send(settings.kafka.topic_events, key=b"87000000", value=b"{" + b"x" * 900_000)
    producer.flush()
    producer.close()
    worker = connect(
        settings,
        SkeletonFeatures(redis_client),
        ModelScorer(settings, "placeholder"),
        ScoreStore(redis_client),
    )
    with pytest.raises(RuntimeError, match="Kafka did not take a record"):
        worker.run(stop_after=1, idle_timeout_s=30.0)
    assert worker.stats.commits == 0 and not committed_everything(settings)


def test_a_worker_forgets_the_positions_of_partitions_taken_from_it(
    isolated_settings, redis_client
):
    # Were it to get such a partition back, committing its stale position would move the
    # group's offset backwards.
    settings = isolated_settings
    produce(settings, cohort(30, 1, 88_000_000))
    first, stop_first, thread_first = start_worker(settings, redis_client)
    second = stop_second = thread_second = None
    try:
        assert wait_for(lambda: committed_everything(settings))
        consumed = set(first.ledger.consumed)
        assert len(consumed) > 1  # the events came from several partitions
        second, stop_second, thread_second = start_worker(settings, redis_client)
        assert wait_for(lambda: second.source.assignment())
        assert wait_for(
            lambda: set(first.ledger.consumed) < consumed
        )  # the moved ones are forgotten
        assert not set(first.ledger.consumed) & set(second.source.assignment())
    finally:
        stop_first.set()
        thread_first.join(30)
        if second is not None:
            stop_second.set()
            thread_second.join(30)


def test_consumer_lag_is_published_from_the_fetches_high_watermarks(
    isolated_settings, redis_client
):
    import json

    from stream.metrics import METRICS_KEY

    settings = isolated_settings
    events = cohort(12, 2, 89_000_000)
    produce(settings, events[:18])
    worker = connect(
        settings,
        SkeletonFeatures(redis_client),
        ModelScorer(settings, "placeholder"),
        ScoreStore(redis_client),
        worker_id="lag-check",
        max_poll_records=4,
    )
    # Mid-stream (4 events a poll), some partition is behind; at the end, none is.
    seen_behind = []
    flush = worker._flush_metrics

    def spy():
        flush()
        seen_behind.append(sum(worker.metrics.lag.values()))

    worker._flush_metrics = spy
    worker.metrics.due = lambda: True
    worker.run(stop_after=18, idle_timeout_s=30.0)
    snapshot = json.loads(redis_client.hget(METRICS_KEY, "lag-check"))
    partitions = {f"{settings.kafka.topic_events}:{p}" for p in range(settings.kafka.partitions)}
    assert set(snapshot["lag"]) == partitions and set(snapshot["lag"].values()) == {0}
    assert max(seen_behind) > 0


def fetches_while_busy(settings, **options) -> tuple[int, list[bytes]]:
    """The Fetch requests a worker's consumer sends while 40 events reach its partition one
    by one and it takes none of them (busy elsewhere), and the events it takes after."""
    import json

    from confluent_kafka import TopicPartition as Partition
    from kafka import KafkaProducer

    stats = []
    consumer = worker_consumer(
        settings,
        settings.kafka.consumer_group,
        **{"statistics.interval.ms": 100, "stats_cb": lambda raw: stats.append(json.loads(raw))},
        **options,
    )
    producer = KafkaProducer(**kafka_python_config(settings, "producer"), acks="all")

    def fetches() -> int:
        return sum(b["req"].get("Fetch", 0) for b in stats[-1]["brokers"].values())

    def poll_until(check) -> None:
        assert wait_for(lambda: consumer.poll(0.05) is None and check(), 30)

    try:
        consumer.assign([Partition(settings.kafka.topic_events, 0, 0)])
        poll_until(lambda: stats and fetches() > 0)  # fetching: an empty one waits at the broker
        before = fetches()
        sent = [f"busy-{i}".encode() for i in range(40)]
        for value in sent:
            producer.send(settings.kafka.topic_events, value=value, partition=0)
            producer.flush()
            time.sleep(0.01)
        taken, deadline = [], time.monotonic() + 30
        while len(taken) < len(sent) and time.monotonic() < deadline:
            taken += [m.value() for m in poll_batch(consumer, 100, 1.0)]
        reported = len(stats)
        poll_until(lambda: len(stats) > reported)
        return fetches() - before, taken
    finally:
        producer.close()
        consumer.close()


def test_a_busy_worker_fetches_what_piled_up_in_one_go_instead_of_fetching_ahead(
    isolated_settings,
):
    # Fetching ahead, its consumer asks the broker again for every event that arrives.
    fetched, taken = fetches_while_busy(isolated_settings)
    assert taken == [f"busy-{i}".encode() for i in range(40)]
    assert fetched <= 4
    ahead, _ = fetches_while_busy(own_topics(isolated_settings), **{"queued.min.messages": 100_000})
    assert ahead >= 20
