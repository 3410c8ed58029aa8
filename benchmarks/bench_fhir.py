"""FHIR R4 Bundles/s through ``POST /fhir`` into Kafka, and the answer's latency.

The API (``stream.api`` with ``stream.fhir_api``) runs under uvicorn in a process of its
own pinned to one core; senders are threads of this process with an httpx client each,
posting Bundles back to back (a closed loop, as a hospital's interface engine does per
connection). Every answer must be 200: the API answers only once Kafka acknowledged
(``acks=all``) every event of the Bundle.

* ``fhir step``: Bundles/s of mapping alone (fhir.resources validation, the event
  contract), in this process, no Kafka.
* ``fhir post``: Bundles/s and events/s through the API into Kafka, latency p50/p99.

The Bundles are the writer's (``ingest.fhir_writer``): per admission one with the Patient
and the Encounter, one per hour of results (1 to 4 Observations), one with the discharge.

``fhir_rows`` gives the rows for ``m3t bench feeds``; ``python -m benchmarks.bench_fhir``
runs it alone.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta

import httpx

from benchmarks import harness as h
from ingest import events as ev
from ingest import fhir, fhir_writer, itemids
from m3t import kafka, services
from m3t.settings import Settings
from stream.api_tokens import TokenStore
from stream.fhir_api import FHIR_JSON

HOURS_OF_RESULTS = 6


def fhir_bundles(n: int, *, seed: int) -> list[tuple[bytes, int]]:
    """About ``n`` Bundles (each with its count of events), admission by admission, with
    admission ids of the seed's own."""
    rng = random.Random(seed)
    items = sorted(fhir_writer.UCUM_UNITS)
    admissions, hadm = [], 30_000_000 + seed * 100_000
    count = 0
    while count < n:
        hadm += 1
        admitted = datetime(2180, 3, 1, 8) + timedelta(minutes=rng.randrange(600))
        envelope = dict(hadm_id=hadm, subject_id=hadm + 10_000_000, source="bench")
        events = [
            ev.AdmissionEvent(
                **envelope,
                event_id=f"a{hadm}",
                event_time=admitted,
                payload=dict(
                    admittime=admitted,
                    admission_type="EW EMER.",
                    gender=rng.choice("MF"),
                    age=float(rng.randint(20, 90)),
                ),
            )
        ]
        for hour in range(1, HOURS_OF_RESULTS + 1):
            for k in range(rng.randint(1, 4)):
                item = itemids.ITEMS[rng.choice(items)]
                at = admitted + timedelta(hours=hour, minutes=k)
                value = round(item.low + (item.high - item.low) * rng.uniform(0.1, 0.3), 2)
                events.append(
                    ev.ObservationEvent(
                        **envelope,
                        event_id=f"o{hadm}-{hour}-{k}",
                        event_time=at,
                        payload=dict(itemid=item.itemid, value=value, charttime=at, kind=item.kind),
                    )
                )
        left = admitted + timedelta(days=3)
        events.append(
            ev.DischargeEvent(
                **envelope,
                event_id=f"d{hadm}",
                event_time=left,
                payload=dict(dischtime=left, los_days=3.0, hospital_expire_flag=False),
            )
        )
        admissions.append(events)
        count += HOURS_OF_RESULTS + 2
    return [
        (json.dumps(bundle, separators=(",", ":")).encode(), events)
        for bundle, events, _ in fhir_writer.bundles(admissions)
    ]


def step_row(sample: list[tuple[bytes, int]], repeats: int = 3) -> dict:
    """Bundles/s of mapping alone (one core, no Kafka)."""
    bundles = [b for b, _ in sample]
    events = sum(n for _, n in sample)
    return {
        "case": "fhir step",
        "variant": "map + validate",
        **h.measure(lambda: [fhir.to_events(b) for b in bundles], len(bundles), repeats=repeats),
        "note": f"Bundles/s on one core, no Kafka; {events / len(bundles):.1f} events/Bundle",
    }


