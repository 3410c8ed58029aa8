"""The walking skeleton (issue 2), kept for tests: stand-in features scored by the stand-in
Triton model ``placeholder`` (tests/triton_models/placeholder, served by the test Triton).

Two numbers per admission, kept idempotently in Redis: age and the count of observations.
Cheaper than M3T-LM and needing nothing trained, it lets the tests drive the stream worker
(faults, restarts, the e2e benchmark's harness) through every hop.

Run as a script, it is a stream worker over these pieces, as `m3t stream run` runs the
product's (the same signal handling, settings from the M3T_* environment):

    python tests/skeleton.py [--idle-timeout S] [--max-batch N] [--max-wait-ms MS] [--max-poll N]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import numpy as np
import redis
from kafka import KafkaProducer

from ingest import events as ev
from m3t.clients import LuaScript, run_scripts
from m3t.kafka import kafka_python_config
from m3t.settings import Settings, get_settings

MODEL = "placeholder"

KEY = "m3t:skeleton:{{{hadm_id}}}"
SEEN = "m3t:skeleton:{{{hadm_id}}}:seen"

# Idempotent by event id: the dedupe check and the update happen atomically. Only commands
# the stream's Redis user may run (m3t.services.redis_server.ACL_RULES).
_APPLY = LuaScript("""
if redis.call('HGET', KEYS[2], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], '1')
if ARGV[2] == 'admission' then redis.call('HSET', KEYS[1], 'age', ARGV[3]) end
if ARGV[2] == 'observation' then
  local n = tonumber(redis.call('HGET', KEYS[1], 'observations') or '0')
  redis.call('HSET', KEYS[1], 'observations', tostring(n + 1))
end
local t = tonumber(redis.call('HGET', KEYS[1], 'feature_time') or '0')
if tonumber(ARGV[4]) > t then redis.call('HSET', KEYS[1], 'feature_time', ARGV[4]) end
return 1
""")


class SkeletonFeatures:
    def __init__(self, client: redis.Redis):
        self.client = client

    def apply(self, events: list) -> None:
        def queue(commands):  # the project's round trip: on a Redis Cluster too
            for e in events:
                age = e.payload.age if e.type == "admission" else 0
                _APPLY(
                    commands,
                    [KEY.format(hadm_id=e.hadm_id), SEEN.format(hadm_id=e.hadm_id)],
                    [e.event_id, e.type, age, e.event_time.timestamp()],
                )

        run_scripts(self.client, queue, _APPLY)

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        with self.client.pipeline(transaction=False) as pipe:
            for h in hadm_ids:
                pipe.hmget(KEY.format(hadm_id=h), "age", "observations", "feature_time")
            rows = pipe.execute()
        summary = np.array([[float(a or 0), float(o or 0)] for a, o, _ in rows], dtype=np.float32)
        return {"summary": summary}, [float(t or 0) for _, _, t in rows]


def skeleton_events(n_admissions: int = 5) -> list:
    """A few admissions with observations: enough to exercise every hop."""
    start = datetime(2150, 1, 1, 8, tzinfo=UTC)
    out = []
    for i in range(n_admissions):
        hadm, subject, admit = 90_000_000 + i, 19_000_000 + i, start + timedelta(hours=i)
        out.append(
            ev.AdmissionEvent(
                event_id=ev.event_id("demo/admissions", i),
                hadm_id=hadm,
                subject_id=subject,
                event_time=admit,
                source="demo/admissions",
                payload=ev.AdmissionPayload(
                    admittime=admit, admission_type="EW EMER.", gender="F", age=40 + 10 * i
                ),
            )
        )
        for j in range(2 * i + 1):
            t = admit + timedelta(minutes=30 * (j + 1))
            out.append(
                ev.ObservationEvent(
                    event_id=ev.event_id("demo/labevents", (i, j)),
                    hadm_id=hadm,
                    subject_id=subject,
                    event_time=t,
                    source="demo/labevents",
                    payload=ev.ObservationPayload(
                        itemid=50912, value=1.0 + 0.1 * j, unit="mg/dL", charttime=t, kind="lab"
                    ),
                )
            )
    return out


def produce(settings: Settings, events: list) -> None:
    producer = KafkaProducer(
        **kafka_python_config(settings, "producer"), acks="all", enable_idempotence=True
    )
    try:
        for e in events:
            producer.send(
                settings.kafka.topic_events, key=ev.key(e), value=ev.encode(ev.validate(e))
            )
        producer.flush()
    finally:
        producer.close()


def placeholder_scorer(settings: Settings):
    """The ``placeholder`` model on Triton, given the batch's arrays as they are."""
    from stream.scoring import ModelScorer

    return ModelScorer(settings, MODEL)


def pipeline(settings: Settings):
    """(features, scorer, scores) for a benchmark worker (``benchmarks.bench_e2e.run``)."""
    from m3t.clients import redis_client
    from stream.scores import ScoreStore

    client = redis_client(settings)
    return SkeletonFeatures(client), placeholder_scorer(settings), ScoreStore(client)


def main(argv: list[str] | None = None) -> None:
    from m3t.clients import redis_client
    from stream.cli import run_worker
    from stream.scores import ScoreStore

    parser = argparse.ArgumentParser(description="A stream worker scoring the walking skeleton.")
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=int, default=50)
    parser.add_argument("--max-poll", type=int, default=2048)
    args = parser.parse_args(argv)
    settings = get_settings()
    client = redis_client(settings)
    stats = run_worker(
        settings,
        SkeletonFeatures(client),
        placeholder_scorer(settings),
        ScoreStore(client),
        args.idle_timeout,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_poll_records=args.max_poll,
    )
    print(asdict(stats))


if __name__ == "__main__":
    main()
