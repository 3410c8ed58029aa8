"""Rescoring after a numeric update: the encoder cache beside full-model scoring.

The common event is a lab or a vital: the admission's notes and X-ray are unchanged. The
full-model path (``m3t_lm``) decodes the X-ray and runs every encoder again; the cached
path (``m3t_rescore``: the numeric encoder and the fusion head in one call, note and X-ray
embeddings from Redis) runs only what changed. Both score the same batch of admissions,
side by side in one run, on the real Triton and Redis. The admissions are those the live
system holds (after `make demo`: the current inpatients), so the numbers are of real feature
rows with notes and X-rays.

At a ward's rate each event is scored alone. ``paced`` = (calls/s, seconds) scores one
admission per call through the cached path at that rate, and records the CPU each process
spends per call: this one (the scorer, as a worker would run it), Triton (its server and
model stubs) and Redis (the cached embeddings' read).
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks import harness as h
from benchmarks.bench_e2e import service_pids
from m3t.settings import Settings

FULL, CACHED = "full model (m3t_lm, X-ray decoded)", "encoder cache (numeric encoder + fusion)"
# One admission per call at 50 calls a second, the rate of #19's CPU target, for 10 s.
PACED = (50.0, 10.0)


def current_admissions(client, limit: int) -> list[int]:
    from stream.scores import RANKING_KEY

    return [int(m) for m in client.zrevrange(RANKING_KEY, 0, limit - 1)]


def paced_cost(settings: Settings, scorer, inputs: dict, rate: float, seconds: float) -> dict:
    """``scorer`` scoring one admission per call, ``rate`` calls a second for ``seconds``,
    the admissions of ``inputs`` in turn: latency, and CPU ms per call by process."""
    meter = h.CpuMeter(
        {
            "scorer": [os.getpid()],
            **{name: service_pids(settings, name) for name in ("triton", "redis")},
        }
    )
    n = len(next(iter(inputs.values())))
    alone = [{name: values[i : i + 1] for name, values in inputs.items()} for i in range(n)]
    run, took = h.schedule(rate, seconds), []

    def call(i: int) -> None:
        began = time.perf_counter()
        scorer.score(alone[i % n])
        took.append(time.perf_counter() - began)

    before = meter.sample()
    h.drive(run, call)
    after = meter.sample()
    per_call = {name: round(1000 * (after[name] - before[name]) / len(took), 3) for name in after}
    return {
        "calls": len(took),
        **h.latency_summary(took),
        "cpu_ms_per_call": per_call,
        "note": "CPU ms a call: " + ", ".join(f"{k} {v:.2f}" for k, v in per_call.items()),
    }


def run(
    settings: Settings,
    *,
    batch: int = 256,
    repeats: int = 5,
    paced: tuple[float, float] | None = PACED,
    store=None,
    hadm_ids=None,
) -> h.Result:
    from m3t.clients import redis_client
    from stream.scoring import CachedEncoderScorer, FullModelScorer, OnlineFeatures

    started = time.perf_counter()
    result = h.Result(
        "scoring", {"batch": batch, "repeats": repeats, "paced": list(paced) if paced else None}
    )
    client = redis_client(settings)
    try:
        if store is None:
            from features.online import OnlineStore

            store = OnlineStore.current(client)
        hadm_ids = list(hadm_ids or current_admissions(client, batch))
        if not hadm_ids:
            raise LookupError(
                "no current admissions in Redis: run `make demo` (or replay a cohort) first"
            )
        full, cached = FullModelScorer(settings), CachedEncoderScorer(settings, client)
    except (LookupError, RuntimeError) as exc:
        result.missing["scoring"] = str(exc)
        return result

    inputs, _ = OnlineFeatures(store).inputs(hadm_ids)
    cached.score(inputs)  # fill the cache, as the admission's first scoring did
    modalities = inputs["modality_mask"].mean(axis=0)
    rows = {}
    for name, scorer in ((FULL, full), (CACHED, cached)):
        rows[name] = h.measure(
            lambda s=scorer: s.score(inputs), len(hadm_ids), warmup=1, repeats=repeats
        )
        result.rows.append(
            {
                "case": "rescoring after a numeric update",
                "variant": name,
                "batch": len(hadm_ids),
                **rows[name],
            }
        )
    if paced:
        rate, seconds = paced
        result.rows.append(
            {
                "case": f"one admission per call, {rate:g} calls/s",
                "variant": CACHED,
                "batch": 1,
                **paced_cost(settings, cached, inputs, rate, seconds),
            }
        )
    los_full, mort_full = full.score(inputs)
    los_cached, mort_cached = cached.score(inputs)
    result.params.update(
        {
            "admissions": len(hadm_ids),
            "with_radiology_note": float(modalities[0]),
            "with_discharge_note": float(modalities[1]),
            "with_cxr": float(modalities[2]),
            "max_abs_diff_los": float(np.max(np.abs(los_full - los_cached))),
            "max_abs_diff_mortality": float(np.max(np.abs(mort_full - mort_cached))),
        }
    )
    result.comparisons.append(
        h.ratio(
            "rescoring admissions/s",
            CACHED,
            FULL,
            rows[CACHED]["items_per_s"],
            rows[FULL]["items_per_s"],
        )
    )
    result.breakdown_ms = {
        name: 1000 * r["seconds_median"] / len(hadm_ids) for name, r in rows.items()
    }
    result.seconds = time.perf_counter() - started
    return result