def fhir_rows(
    settings: Settings,
    *,
    bundles: int = 2000,
    connections: int = 8,
    repeats: int = 3,
    core: int | None = None,
) -> list[dict]:
    """The FHIR rows of ``m3t bench feeds``: mapping alone, then through the API (pinned to
    ``core``, default the last) into Kafka, on topics of the run's own."""
    core = os.cpu_count() - 1 if core is None else core
    rows = [step_row(fhir_bundles(min(bundles, 400), seed=0))]
    cfg = kafka.own_topics(settings, "bench-")
    cfg = cfg.model_copy(
        update={"api": cfg.api.model_copy(update={"rate_limit_per_minute": 10**9})}
    )
    name = f"bench-fhir-{uuid.uuid4().hex[:8]}"
    token = TokenStore(cfg).add(name, "ingest")
    try:
        with PinnedApi(cfg, core) as api:
            rounds = [fhir_bundles(bundles, seed=n + 1) for n in range(repeats + 1)]
            closed_loop(api.url, token, rounds[0][: max(50, bundles // 10)], connections)
            before = api.cpu()
            sweeps = [closed_loop(api.url, token, r, connections) for r in rounds[1:]]
            cores = (api.cpu() - before) / sum(s["seconds"] for s in sweeps)
        rates = [s["bundles"] / s["seconds"] for s in sweeps]
        events = [s["events"] / s["seconds"] for s in sweeps]
        latencies = [x for s in sweeps for x in s["latencies"]]
        rows.append(
            {
                "case": "fhir post",
                "variant": f"{connections} connections",
                "items_per_s": h.percentile(rates, 50),
                "items_per_s_min": min(rates),
                "items_per_s_max": max(rates),
                "events_per_s": round(h.percentile(events, 50), 1),
                **{k: v for k, v in h.latency_summary(latencies).items() if k != "mean_ms"},
                "cpu_cores": round(cores, 3),
                "note": "Bundles/s into Kafka via POST /fhir, each answered 200 after acks=all",
            }
        )
    finally:
        TokenStore(cfg).revoke(name)
        kafka.delete_topics(cfg)
    return rows


def closed_loop(url: str, token: str, bundles: list[tuple[bytes, int]], connections: int) -> dict:
    """Post ``bundles`` over ``connections`` clients back to back; every answer must be 200."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    shares = [[b for b, _ in bundles[i::connections]] for i in range(connections)]
    latencies: list[list[float]] = [[] for _ in shares]
    failures: list[str] = []

    def send(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            for body in shares[k]:
                started = time.perf_counter()
                answer = client.post("/fhir", content=body)
                latencies[k].append(time.perf_counter() - started)
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code}")
                    return

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(shares))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} Bundle(s) not taken: status {failures[0]}")
    return {
        "bundles": len(bundles),
        "events": sum(n for _, n in bundles),
        "seconds": seconds,
        "latencies": [x for share in latencies for x in share],
    }


class PinnedApi(h.PinnedProcess):
    """The API under uvicorn pinned to ``core`` (``serve_pinned``); ``url`` its address."""

    def __init__(self, settings: Settings, core: int):
        super().__init__("benchmarks.bench_fhir", settings, core)

    def __enter__(self) -> PinnedApi:
        super().__enter__()
        self.url = self.first_line
        return self


def serve_pinned(core: int) -> None:
    """The API's side of ``PinnedApi``: serves until its stdin closes."""
    import uvicorn

    from m3t.services.process import free_ports
    from stream.api import create_app

    os.sched_setaffinity(0, {core})  # before librdkafka's threads exist: they inherit it
    settings = Settings.model_validate_json(sys.stdin.readline())
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    print(f"http://127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    server.should_exit = True
    thread.join(30)


def run(settings: Settings, *, quick: bool = False) -> h.Result:
    services.up(settings, ["kafka", "redis"])
    params = dict(bundles=300, connections=4, repeats=1) if quick else {}
    result = h.Result("fhir", {**params, "acks": "all"})
    started = time.perf_counter()
    result.rows = fhir_rows(settings, **params)
    result.seconds = time.perf_counter() - started
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve_pinned(int(sys.argv[2]))
        sys.exit(0)
    outcome = run(Settings(), quick="--quick" in sys.argv)
    print(h.markdown(outcome))
