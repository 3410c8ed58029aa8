"""Features without Redis: the state update, the offline builder and the read transform.

(Redis writes and batch reads through the online store are ``bench_redis``; chest X-ray
preprocessing, Pillow/pydicom beside DALI, is ``bench_cxr``.)

* fold: events per second through ``AdmissionState.apply`` (the update both paths share);
* offline build: ``features.offline.build`` over the same cohort, cutoffs 6/24/48 h;
* transform: ``FittedFeatures.assemble`` over stored blobs (the CPU half of a batch read)
  for batches of 1, 64, 256 and 1,024 admissions, with glibc's default allocator settings
  and after ``m3t.allocator.tune_allocator()``, in one run.

Run: ``python -m benchmarks.bench_features [ADMISSIONS]`` (results under benchmarks/results/).
"""

from __future__ import annotations

import itertools
import sys
import time

from benchmarks import harness as h
from features import offline
from features.fitted import FittedFeatures
from features.sample import WORDS, cohort
from features.state import AdmissionState
from features.vocab import Vocabulary
from m3t.allocator import tune_allocator
from m3t.settings import Settings

READ_BATCHES = (1, 64, 256, 1024)


def run(
    settings: Settings,
    *,
    admissions: int = 1024,
    observations: int = 40,
    calls: int = 500,
    repeats: int = 3,
    warmup: int = 1,
) -> h.Result:
    result = h.Result(
        "features",
        {
            "admissions": admissions,
            "observations_per_admission": observations,
            "transform_calls": calls,
            "repeats": repeats,
            "warmup": warmup,
        },
    )
    started = time.perf_counter()
    fitted = FittedFeatures.unnormalised(Vocabulary.fit([" ".join(WORDS)]))
    histories = list(cohort(admissions, seed=7, n_observations=observations).values())
    n_events = sum(len(events) for events in histories)

    def fold_all():
        for events in histories:
            state = AdmissionState()
            for event in events:
                state.apply(event, fitted.vocab)
            state.to_blob()

    result.rows.append(
        {
            "case": "fold events",
            "variant": "AdmissionState.apply",
            **h.measure(fold_all, n_events, warmup=warmup, repeats=repeats),
            "note": "events/s",
        }
    )
    policy = offline.CutoffPolicy((6.0, 24.0, 48.0))
    examples = len(offline.build(histories, policy))
    built = h.measure(
        lambda: offline.build(histories, policy), n_events, warmup=warmup, repeats=repeats
    )
    result.rows.append(
        {
            "case": "offline build",
            "variant": "cutoffs 6/24/48 h",
            **built,
            "note": f"events/s; {examples} examples",
        }
    )

    _transform(result, fitted, histories, calls)
    result.seconds = time.perf_counter() - started
    return result


def _transform(result: h.Result, fitted: FittedFeatures, histories: list, calls: int) -> None:
    blobs = []
    for events in histories:
        state = AdmissionState()
        for event in events:
            state.apply(event, fitted.vocab)
        blobs.append(state.to_blob())
    p50 = {}
    for variant in ("glibc defaults", "tune_allocator()"):
        if variant == "tune_allocator()" and not tune_allocator():
            result.missing["tune_allocator()"] = "no glibc mallopt here"
            break
        for batch in (b for b in READ_BATCHES if b <= len(blobs)):
            picks = itertools.cycle(
                [blobs[i : i + batch] for i in range(0, len(blobs) - batch + 1, batch)]
            )
            summary = h.latency_summary(
                h.time_calls(lambda: fitted.assemble(next(picks)), calls, warmup=20)
            )
            result.rows.append(
                {
                    "case": "transform (assemble)",
                    "variant": variant,
                    "batch": batch,
                    "items_per_s": batch / (summary["p50_ms"] / 1000),
                    **summary,
                }
            )
            p50[variant, batch] = summary["p50_ms"]
    if ("tune_allocator()", 256) in p50:
        result.comparisons.append(
            h.ratio(
                "assemble p50, batch 256",
                "glibc defaults",
                "tune_allocator()",
                p50["glibc defaults", 256],
                p50["tune_allocator()", 256],
            )
        )


if __name__ == "__main__":
    from rich.console import Console

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    outcome = run(Settings(), admissions=n)
    console = Console()
    for table in h.rich_tables(outcome):
        console.print(table)
    for comparison in outcome.comparisons:
        print(f"{comparison['what']}: {comparison['ratio']:.2f}x")
    print(h.save(outcome))
