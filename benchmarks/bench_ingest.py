"""Ingest: synthetic cohort generation, reader rows/s, and replay events/s into the broker,
kafka-python beside confluent-kafka on the same events.

The cohort is generated once (timed once: it writes files); the reader is timed over the
whole folder (every table, every row); replay sends the reader's events in global
event-time order through ``ingest.replay.replay`` (encode, validate, produce, acks=all)
to a topic created for the run, with and without the outgoing validation so its cost shows.

Run: ``python -m benchmarks.bench_ingest [ADMISSIONS]`` (results under benchmarks/results/).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness as h
from benchmarks.bench_kafka import delete_topics
from ingest.mimic import MimicReader
from ingest.replay import make_producer, replay
from ingest.synth import generate
from m3t import kafka, services
from m3t.settings import Settings

CLIENTS = ("kafka-python", "confluent")


def run(
    settings: Settings,
    *,
    admissions: int = 2000,
    repeats: int = 3,
    warmup: int = 1,
    workdir: Path | None = None,
) -> h.Result:
    services.up(settings, ["kafka"])
    result = h.Result(
        "ingest",
        {
            "admissions": admissions,
            "repeats": repeats,
            "warmup": warmup,
            "acks": "all",
            "linger_ms": 20,
            "batch_size": 512 * 1024,
            "compression": "none",
            "partitions": settings.kafka.partitions,
        },
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cohort = Path(tmp) / "cohort"
        t = time.perf_counter()
        generate(cohort, admissions, seed=0)
        seconds = time.perf_counter() - t
        result.rows.append(
            {
                "case": "synth",
                "variant": "256px, DICOM",
                "items_per_s": admissions / seconds,
                "note": f"admissions/s, one run ({seconds:.1f} s)",
            }
        )

        readers = []

        def read_all():
            reader = MimicReader(cohort)
            readers.append((reader, list(reader.admissions())))

        read = h.measure(
            read_all, 1, warmup=0, repeats=repeats
        )  # one item per call: rescaled below
        reader, events = readers[-1]
        rows = sum(t.read for t in reader.stats.tables.values())
        n_events = sum(map(len, events))
        result.rows.append(
            {
                "case": "read",
                "variant": "rows",
                **_scaled(read, rows),
                "note": f"{rows:,} rows -> {n_events:,} events",
            }
        )

        rates = {}
        for client in CLIENTS:
            for validate in (True, False):
                cfg = kafka.own_topics(settings, "bench-")
                topic = cfg.kafka.topic_events
                try:
                    producer = make_producer(cfg, client)
                    try:
                        measured = h.measure(
                            lambda: replay(
                                events, producer, topic, dead_letter_topic=topic, validate=validate
                            ),
                            n_events,
                            warmup=warmup,
                            repeats=repeats,
                        )
                    finally:
                        producer.close()
                finally:
                    delete_topics(cfg)
                variant = f"{client}{'' if validate else ', no validation'}"
                result.rows.append(
                    {"case": "replay", "variant": variant, **measured, "note": "events/s"}
                )
                rates[client, validate] = measured["items_per_s"]
    result.comparisons.append(
        h.ratio(
            "replay events/s (validated)",
            "confluent",
            "kafka-python",
            rates["confluent", True],
            rates["kafka-python", True],
        )
    )
    result.comparisons.append(
        h.ratio(
            "replay events/s, validation off over on",
            "confluent no validation",
            "confluent",
            rates["confluent", False],
            rates["confluent", True],
        )
    )
    result.seconds = time.perf_counter() - started
    return result


def _scaled(measured: dict, items: int) -> dict:
    out = dict(measured)
    for k in ("items_per_s", "items_per_s_min", "items_per_s_max"):
        out[k] = measured[k] * items
    out["items"] = items
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    outcome = run(Settings(), admissions=n)
    saved = h.save(outcome)
    print(h.markdown(outcome))
    for comparison in outcome.comparisons:
        print(f"{comparison['what']}: {comparison['ratio']:.2f}x")
    print({name: str(path) for name, path in saved.items()})
