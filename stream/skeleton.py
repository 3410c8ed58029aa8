"""PLACEHOLDER features for the walking skeleton (issue 2), scored by model_repo/placeholder.

Two numbers per admission, kept idempotently in Redis: age and the count of observations.
The M3T-LM feature store (features/) replaces this; it exists to prove the path end to end.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import redis
from kafka import KafkaProducer

from ingest import events as ev
from m3t.settings import Settings

KEY = "m3t:skeleton:{{{hadm_id}}}"
SEEN = "m3t:skeleton:{{{hadm_id}}}:seen"

# Idempotent by event id: the dedupe check and the update happen atomically.
_APPLY = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'admission' then redis.call('HSET', KEYS[1], 'age', ARGV[3]) end
if ARGV[2] == 'observation' then redis.call('HINCRBY', KEYS[1], 'observations', 1) end
local t = tonumber(redis.call('HGET', KEYS[1], 'feature_time') or '0')
if tonumber(ARGV[4]) > t then redis.call('HSET', KEYS[1], 'feature_time', ARGV[4]) end
return 1
"""


class SkeletonFeatures:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._apply = client.register_script(_APPLY)

    def apply(self, events: list) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for e in events:
                age = e.payload.age if e.type == "admission" else 0
                self._apply(keys=[KEY.format(hadm_id=e.hadm_id), SEEN.format(hadm_id=e.hadm_id)],
                            args=[e.event_id, e.type, age, e.event_time.timestamp()], client=pipe)
            pipe.execute()

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        with self.client.pipeline(transaction=False) as pipe:
            for h in hadm_ids:
                pipe.hmget(KEY.format(hadm_id=h), "age", "observations", "feature_time")
            rows = pipe.execute()
        summary = np.array([[float(a or 0), float(o or 0)] for a, o, _ in rows], dtype=np.float32)
        return {"summary": summary}, [float(t or 0) for _, _, t in rows]


def skeleton_events(n_admissions: int = 5) -> list:
    """A few admissions with observations: enough to exercise every hop."""
    start = datetime(2150, 1, 1, 8, tzinfo=timezone.utc)
    out = []
    for i in range(n_admissions):
        hadm, subject, admit = 90_000_000 + i, 19_000_000 + i, start + timedelta(hours=i)
        out.append(ev.AdmissionEvent(
            event_id=ev.event_id("demo/admissions", i), hadm_id=hadm, subject_id=subject,
            event_time=admit, source="demo/admissions",
            payload=ev.AdmissionPayload(admittime=admit, admission_type="EW EMER.", gender="F", age=40 + 10 * i),
        ))
        for j in range(2 * i + 1):
            t = admit + timedelta(minutes=30 * (j + 1))
            out.append(ev.ObservationEvent(
                event_id=ev.event_id("demo/labevents", (i, j)), hadm_id=hadm, subject_id=subject,
                event_time=t, source="demo/labevents",
                payload=ev.ObservationPayload(itemid=50912, value=1.0 + 0.1 * j, unit="mg/dL", charttime=t, kind="lab"),
            ))
    return out


def produce(settings: Settings, events: list) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", enable_idempotence=True)
    try:
        for e in events:
            producer.send(settings.kafka.topic_events, key=ev.key(e), value=ev.encode(ev.validate(e)))
        producer.flush()
    finally:
        producer.close()
