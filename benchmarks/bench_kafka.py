"""Kafka: produce and consume throughput, kafka-python beside confluent-kafka, and
produce-to-consume latency under open-loop load.

Both clients send the same encoded events (``ingest.events`` observations, keyed by
``hadm_id``) through the project's own producers (``ingest.replay.make_producer``, acks=all),
to an events topic created for this run on the real broker. They sign in as the roles that
do this in production: the producer sends, the stream reads. Consumers read from the
beginning of that topic with manual assignment; their setup (connecting, assigning) is not
timed.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from benchmarks import harness as h
from ingest import events as ev
from ingest.replay import make_producer
from m3t import kafka, services
from m3t.settings import Settings

CLIENTS = ("kafka-python", "confluent")


def make_events(n: int, admissions: int = 256) -> list[tuple[bytes, bytes]]:
    """``n`` encoded (key, value) observation events spread over ``admissions`` admissions."""
    t0 = datetime(2150, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        when = t0 + timedelta(seconds=i)
        event = ev.ObservationEvent(
            event_id=ev.event_id("bench/kafka", i),
            hadm_id=30_000_000 + i % admissions,
            subject_id=11_000_000 + i % admissions,
            event_time=when,
            source="bench/kafka",
            payload=ev.ObservationPayload(
                itemid=50912, value=1.0 + (i % 50) / 10, unit="mg/dL", charttime=when, kind="lab"
            ),
        )
        out.append((ev.key(event), ev.encode(event)))
    return out


def delete_topics(cfg: Settings) -> None:
    """Remove a run's own topics and grants (``m3t.kafka.own_topics``)."""
    try:
        kafka.delete_topics(cfg)
    except Exception:  # a benchmark topic left behind is harmless; never fail the run for it
        pass


def kafka_python_partitions(consumer, topic: str) -> list[int]:
    return kafka.wait_for_partitions(lambda: consumer.partitions_for_topic(topic), topic, 20.0)


# --- consumers: read n records from the start of a topic; return the seconds taken ----------


def consume_kafka_python(settings: Settings, topic: str, n: int, timeout_s: float = 60.0) -> float:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        **kafka.kafka_python_config(settings, "stream"),
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=5000,
        client_id="m3t-bench",
    )
    try:
        partitions = [TopicPartition(topic, p) for p in kafka_python_partitions(consumer, topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        started, seen = time.perf_counter(), 0
        while seen < n:
            polled = consumer.poll(timeout_ms=500)
            seen += sum(len(records) for records in polled.values())
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"kafka-python read {seen} of {n} records in {timeout_s:.0f} s")
        return time.perf_counter() - started
    finally:
        consumer.close()


def consume_confluent(settings: Settings, topic: str, n: int, timeout_s: float = 60.0) -> float:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    consumer = kafka.consumer(
        settings,
        role="stream",
        group_id=f"{settings.kafka.consumer_group}-{uuid.uuid4().hex[:8]}",
        client_id="m3t-bench",
    )
    try:
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in kafka.partitions(consumer, topic)]
        )
        started, seen = time.perf_counter(), 0
        while seen < n:
            seen += sum(
                1 for m in consumer.consume(num_messages=5000, timeout=0.5) if m.error() is None
            )
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(
                    f"confluent-kafka read {seen} of {n} records in {timeout_s:.0f} s"
                )
        return time.perf_counter() - started
    finally:
        consumer.close()


CONSUMERS = {"kafka-python": consume_kafka_python, "confluent": consume_confluent}


# --- latency under open-loop load -------------------------------------------------------------


def produce_to_consume_latency(
    settings: Settings, rate: float, seconds: float, drain_s: float = 5.0
) -> dict:
    """Events sent at ``rate``/s with kafka-python (linger 1 ms); each event's latency runs
    from its scheduled send time to its arrival at a kafka-python consumer."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    cfg = kafka.own_topics(settings, "bench-")
    topic = cfg.kafka.topic_events
    payload = make_events(1)[0][1]
    consumer = KafkaConsumer(
        **kafka.kafka_python_config(cfg, "stream"),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=5,
        client_id="m3t-bench",
    )
    producer = KafkaProducer(
        **kafka.kafka_python_config(cfg, "producer"), acks="all", linger_ms=1, client_id="m3t-bench"
    )
    try:
        partitions = [TopicPartition(topic, p) for p in kafka_python_partitions(consumer, topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        consumer.poll(timeout_ms=200)  # fetch positions now, not during the run
        stop = threading.Event()

        def receive(run: h.LoadRun):
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=50).values():
                    now = time.perf_counter()
                    for record in records:
                        run.complete(int(record.key), now)

        def send(i: int):
            producer.send(topic, key=str(i).encode(), value=payload)

        run = h.schedule(rate, seconds)
        receiver = threading.Thread(target=receive, args=(run,), daemon=True)
        receiver.start()
        h.drive(run, send, synchronous=False)
        producer.flush()
        deadline = time.perf_counter() + drain_s
        while run.completed < len(run.scheduled) and time.perf_counter() < deadline:
            time.sleep(0.02)
        stop.set()
        receiver.join(timeout=2)
        return run.summary()
    finally:
        producer.close()
        consumer.close()
        delete_topics(cfg)


# --- the stage ----------------------------------------------------------------------------------


def run(
    settings: Settings,
    *,
    n_events: int = 50_000,
    repeats: int = 3,
    warmup: int = 1,
    rates: tuple[float, ...] = (200, 1000, 4000),
    load_seconds: float = 3.0,
) -> h.Result:
    """Produce and consume ``n_events`` with each client (median of ``repeats``), then
    produce-to-consume latency at each offered ``rate`` for ``load_seconds``."""
    services.up(settings, ["kafka"])
    result = h.Result(
        "kafka",
        {
            "n_events": n_events,
            "repeats": repeats,
            "warmup": warmup,
            "rates": list(rates),
            "load_seconds": load_seconds,
            "acks": "all",
            "partitions": settings.kafka.partitions,
        },
    )
    started = time.perf_counter()
    events = make_events(n_events)
    cfg = kafka.own_topics(settings, "bench-")
    topic = cfg.kafka.topic_events
    try:
        rates_by = {}
        for client in CLIENTS:
            producer = make_producer(cfg, client)
            try:

                def produce_all():
                    for key, value in events:
                        producer.send(topic, key, value)
                    producer.flush()

                produced = h.measure(produce_all, n_events, warmup=warmup, repeats=repeats)
            finally:
                producer.close()
            result.rows.append({"case": "produce", "variant": client, **produced})
            rates_by["produce", client] = produced["items_per_s"]
        for client in CLIENTS:
            consume = CONSUMERS[client]
            consumed = h.measure_seconds(
                lambda: consume(cfg, topic, n_events), n_events, warmup=warmup, repeats=repeats
            )
            result.rows.append({"case": "consume", "variant": client, **consumed})
            rates_by["consume", client] = consumed["items_per_s"]
    finally:
        delete_topics(cfg)
    for case in ("produce", "consume"):
        result.comparisons.append(
            h.ratio(
                f"{case} events/s",
                "confluent",
                "kafka-python",
                rates_by[case, "confluent"],
                rates_by[case, "kafka-python"],
            )
        )
    for rate in rates:
        latency = produce_to_consume_latency(settings, rate, load_seconds)
        result.rows.append({"case": "produce->consume", "variant": "kafka-python", **latency})
    if rates:
        result.breakdown_ms["kafka produce->consume"] = result.rows[-len(rates)].get("p50_ms")
    result.seconds = time.perf_counter() - started
    return result
