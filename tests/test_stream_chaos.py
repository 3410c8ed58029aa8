"""Issue 16, chaos: during a sustained stream Redis, then the Kafka broker, then Triton are
killed with SIGKILL and restarted. Afterwards every event's effect must be in the store
exactly once, as in a clean application of the same events, and every admission scored."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from confluent_kafka import Producer

from features.cxr import CxrPreprocessor
from features.online import OnlineStore
from ingest import events as ev
from ingest.itemids import LABS, VITALS
from m3t import services
from m3t.kafka import client_config
from m3t.services.process import wait_until
from stream.scores import ScoreStore
from stream.scoring import CachedEncoderScorer, OnlineFeatures
from stream.wiring import connect
from stream.xrays import CxrInputs

pytestmark = [pytest.mark.services, pytest.mark.single_node]

FIRST_HADM = 64_000_000


def stream_events(n_admissions: int, per_admission: int, seed: int = 5) -> list:
    rng = random.Random(seed)
    start = datetime(2151, 2, 1, 6, tzinfo=UTC)
    out = []
    for i in range(n_admissions):
        hadm = FIRST_HADM + i
        admit = start + timedelta(minutes=i)
        out.append(
            ev.AdmissionEvent(
                event_id=ev.event_id("chaos/adm", hadm),
                hadm_id=hadm,
                subject_id=hadm,
                event_time=admit,
                source="chaos",
                payload=ev.AdmissionPayload(
                    admittime=admit, admission_type="EW EMER.", gender="M", age=55
                ),
            )
        )
        for j in range(per_admission):
            item = rng.choice(LABS + VITALS)
            t = admit + timedelta(minutes=10 * (j + 1))
            out.append(
                ev.ObservationEvent(
                    event_id=ev.event_id("chaos/obs", (hadm, j)),
                    hadm_id=hadm,
                    subject_id=hadm,
                    event_time=t,
                    source="chaos",
                    payload=ev.ObservationPayload(
                        itemid=item.itemid,
                        value=round(rng.uniform(item.low, item.high), 2),
                        unit=item.unit,
                        charttime=t,
                        kind=item.kind,
                    ),
                )
            )
    # Interleave admissions as a hospital's feed does, each admission's events in order.
    by_admission = {}
    for event in out:
        by_admission.setdefault(event.hadm_id, []).append(event)
    queues = list(by_admission.values())
    mixed = []
    while queues:
        queue = rng.choice(queues)
        mixed.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return mixed


def kill(settings, name: str) -> None:
    pid = services.SERVICES[name](settings).pid()
    assert pid, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)  # the whole group: Triton's backend stubs too
    assert wait_until(lambda: not services.SERVICES[name](settings).pid(), 30)


def test_killing_redis_kafka_and_triton_mid_stream_loses_nothing_and_applies_nothing_twice(
    isolated_settings, deployed, redis_client, scores_restored
):
    settings = isolated_settings
    fitted, _ = deployed
    events = stream_events(120, 25)
    hadm_ids = sorted({e.hadm_id for e in events})
    store = OnlineStore(redis_client, fitted, scratch=settings.kafka.consumer_group)
    scorer = CachedEncoderScorer(
        settings, redis_client, cxr=CxrInputs(CxrPreprocessor(device="cpu"))
    )
    worker = connect(
        settings, OnlineFeatures(store), scorer, ScoreStore(redis_client), max_wait_ms=20
    )
    worker.outages.backoff_s = (0.1, 1.0)
    stop, failure = threading.Event(), []

    def run():
        try:
            worker.run(stop=stop)
        except BaseException as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    producer = Producer(
        {
            **client_config(settings, "producer"),
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    sent = threading.Event()

    def send():  # about 150 events a second, through every outage
        for i, event in enumerate(events):
            producer.produce(settings.kafka.topic_events, ev.encode(event), str(event.hadm_id))
            producer.poll(0)
            if i % 15 == 0:
                time.sleep(0.1)
        assert producer.flush(300) == 0
        sent.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        for name in ("redis", "kafka", "triton"):
            time.sleep(3)
            kill(settings, name)
            time.sleep(2)
            services.up(settings, [name])
        assert wait_until(sent.is_set, 300), "the producer did not deliver every event"
        last = {e.hadm_id: e.event_time.timestamp() for e in events}
        scores = ScoreStore(redis_client)

        def all_scored():
            got = [scores.get(h) for h in hadm_ids]
            return all(s is not None and s.feature_time >= last[s.hadm_id] - 1e-3 for s in got)

        assert wait_until(all_scored, 300), failure
        assert thread.is_alive() and not failure
    finally:
        stop.set()
        thread.join(120)
        for name in ("redis", "kafka", "triton"):
            services.up(settings, [name])
    assert not failure, failure

    clean = OnlineStore(redis_client, fitted, scratch=f"clean-{settings.kafka.consumer_group}")
    clean.write_batch(events)
    for hadm in hadm_ids:  # every event applied exactly once: the seen hashes hold each id once
        seen = redis_client.hlen(store.keys(hadm)[2])
        assert seen == redis_client.hlen(clean.keys(hadm)[2]) == 26, hadm
    streamed, reference = store.read_inputs(hadm_ids), clean.read_inputs(hadm_ids)
    assert set(streamed) == set(reference)
    for name, want in reference.items():
        got = streamed[name]
        if np.issubdtype(np.asarray(want).dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
