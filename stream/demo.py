"""`m3t demo`: the whole flow on the real services, from a fresh machine."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from ingest import events as ev
from m3t import services
from m3t.clients import redis_client
from m3t.settings import Settings
from stream.scores import ScoreStore
from stream.skeleton import SkeletonFeatures
from stream.triton_scorer import TritonScorer
from stream.worker import StreamWorker


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
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    try:
        for e in events:
            producer.send(settings.kafka.topic_events, key=ev.key(e), value=ev.encode(ev.validate(e)))
        producer.flush()
    finally:
        producer.close()


def scores_table(scores) -> Table:
    table = Table("hadm_id", "mortality risk", "LoS (days)", "model")
    for s in scores:
        table.add_row(str(s.hadm_id), f"{s.mortality_prob:.3f}", f"{s.los_days:.1f}", s.model)
    return table


def run_demo(settings: Settings, console: Console) -> None:
    console.rule("services")
    for health in services.up(settings):
        console.print(f"{health.name}: {health.address} healthy={health.healthy}")
    events = skeleton_events()
    console.rule(f"producing {len(events)} admission events to Kafka")
    produce(settings, events)
    console.rule("stream worker (walking skeleton: placeholder model)")
    client = redis_client(settings)
    store = ScoreStore(client)
    worker = StreamWorker(settings, SkeletonFeatures(client), TritonScorer(settings, "placeholder"), store,
                          group_id="m3t-demo")
    stats = worker.run(idle_timeout_s=3.0)
    console.print(f"consumed {stats.events} events, scored {stats.scored} admissions in {stats.batches} batches")
    console.print(scores_table(store.top(10)))
    first = events[0].hadm_id
    score = store.get(first)
    console.print(f"score read back from Redis for {first}: {score.as_json() if score else None}")
    console.print("Query: `m3t scores get HADM_ID`, `m3t scores top --n 20`")
