"""Failover on the clusters (issue 19): a Redis primary, then a Kafka broker, killed while the
stream runs. The stream goes on, and the store ends as a clean run left it: every event
applied once (the same serving blobs, aggregates and seen events) and the same scores.

These tests start a Kafka cluster and a Redis Cluster of their own (killing a node of the
session's would disturb other tests) and use the session's Triton; each prints the pause
the failover caused.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from features.cxr import CxrPreprocessor
from features.online import OnlineStore
from features.state import hours
from ingest.replay import make_producer, replay
from m3t import services
from m3t.clients import redis_client, redis_node
from m3t.kafka import own_topics
from m3t.services.kafka_cluster import KafkaCluster
from m3t.services.process import wait_until
from m3t.services.redis_cluster import RedisCluster
from stream.scores import HISTORY_KEY, SCORE_KEY, ScoreStore
from stream.scoring import FullModelScorer, OnlineFeatures
from stream.wiring import connect
from stream.xrays import CxrInputs
from tests.conftest import make_settings

pytestmark = pytest.mark.services

CHUNKS = 8  # the cohort is produced in this many parts, a pause between them
CHUNK_PAUSE_S = 0.8


@pytest.fixture(scope="module")
def clusters(settings, tmp_path_factory):
    """Settings whose Kafka and Redis are clusters of this module's own, and whose Triton
    and image folders are the session's."""
    own = make_settings(tmp_path_factory.mktemp("failover"), cluster=True)
    cfg = settings.model_copy(
        update={
            "cluster": True,
            "state_dir": own.state_dir,
            "redis": own.redis,
            "kafka": own.kafka,
            "images": settings.images.model_copy(update={"roots": settings.image_roots}),
        }
    )
    try:
        services.up(cfg, ["redis", "kafka"])
        yield cfg
    finally:
        services.down(cfg, ["redis", "kafka"])


class Progress:
    """Samples a worker's processed-event count, to time the longest stall after a kill."""

    def __init__(self, worker):
        self.worker, self.samples = worker, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.worker.stats.events))
            time.sleep(0.01)

    def pause_after(self, t0: float) -> float:
        """Seconds from ``t0`` until the count next grew."""
        at_kill = max((n for t, n in self.samples if t <= t0), default=0)
        later = [t for t, n in self.samples if t > t0 and n > at_kill]
        return (later[0] - t0) if later else float("inf")


def stream_run(cfg, cohort, fitted, scratch: str, kill=None) -> tuple[dict, float | None]:
    """Produce the cohort in parts while a worker streams it into a scratch store; with
    ``kill``, call it once a third of the parts are in. Returns the stored state per
    admission and the pause after the kill."""
    run = own_topics(cfg, prefix=f"{scratch}-")
    client = redis_client(run, role="admin")  # the test's: it clears and inspects
    for h in cohort:
        client.delete(SCORE_KEY.format(hadm_id=h), HISTORY_KEY.format(hadm_id=h))
    store = OnlineStore(client, fitted, scratch=scratch)
    streams = redis_client(run)
    scorer = FullModelScorer(run, cxr=CxrInputs(CxrPreprocessor(device="cpu")))
    worker = connect(
        run,
        OnlineFeatures(OnlineStore(streams, fitted, scratch=scratch)),
        scorer,
        ScoreStore(streams),
        max_batch=8,
    )
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("stats", worker.run(stop)))
    thread.start()
    progress = Progress(worker)
    admissions = list(cohort.values())
    parts = [admissions[i::CHUNKS] for i in range(CHUNKS)]
    killed_at = None
    producer = make_producer(run)
    try:
        for i, part in enumerate(parts):
            if kill is not None and i == CHUNKS // 3:
                assert wait_until(lambda: worker.stats.events > 0, 60)
                killed_at = time.monotonic()
                kill()
            summary = replay(
                part,
                producer,
                run.kafka.topic_events,
                dead_letter_topic=run.kafka.topic_dead_letter,
            )
            assert not summary.dead_letters
            time.sleep(CHUNK_PAUSE_S)
    finally:
        producer.close()
    total = sum(len(events) for events in cohort.values())
    seen = {h: store.keys(h)[2] for h in cohort}

    def all_applied() -> bool:
        return sum(client.hlen(key) for key in seen.values()) >= total

    try:
        assert wait_until(all_applied, 180, 0.5), "not every event reached the store"
        scores = ScoreStore(client)
        # The last events' scores come a batch later.
        assert wait_until(
            lambda: all(
                (s := scores.get(h)) is not None
                and s.feature_time == hours(cohort[h][-1].event_time) * 3600
                for h in cohort
            ),
            120,
            0.5,
        ), "not every admission was scored as of its last event"
    finally:
        stop.set()
        thread.join(60)
        progress.done.set()
    assert result["stats"].dead_letters == 0
    state = {}
    for h in cohort:
        serving, state_key, seen_key = store.keys(h)
        score = scores.get(h)
        state[h] = {
            "serving": client.get(serving),
            "aggregates": client.hget(state_key, "a"),
            "seen": client.hgetall(seen_key),
            "score": (score.los_remaining_days, score.mortality_prob, score.feature_time),
        }
    store.drop()
    client.close()
    pause = progress.pause_after(killed_at) if killed_at is not None else None
    return state, pause


@pytest.fixture(scope="module")
def clean(clusters, cohort, deployed):
    """The store after a run with no failure."""
    fitted, _ = deployed
    state, _ = stream_run(clusters, cohort, fitted, "clean")
    return state


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for h in want:
        for part in ("serving", "aggregates", "seen"):
            assert got[h][part] == want[h][part], f"admission {h}: {part} differs"
        assert got[h]["score"] == pytest.approx(want[h]["score"], abs=1e-5), h


def test_a_redis_primary_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
    clusters, cohort, deployed, clean
):
    fitted, _ = deployed
    cluster = RedisCluster(clusters)
    primary = next(node for node in cluster.nodes if role(clusters, node.port) == "master")
    state, pause = stream_run(
        clusters, cohort, fitted, "redis-failover", kill=lambda: kill_node(primary)
    )
    print(f"\nRedis primary {primary.name} killed: the stream paused {pause:.2f} s")
    assert_same(state, clean)
    replica = [node for node in cluster.nodes if node.pid() is not None]
    assert len(replica) == 5
    primary.up()  # it comes back as its replica's replica
    assert wait_until(lambda: cluster.state()[0], 60), cluster.state()[1]
    assert role(clusters, primary.port) == "slave"


def test_a_kafka_broker_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
    clusters, cohort, deployed, clean
):
    fitted, _ = deployed
    node = KafkaCluster(clusters).nodes[1]
    state, pause = stream_run(
        clusters, cohort, fitted, "kafka-failover", kill=lambda: kill_node(node)
    )
    print(f"\nKafka broker {node.name} killed: the stream paused {pause:.2f} s")
    assert_same(state, clean)
    node.up()
    assert KafkaCluster(clusters).health().healthy


def role(cfg, port: int) -> str:
    client = redis_node(cfg, port)
    try:
        return client.info("replication")["role"]
    finally:
        client.close()


def kill_node(node) -> None:
    """SIGKILL: no clean shutdown, as a machine lost."""
    pid = node.pid()
    assert pid is not None, f"{node.name} is not running"
    os.killpg(pid, signal.SIGKILL)
    assert wait_until(lambda: node.pid() is None, 10, 0.05)
