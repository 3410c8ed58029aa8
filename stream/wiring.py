"""A stream worker built from the settings: its Kafka clients, and the worker over them."""

from __future__ import annotations

from confluent_kafka import Consumer

from features.image_files import ImageAccess
from m3t import kafka
from m3t.settings import Settings
from stream.interfaces import FeatureSource, Scorer
from stream.kafka_io import KafkaSink, KafkaSource, log_commit_failure
from stream.scores import ScoreStore
from stream.worker import StreamWorker


def worker_consumer(settings: Settings, group_id: str, **options) -> Consumer:
    """A worker's consumer in ``group_id``; ``options`` are more librdkafka properties."""
    cfg = settings.kafka
    return kafka.consumer(
        settings,
        role="stream",
        group_id=group_id,
        client_id="m3t-worker",
        on_commit=log_commit_failure,
        **{
            "fetch.wait.max.ms": cfg.fetch_wait_max_ms,
            "fetch.min.bytes": cfg.fetch_min_bytes,
            # No fetching ahead: one event waiting in the local queue holds the next fetch.
            "queued.min.messages": 1,
            "fetch.queue.backoff.ms": cfg.fetch_queue_backoff_ms,
            **options,
        },
    )


def connect(
    settings: Settings,
    features: FeatureSource,
    scorer: Scorer,
    scores: ScoreStore,
    *,
    group_id: str | None = None,
    topic: str | None = None,
    max_poll_records: int = 2048,
    linger_ms: int = 1,
    consumer_options: dict | None = None,
    **options,
) -> StreamWorker:
    """A worker on the Kafka of ``settings``, in consumer group ``group_id`` (default: the
    settings'), reading ``topic`` (default: the events topic) up to ``max_poll_records`` a
    poll, its scores produced with ``linger_ms``, its consumer given ``consumer_options``
    (librdkafka properties); ``options`` are ``StreamWorker``'s
    (``max_batch`` and ``max_wait_ms`` default to the settings')."""
    cfg = settings.kafka
    consumer = worker_consumer(settings, group_id or cfg.consumer_group, **(consumer_options or {}))
    # A batch's scores are queued together, so a short linger loses no batching.
    producer = kafka.producer(
        settings, role="stream", client_id="m3t-worker", **{"linger.ms": linger_ms}
    )
    # Larger than a scoring batch: under a backlog, one poll's events fold into fewer
    # admission writes (each admission's events in it are loaded and committed once).
    source = KafkaSource(consumer, topic or cfg.topic_events, max_records=max_poll_records)
    return StreamWorker(
        source,
        KafkaSink(producer),
        features,
        scorer,
        scores,
        scores_topic=cfg.topic_scores,
        dead_letter_topic=cfg.topic_dead_letter,
        max_event_bytes=settings.stream.max_event_bytes,
        max_event_lead_s=settings.stream.max_event_lead_s,
        dead_letter_payload=settings.stream.dead_letter_payload,
        images=ImageAccess.from_settings(settings),
        **{
            "max_batch": settings.stream.max_batch,
            "max_wait_ms": settings.stream.max_wait_ms,
            "explain_share": settings.stream.explain_share,
            **options,
        },
    )
