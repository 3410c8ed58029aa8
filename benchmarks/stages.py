"""The stages, their full and quick sizes, and ``run_all``.

Quick sizes run every stage within a few minutes on the project's 2-core machine; full
sizes are what the README's tables report. A stage's module is imported only when it runs,
so ``m3t bench kafka`` does not load torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness as h
from m3t.settings import Settings

# The scheduler beside the one before #19 (bench_e2e.SCHEDULERS; named here so that listing
# the stages imports no benchmark).
SCHEDULER_BESIDE_FILL_WAIT = (
    "scheduler: settings",
    "scheduler: fill wait 20 ms, fetch 5 ms/1 MB",
)


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    help: str
    full: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)

    def run(self, settings: Settings, quick: bool = False, **overrides) -> h.Result:
        sizes = {**(self.quick if quick else self.full), **overrides}
        result = importlib.import_module(self.module).run(settings, **sizes)
        result.params["quick"] = quick
        return result


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "ingest",
            "benchmarks.bench_ingest",
            "Synthetic cohort generation, reader rows/s and replay events/s into Kafka "
            "(both clients).",
            full=dict(admissions=2000, repeats=3),
            quick=dict(admissions=200, repeats=2),
        ),
        Stage(
            "kafka",
            "benchmarks.bench_kafka",
            "Kafka produce/consume events/s (kafka-python beside confluent-kafka) "
            "and produce->consume latency.",
            full=dict(n_events=50_000, repeats=3, rates=(200, 1000, 4000), load_seconds=5.0),
            quick=dict(n_events=10_000, repeats=2, rates=(200, 1000), load_seconds=2.0),
        ),
        Stage(
            "features",
            "benchmarks.bench_features",
            "Feature state updates (events/s), the offline builder, and the batch-read transform.",
            full=dict(admissions=1024, observations=40, calls=500, repeats=3),
            quick=dict(admissions=256, observations=10, calls=50, repeats=2),
        ),
        Stage(
            "redis",
            "benchmarks.bench_redis",
            "Online store writes (events/s) and batch reads (p50/p99) "
            "beside a plain HGETALL pipeline.",
            full=dict(
                admissions=1024, observations=40, batches=(1, 64, 256, 1024), reads=1000, repeats=3
            ),
            quick=dict(
                admissions=1024, observations=5, batches=(1, 64, 256, 1024), reads=40, repeats=2
            ),
        ),
        Stage(
            "cxr",
            "benchmarks.bench_cxr",
            "Chest X-ray decode+preprocess images/s: Pillow/pydicom + NumPy "
            "beside DALI on the CPU.",
            full=dict(images=64, batches=(1, 8, 32), repeats=3),
            quick=dict(images=16, batches=(1, 8), repeats=2),
        ),
        Stage(
            "inference",
            "benchmarks.bench_inference",
            "M3T-LM examples/s by batch size: PyTorch eager, ONNX Runtime, Triton; "
            "TensorRT where installed.",
            full=dict(batches=(1, 4, 16, 64, 256, 1024), repeats=3, min_items=256),
            quick=dict(batches=(1, 16, 256), repeats=2, min_items=64),
        ),
        Stage(
            "scoring",
            "benchmarks.bench_scoring",
            "Rescoring after a numeric update: the encoder cache beside full-model scoring "
            "(needs `make demo`).",
            full=dict(batch=256, repeats=5),
            quick=dict(batch=64, repeats=2),
        ),
        Stage(
            "ward",
            "benchmarks.bench_ward",
            "The ward page in headless Chromium: a score written to Redis until its row is "
            "updated in the browser (p50/p99).",
            full=dict(updates=200, admissions=20, history=12),
            quick=dict(updates=30, admissions=10, history=4),
        ),
        Stage(
            "feeds",
            "benchmarks.bench_feeds",
            "HL7 v2 messages/s through the MLLP listener (pinned to one core) into Kafka, "
            "ACK latency p50/p99 at fixed offered rates and at saturation; FHIR Bundles/s "
            "through POST /fhir.",
            full=dict(messages=20_000, connections=32, rates=(100, 500), rate_seconds=5.0),
            quick=dict(
                messages=2000,
                connections=16,
                rates=(100, 500),
                rate_seconds=2.0,
                repeats=2,
                fhir_bundles=300,
            ),
        ),
        Stage(
            "e2e",
            "benchmarks.bench_e2e",
            "Offered-load sweep through the stream worker (new admissions; a census of open ones, "
            "clean and with 1% hostile events): achieved events/s, event-to-score p50/p95/p99, "
            "CPU by process and time by stage, the scheduler beside the one before #19.",
            full=dict(
                rates=(50, 200, 2000, 10_000, 15_000),
                seconds=5.0,
                workers=(1, 2),
                held=(2000, 30.0),
                schedulers=SCHEDULER_BESIDE_FILL_WAIT,
                explanations=(False, True),
            ),
            quick=dict(
                rates=(50, 200, 2000),
                seconds=3.0,
                drain_s=5.0,
                workloads=("new admissions", "census"),
                schedulers=SCHEDULER_BESIDE_FILL_WAIT,
                explanations=(False, True),
            ),
        ),
    )
}


def run_all(
    settings: Settings,
    quick: bool = False,
    out_dir: Path = h.RESULTS_DIR,
    stages: list[str] | None = None,
    on_result: Callable[[h.Result], None] | None = None,
) -> tuple[list[h.Result], h.Result]:
    """Every stage in turn (each saved as it finishes), then the ``pipeline`` summary: one
    event's path by stage, from each stage's batch-1 medians, and ``summary-latest.md``."""
    results, failed = [], {}
    for name in stages or list(STAGES):
        try:
            result = STAGES[name].run(settings, quick=quick)
        except Exception as exc:  # one broken stage must not lose the others' numbers
            failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        h.save(result, out_dir)
        results.append(result)
        if on_result is not None:
            on_result(result)
    pipeline = h.Result(
        "pipeline", {"quick": quick, "stages": [r.stage for r in results]}, missing=failed
    )
    for result in results:
        pipeline.breakdown_ms.update(result.breakdown_ms)
        pipeline.seconds += result.seconds
    h.save(pipeline, out_dir)
    summary = "\n".join(h.markdown(r) for r in [*results, pipeline])
    (Path(out_dir) / "summary-latest.md").write_text(summary)
    return results, pipeline
