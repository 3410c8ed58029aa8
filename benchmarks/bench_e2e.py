"""End to end: an offered-load sweep through the stream worker, event to score.

Stream workers (``stream.worker.StreamWorker``, 1 or more, one consumer group) run in their
own processes on topics made for this run. The load generator sends events open loop
(``harness.drive``; encoded beforehand, so the generator keeps its schedule). Two workloads:

- ``new admissions``, the worst case: every event admits a new patient, so every event
  costs a model pass and a score of its own.
- ``census``, a ward at steady state: ``census`` open admissions (admitted before the
  levels) and a stream of lab and vital results spread over them at random, as a hospital
  sends them. Events of one admission that arrive together are folded and scored once.

Every event carries its send time as its event time, and a score carries the time of the
newest event its features include, so an observer thread reading the scores topic
completes each event when a score of its admission includes it. Latency runs from the
event's scheduled send time to that score's arrival: queueing anywhere (producer, broker,
worker, Triton, Redis) counts. Events not scored within ``drain_s`` of the end of a level
count as not completed; the next level waits until the workers have caught up.

The workers score M3T-LM as `m3t stream run` does (``stream.scoring.build_scoring``: the
online feature store, scored by the cached encoders and fusion head on Triton), so a feature
set must be published and the models loaded (`make demo`). ``run(pipeline=...)`` gives the
workers other pieces (the tests' walking skeleton, which needs no trained model); the result
records which.

Each level also records where the time went: by process, the CPU cores each used while the
events were sent and how often its threads were woken per event (``/proc``); by stage, the
workers' own sums (``stream.metrics.StageTimes``: Kafka timestamp to poll, feature write per
poll, and per scoring batch the read, the model and the score writes). ``schedulers`` runs
the sweep once per scheduler setting, side by side (``SCHEDULERS``: the settings' own, and
the fill wait and fetch settings of before #19); ``benchmarks.scaling`` turns the result
into events/s per core and a sizing table.

``explanations=(False, True)`` runs the sweep with ``stream.explanations`` off, then on (each
score's data freshness, and its reasons computed after it is written by ``m3t_explain``),
through the same services in the same run, and compares the two level by level; with them
on, each row also gives how long a score's reasons came after it (``reasons_p50_ms``,
``reasons_p99_ms``, over the ``reasons_n`` scores given reasons: a score superseded before
it was explained never gets its own).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
from pydantic import SecretStr

from benchmarks import harness as h
from ingest import events as ev
from ingest.itemids import LABS, VITALS
from m3t import kafka, services
from m3t.credentials import login, triton_admin_key
from m3t.services.process import free_ports, wait_until
from m3t.settings import Settings

M3T = "features.online.OnlineStore + CachedEncoderScorer (M3T-LM encoders + fusion on Triton)"
FIRST_HADM = 95_000_000
# Events/s and seconds of load before the recorded sweeps: a broker just started spends its
# first tens of seconds under load compiling, and its latency then is not the stream's.
WARMUP = (2000.0, 30.0)
SWEEP_HADMS = 1_000_000  # admissions a sweep may number (a full sweep makes ~200,000)
NEW_ADMISSIONS, CENSUS, HOSTILE = "new admissions", "census", "census + 1% hostile"
SINGLE_NODE, CLUSTERS = "single node", "clusters"
HOSTILE_EVERY = 100  # one hostile event sent after every 100th valid one
CURRENT, FILL_WAIT = "scheduler: settings", "scheduler: fill wait 20 ms, fetch 5 ms/1 MB"
QUEUE_DELAY = "scheduler: settings, Triton queue delay 0.5 ms"
SOURCE_LINGER = "scheduler: settings, source linger 5 ms"
WORKER_LINGER = "scheduler: settings, worker linger 0 ms"
BEFORE = "scheduler: settings, Triton queue delay 0.5 ms, source linger 5 ms"
FETCH_BEFORE = "scheduler: settings, fetch 5 ms/1 MB"
FETCH_SHORT = "scheduler: settings, fetch 2 ms/4 KB"
FETCH_SHORTER = "scheduler: settings, fetch 1 ms/4 KB"
FETCH_AHEAD = "scheduler: settings, fetching ahead"
# librdkafka's default, and the worker's before #19: fetching while events it has not taken
# wait in its local queue.
FETCHING_AHEAD = {"consumer_options": {"queued.min.messages": 100_000}}
# The load generator produces as the project's live feed does (ingest/mllp.py: linger 1 ms).
SOURCE_LINGER_MS = 1
# Overrides per scheduler: of the settings ("stream", "kafka"), of the scoring models'
# dynamic batching in Triton ("triton"), of the load generator ("source"), of the workers'
# Kafka clients ("worker", ``stream.wiring.connect``'s options). FILL_WAIT is the
# worker as it was before #19: a batch waited up to 20 ms to fill while events kept coming,
# and a fetch waited 5 ms for 1 MB. QUEUE_DELAY is Triton as published before #19 (a request
# waited 0.5 ms for company); SOURCE_LINGER a source batching as librdkafka's default does;
# FETCH_SHORT and FETCH_SHORTER fetches that wait a little for a few events (fewer fetches
# under load, but a fetch every 1-2 ms when idle); FETCH_AHEAD a worker fetching ahead.
SCHEDULERS = {
    CURRENT: {},
    FILL_WAIT: {
        "stream": {"max_wait_ms": 20},
        "kafka": {"fetch_wait_max_ms": 5, "fetch_min_bytes": 1_000_000},
        "worker": FETCHING_AHEAD,
    },
    QUEUE_DELAY: {"triton": {"max_queue_delay_microseconds": 500}},
    SOURCE_LINGER: {"source": {"linger_ms": 5}},
    WORKER_LINGER: {"worker": {"linger_ms": 0}},
    BEFORE: {"triton": {"max_queue_delay_microseconds": 500}, "source": {"linger_ms": 5}},
    FETCH_BEFORE: {"kafka": {"fetch_wait_max_ms": 5, "fetch_min_bytes": 1_000_000}},
    FETCH_SHORT: {"kafka": {"fetch_wait_max_ms": 2, "fetch_min_bytes": 4096}},
    FETCH_SHORTER: {"kafka": {"fetch_wait_max_ms": 1, "fetch_min_bytes": 4096}},
    FETCH_AHEAD: {"worker": FETCHING_AHEAD},
}
# The models a worker's scores go through, whose batching a "triton" override changes.
SCORING_MODELS = ("m3t_enc_notes", "m3t_enc_cxr", "m3t_rescore", "m3t_explain")
# A worker publishes its metrics (stage times included) about every second.
METRICS_FLUSH_S = 1.2


def m3t_deployed(settings: Settings, explanations: bool = False) -> bool:
    """Whether a feature set is published and the M3T-LM models are loaded."""
    from features.online import OnlineStore
    from m3t.clients import redis_client, triton_client

    try:
        OnlineStore.current(redis_client(settings))
        client = triton_client(settings)
        names = ("enc_notes", "enc_cxr", "rescore") + (("explain",) if explanations else ())
        return all(client.is_model_ready(f"m3t_{name}") for name in names)
    except Exception:  # nothing published, or a model not loaded
        return False


def m3t_pipeline(settings: Settings):
    """(features, scorer, scores) for a worker, as `m3t stream run` builds them."""
    from m3t.clients import redis_client
    from stream.scores import ScoreStore
    from stream.scoring import build_scoring

    client = redis_client(settings)
    return (*build_scoring(settings, client, "cached"), ScoreStore(client))


def serve(settings: Settings, stop, pipeline, options=None) -> None:
    """The worker process, its pieces from ``pipeline(settings)``: consume until ``stop`` is
    set (``options``: ``stream.wiring.connect``'s)."""
    from stream.wiring import connect

    features, scorer, scores = pipeline(settings)
    connect(settings, features, scorer, scores, **(options or {})).run(stop=stop)


def scheduled(settings: Settings, scheduler: str, max_batch: int, max_wait_ms: int | None):
    """``settings`` with ``scheduler``'s overrides (``SCHEDULERS``), ``max_batch`` and, where
    given, ``max_wait_ms``."""
    overrides = SCHEDULERS[scheduler]
    stream = {"max_batch": max_batch, **overrides.get("stream", {})}
    if max_wait_ms is not None:
        stream["max_wait_ms"] = max_wait_ms
    return settings.model_copy(
        update={
            "stream": settings.stream.model_copy(update=stream),
            "kafka": settings.kafka.model_copy(update=overrides.get("kafka", {})),
        }
    )


def service_pids(settings: Settings, name: str) -> list[int]:
    """The processes of service ``name``: each node's, for a cluster."""
    (service,) = services.select(settings, [name])
    return service.pids()


def stage_totals(settings: Settings, pids: list[int]) -> dict[str, dict]:
    """The workers' stage sums (``StageTimes``), added over the workers with these pids."""
    from m3t.clients import redis_client
    from stream.metrics import METRICS_KEY, STAGES

    client = redis_client(settings, role="admin")
    try:
        names = [f"{socket.gethostname()}-{pid}" for pid in pids]
        snapshots = [json.loads(v) for v in client.hmget(METRICS_KEY, names) if v]
    finally:
        client.close()
    return {
        name: {
            key: sum(snap.get("stages", {}).get(name, {}).get(key, 0) for snap in snapshots)
            for key in ("seconds", "count", "items")
        }
        for name in STAGES
    }


def stage_summary(before: dict, after: dict) -> dict:
    """Where a level's time went in the workers: ms per event from Kafka's timestamp to the
    poll, ms per poll applying its events, and per scoring batch the read, the model and
    the score writes; with events per poll and admissions per batch."""

    def delta(name):  # a stage the sums lack (explain, before #20) ran no time
        zero = {"seconds": 0, "count": 0, "items": 0}
        a, b = after.get(name, zero), before.get(name, zero)
        return {k: a[k] - b[k] for k in ("seconds", "count", "items")}

    def per(value, n):
        return round(value / n, 4) if n else None

    consume, apply = delta("consume"), delta("apply")
    out = {
        "produce -> consume ms/event": per(1000 * consume["seconds"], consume["items"]),
        "feature write ms/poll": per(1000 * apply["seconds"], apply["count"]),
        "events/poll": per(apply["items"], apply["count"]),
    }
    for name, label in (
        ("read", "read"),
        ("model", "model"),
        ("explain", "explanations"),
        ("write", "score write"),
    ):
        d = delta(name)
        out[f"{label} ms/batch"] = per(1000 * d["seconds"], d["count"])
    out["admissions/batch"] = per(delta("read")["items"], delta("read")["count"])
    return out


def admission(hadm_id: int, when: datetime | None = None) -> bytes:
    """An admission event; its id names its time too, so that an admission a killed run left
    in Redis takes it as news (and is scored) rather than as a conflicting resend."""
    when = when or datetime.now(UTC)
    event = ev.AdmissionEvent(
        event_id=ev.event_id("bench/e2e", f"{hadm_id}/{when.timestamp():.6f}"),
        hadm_id=hadm_id,
        subject_id=hadm_id,
        event_time=when,
        source="bench/e2e",
        payload=ev.AdmissionPayload(
            admittime=when, admission_type="EW EMER.", gender="F", age=60.0
        ),
    )
    return ev.encode(event)


def observation(hadm_id: int, when: datetime, rng: random.Random) -> bytes:
    """A lab or vital result within its item's plausible range."""
    item = rng.choice(LABS + VITALS)
    event = ev.ObservationEvent(
        event_id=ev.event_id("bench/e2e", f"{hadm_id}/{when.timestamp():.6f}/{item.itemid}"),
        hadm_id=hadm_id,
        subject_id=hadm_id,
        event_time=when,
        source="bench/e2e",
        payload=ev.ObservationPayload(
            itemid=item.itemid,
            value=round(rng.uniform(item.low, item.high), 2),
            unit=item.unit,
            charttime=when,
            kind=item.kind,
        ),
    )
    return ev.encode(event)


def hostile_events(hadm_id: int) -> list[bytes]:
    """Events the worker must dead-letter, for admission ``hadm_id`` (admitted now)."""
    valid = json.loads(observation(hadm_id, datetime.now(UTC), random.Random(0)))
    before = json.loads(
        observation(hadm_id, datetime.now(UTC) - timedelta(days=3), random.Random(1))
    )
    payload = valid["payload"]
    return [
        b'{"schema_version": 1, "event_id": ',  # malformed
        b"[" * 2000 + b"]" * 2000,
        json.dumps({**valid, "payload": {**payload, "value": "__inf__"}})
        .replace('"__inf__"', "Infinity")
        .encode(),
        json.dumps({**valid, "schema_version": 99}).encode(),
        json.dumps({**valid, "source": "__s__"}).replace("__s__", "\\ud800").encode(),
        json.dumps({**valid, "hadm_id": 2**63}).encode(),
        json.dumps(before).encode(),
    ]


class ScoreObserver:
    """Reads the scores topic; completes each waiting event that a score of its admission
    includes (its event time at or before the score's feature time)."""

    # Feature times pass through epoch hours (float64) on their way: well under a microsecond
    # off. Events of one admission are at least one schedule step (100 us at 10,000/s) apart.
    slack_s = 5e-6

    def __init__(self, settings: Settings):
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        topic = settings.kafka.topic_scores
        self.consumer = kafka.consumer(
            settings,
            role="reader",
            group_id=kafka.reader_group(settings, f"bench-observer-{uuid.uuid4().hex[:8]}"),
            client_id="m3t-bench",
        )
        partitions = kafka.partitions(self.consumer, topic)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        # hadm_id -> (event time (epoch s), run, event index), oldest first
        self.waiting: dict[int, deque[tuple[float, h.LoadRun, int]]] = defaultdict(deque)
        self.scored: set[int] = set()
        # Scores published with their reasons pending: (hadm_id, feature time) -> arrival;
        # and the time from that arrival to the same score's arrival with its reasons.
        self.pending_reasons: dict[tuple[int, float], float] = {}
        self.reason_lags_s: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def expect(self, hadm_id: int, event_time_s: float, run: h.LoadRun, index: int) -> None:
        """Call in event-time order per admission (as its events are sent)."""
        with self._lock:
            self.waiting[hadm_id].append((event_time_s, run, index))

    def forget(self) -> None:
        """Stop waiting for the events not scored in time (they count as not completed)."""
        with self._lock:
            self.waiting.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            messages = kafka.poll_batch(self.consumer, 1001, 0.05)
            now = time.perf_counter()
            for message in messages:
                self._complete(json.loads(message.value()), now)

    def take_reason_lags(self) -> dict:
        """p50/p99 ms from a score's arrival to its reasons', over the scores given reasons
        since the last call (none: explanations off)."""
        with self._lock:
            lags, self.reason_lags_s = self.reason_lags_s, []
            self.pending_reasons.clear()
        if not lags:
            return {}
        p50, p99 = np.percentile(np.asarray(lags) * 1000, [50, 99])
        return {"reasons_n": len(lags), "reasons_p50_ms": p50, "reasons_p99_ms": p99}

    def _complete(self, score: dict, when: float) -> None:
        with self._lock:
            hadm_id = int(score["hadm_id"])
            key = (hadm_id, score["feature_time"])
            if "freshness" in score and score.get("freshness") is not None:
                if score.get("reasons") is None:
                    self.pending_reasons[key] = when
                elif key in self.pending_reasons:
                    self.reason_lags_s.append(when - self.pending_reasons.pop(key))
            self.scored.add(hadm_id)
            queue = self.waiting.get(hadm_id)
            while queue and queue[0][0] <= score["feature_time"] + self.slack_s:
                _, run, index = queue.popleft()
                run.complete(index, when)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def run(
    settings: Settings,
    *,
    rates: tuple[float, ...] = (100, 500, 2000),
    seconds: float = 5.0,
    drain_s: float = 10.0,
    workers: tuple[int, ...] = (1,),
    workloads: tuple[str, ...] = (NEW_ADMISSIONS, CENSUS, HOSTILE),
    census: int = 1000,
    max_batch: int = 256,
    max_wait_ms: int | None = None,
    ready_timeout_s: float = 90.0,
    seed: int = 0,
    held: tuple[float, float] | None = None,
    warmup: tuple[float, float] | None = WARMUP,
    pipeline=None,
    kafka_security: tuple[str, ...] | None = None,
    explanations: tuple[bool, ...] = (False,),
    schedulers: tuple[str, ...] = (CURRENT,),
    deployments: tuple[str, ...] = (SINGLE_NODE,),
) -> h.Result:
    """For each worker count and workload, each offered ``rate`` for ``seconds``; then, with
    ``held`` = (rate, seconds), that rate held longer (queues near saturation, and stalls
    such as Redis's append-only-file rewrites, show in p99 only over longer runs).

    ``warmup`` = (rate, seconds): a census at that rate, not recorded, before the sweeps
    on each deployment and protocol (a broker just started spends its first tens of
    seconds of load compiling); None: none.

    ``pipeline(settings)`` -> (features, scorer, scores) builds each worker's pieces in its
    own process (a module-level function: it is pickled by name); by default M3T-LM's
    (``m3t_pipeline``), which fails fast unless it is deployed.

    ``kafka_security``: the Kafka security protocols to run the sweep through, in turn
    (default: the settings' own). A protocol other than the settings' runs on a second
    local broker started for it (``kafka_twin``), beside the first in the same run: the
    cost of SCRAM over TLS against loopback plaintext.

    ``schedulers``: the ``SCHEDULERS`` to run the sweep under, in turn (``max_wait_ms``,
    where given, overrides theirs).

    ``deployments``: where the sweeps above run, in turn: the settings' own services
    (``SINGLE_NODE``) or the local clusters (``CLUSTERS``: 3 Kafka nodes, a Redis Cluster of
    3 primaries with a replica each), started for it with the feature set published there
    and stopped after; name one more than once to have it before and after another.

    ``explanations``: ``stream.explanations`` for the sweeps above (the first value), then
    for each further value one more sweep, with the first protocol, scheduler and worker
    count, on the settings' own services."""
    unknown_schedulers = set(schedulers) - set(SCHEDULERS)
    if unknown_schedulers:
        raise ValueError(f"unknown scheduler(s) {sorted(unknown_schedulers)}: {list(SCHEDULERS)}")
    if set(deployments) - {SINGLE_NODE, CLUSTERS}:
        raise ValueError(f"deployments are {SINGLE_NODE!r} or {CLUSTERS!r}, not {deployments}")
    unknown = set(workloads) - {NEW_ADMISSIONS, CENSUS, HOSTILE}
    if unknown:
        raise ValueError(
            f"unknown workload(s) {sorted(unknown)}: choose from "
            f"{NEW_ADMISSIONS!r}, {CENSUS!r}, {HOSTILE!r}"
        )
    services.up(settings)
    explained = (
        {"stream": settings.stream.model_copy(update={"explanations": explanations[0]})}
        if explanations[0] != settings.stream.explanations
        else {}
    )
    settings = settings.model_copy(update=explained)
    if pipeline is None and not m3t_deployed(settings, any(explanations)):
        raise RuntimeError(
            "M3T-LM is not deployed: publish a feature set and load the models first (`make demo`)"
        )
    pipeline = pipeline or m3t_pipeline
    described = (
        M3T if pipeline is m3t_pipeline else f"{pipeline.__module__}.{pipeline.__qualname__}"
    )
    result = h.Result(
        "e2e",
        {
            "rates": list(rates),
            "seconds": seconds,
            "drain_s": drain_s,
            "workers": list(workers),
            "workloads": list(workloads),
            "census": census,
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "schedulers": {name: SCHEDULERS[name] for name in schedulers},
            "pipeline": described,
            "seed": seed,
            "held": list(held) if held else None,
            "warmup": list(warmup) if warmup else None,
            "kafka_security": list(kafka_security or (settings.kafka.security_protocol,)),
            "explanations": list(explanations),
            "deployments": list(deployments),
            "load_generator": f"confluent-kafka, linger {SOURCE_LINGER_MS} ms (as ingest/mllp.py)"
            "; new admissions: "
            "one admission event per new admission; census: lab and vital results for open "
            "admissions chosen uniformly at random; census + 1% hostile: the same, and after "
            "every 100th result one hostile event (malformed, nested too deep, non-finite, "
            "an unknown schema version, a lone surrogate, an id over int64, dated before its "
            "admission), each a dead letter",
        },
    )
    sweep = functools.partial(
        _sweep,
        rates=rates,
        seconds=seconds,
        drain_s=drain_s,
        workloads=workloads,
        census=census,
        ready_timeout_s=ready_timeout_s,
        pipeline=pipeline,
        seed=seed,
        held=held,
    )
    started = time.perf_counter()
    protocols = kafka_security or (settings.kafka.security_protocol,)
    sweeps = 0  # each numbers its admissions from its own million

    def swept(target, home, scheduler: str, n: int, **levels):
        nonlocal sweeps
        overrides = SCHEDULERS[scheduler]
        with h.triton_batching(target, overrides.get("triton", {}), SCORING_MODELS):
            runs = sweep(
                scheduled(target, scheduler, max_batch, max_wait_ms),
                home,
                n,
                first_hadm=FIRST_HADM + SWEEP_HADMS * sweeps,
                worker_options=overrides.get("worker"),
                **overrides.get("source", {}),
                **levels,
            )
        sweeps += 1
        return runs

    for run_number, deployment in enumerate(deployments, 1):
        placed = f", {deployment} (run {run_number})" if len(deployments) > 1 else ""
        with _deployed(settings, deployment) as home:
            for protocol in protocols:
                label = placed + (f", Kafka {protocol}" if len(protocols) > 1 else "")
                with _speaking(home, protocol) as target:
                    if warmup:
                        rate, warm_s = warmup
                        swept(
                            target,
                            home,
                            schedulers[0],
                            max(workers),
                            rates=(rate,),
                            seconds=warm_s,
                            workloads=(CENSUS,),
                            held=None,
                        )
                    for scheduler in schedulers:
                        label_s = f"{label}, {scheduler}" if len(schedulers) > 1 else label
                        for n in workers:
                            runs = swept(target, home, scheduler, n)
                            variant = f"{n} worker{'s' if n > 1 else ''}{label_s}"
                            result.rows += [_row(variant, seconds, census, *run) for run in runs]
    for explain in explanations[1:]:
        on = settings.model_copy(
            update={"stream": settings.stream.model_copy(update={"explanations": explain})}
        )
        with _speaking(on, protocols[0]) as target:
            runs = swept(target, on, schedulers[0], workers[0])
        variant = f"{workers[0]} worker{'s' if workers[0] > 1 else ''}"
        variant += f", Kafka {protocols[0]}" if len(protocols) > 1 else ""
        variant += f", {schedulers[0]}" if len(schedulers) > 1 else ""
        label = f"{variant}, explanations {'on' if explain else 'off'}"
        result.rows += [_row(label, seconds, census, *run) for run in runs]
        result.comparisons += _explanation_ratios(result.rows, variant, label)
    if len(protocols) > 1:
        result.comparisons += _protocol_ratios(result.rows, protocols)
    if len(deployments) > 1:
        result.comparisons += _deployment_ratios(result.rows, deployments)
    if len(schedulers) > 1:
        result.comparisons += _scheduler_ratios(result.rows, schedulers)
    first = next((r for r in result.rows if "p50_ms" in r), None)
    if first is not None:
        result.breakdown_ms["end to end (event -> score)"] = first["p50_ms"]
    result.seconds = time.perf_counter() - started
    return result


def _row(
    variant: str,
    seconds: float,
    census: int,
    workload,
    level_s,
    run_,
    cores,
    wake_ups,
    stages,
    reasons,
) -> dict:
    """One level of a sweep, as a result row (``reasons``: how long scores waited for their
    reasons, with explanations on)."""
    case = "event -> score" + (
        ", new admissions" if workload == NEW_ADMISSIONS else f", census {census:,}"
    )
    if workload == HOSTILE:
        case += " + 1% hostile"
    if level_s != seconds:
        case += f", held {level_s:g} s"
    return {
        "case": case,
        "variant": variant,
        **run_.summary(),
        "cpu_cores": round(sum(cores.values()), 2),
        "cpu_cores_by_process": cores,
        "wake_ups_per_event": round(sum(wake_ups.values()), 1),
        "wake_ups_per_event_by_process": wake_ups,
        "stages": stages,
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in reasons.items()},
        **({"hostile_sent": len(run_.scheduled) // HOSTILE_EVERY} if workload == HOSTILE else {}),
    }


@contextmanager
def _deployed(settings: Settings, deployment: str):
    """The settings of ``deployment``; the clusters are started, given the feature set and
    stopped after."""
    if deployment == SINGLE_NODE:
        yield settings
        return
    home = on_clusters(settings)
    services.up(home, ["redis", "kafka"])
    try:
        carry_feature_set(settings, home)
        yield home
    finally:
        services.down(home, ["kafka", "redis"])


@contextmanager
def _speaking(settings: Settings, protocol: str):
    """The settings whose Kafka speaks ``protocol``: a twin broker, started and stopped
    after, where the settings' own speaks another."""
    if protocol == settings.kafka.security_protocol:
        yield settings
        return
    twin = kafka_twin(settings, protocol)
    services.up(twin, ["kafka"])
    try:
        yield twin
    finally:
        services.down(twin, ["kafka"])


def on_clusters(settings: Settings) -> Settings:
    """The same settings on the local clusters (`m3t services up --cluster`)."""
    return settings.model_copy(
        update={
            "cluster": True,
            "kafka": settings.kafka.model_copy(update={"cluster": True}),
            "redis": settings.redis.model_copy(update={"cluster": True}),
        }
    )


def carry_feature_set(settings: Settings, other: Settings) -> None:
    """Publish the feature set current on ``settings``' Redis (if one is) to ``other``'s, so
    that its workers write and read under the same namespace."""
    from features.online import OnlineStore
    from m3t.clients import redis_client

    try:
        current = OnlineStore.current(redis_client(settings, role="admin"))
    except LookupError:  # nothing published: a pipeline of its own features (the tests')
        return
    OnlineStore(redis_client(other, role="admin"), current.fitted).publish()


def kafka_twin(settings: Settings, protocol: str) -> Settings:
    """Settings for a second local broker speaking ``protocol``, on free ports and in a state
    folder of its own; Redis's and Triton's credentials are carried over as configured
    values, since generated ones are read from the state folder."""
    ports = free_ports(2, settings.kafka.host)
    carried = {
        f"{role}password": SecretStr(login(settings, "redis", r)[1])
        for role, r in (("", "stream"), ("reader_", "reader"), ("admin_", "admin"))
    }
    return settings.model_copy(
        update={
            "state_dir": settings.state_dir / f"bench-kafka-{protocol.lower()}",
            "kafka": settings.kafka.model_copy(
                update={
                    "security_protocol": protocol,
                    "port": ports[0],
                    "controller_port": ports[1],
                }
            ),
            "redis": settings.redis.model_copy(update=carried),
            "triton": settings.triton.model_copy(
                update={"admin_key": SecretStr(triton_admin_key(settings))}
            ),
        }
    )


def _level_ratios(rows: list[dict], pairs, measures: dict[str, str]) -> list[dict]:
    """Level by level (case and rate), the ratio of each of ``measures`` (label -> row
    field) between a row and each other variant ``pairs(variant)`` names, as (other
    variant, numerator label, denominator label)."""
    by_key = {(r["case"], r.get("offered_per_s"), r["variant"]): r for r in rows if "p50_ms" in r}
    ratios = []
    for (case, rate, variant), row in by_key.items():
        for other_variant, numerator, denominator in pairs(variant):
            other = by_key.get((case, rate, other_variant))
            if other is None:
                continue
            name = f"{case} at {rate:g}/s"
            ratios += [
                h.ratio(f"{label} {name}", numerator, denominator, row[field], other[field])
                for label, field in measures.items()
            ]
    return ratios


def _explanation_ratios(rows: list[dict], off: str, on: str) -> list[dict]:
    """Explanations on over off, level by level: p50 event-to-score and events/s achieved."""
    return _level_ratios(
        rows,
        lambda variant: [(off, on, off)] if variant == on else [],
        {"p50": "p50_ms", "achieved/s": "achieved_per_s"},
    )


def _scheduler_ratios(rows: list[dict], schedulers) -> list[dict]:
    """The first scheduler over each other, case by case: p50 event-to-score and cores."""
    first = schedulers[0]

    def pairs(variant: str):
        if not variant.endswith(f", {first}"):
            return []
        return [(variant[: -len(first)] + other, first, other) for other in schedulers[1:]]

    return _level_ratios(rows, pairs, {"p50": "p50_ms", "cores": "cpu_cores"})


def _deployment_ratios(rows: list[dict], deployments) -> list[dict]:
    """Each clusters run over each single-node run, case by case: p50 and p99 event to
    score, and events/s achieved."""
    runs = [f", {d} (run {i})" for i, d in enumerate(deployments, 1)]
    singles = [run for run in runs if SINGLE_NODE in run]

    def pairs(variant: str):
        ran = next((run for run in runs if CLUSTERS in run and run in variant), None)
        if ran is None:
            return []
        return [(variant.replace(ran, single), ran[2:], single[2:]) for single in singles]

    return _level_ratios(
        rows, pairs, {"p50": "p50_ms", "p99": "p99_ms", "achieved/s": "achieved_per_s"}
    )


def _protocol_ratios(rows: list[dict], protocols) -> list[dict]:
    """p50 event-to-score through the first protocol over the second, case by case."""
    first, second = protocols[0], protocols[1]

    def pairs(variant: str):
        if not variant.endswith(f", Kafka {first}"):
            return []
        return [(variant.replace(first, second), first, second)]

    return _level_ratios(rows, pairs, {"p50": "p50_ms"})


def _sweep(
    settings,
    base,
    n_workers,
    rates,
    seconds,
    drain_s,
    workloads,
    census,
    ready_timeout_s,
    pipeline,
    seed,
    held=None,
    first_hadm=FIRST_HADM,
    linger_ms=SOURCE_LINGER_MS,
    worker_options=None,
):
    """``n_workers`` worker processes in one group on fresh topics; (workload, level
    seconds, LoadRun, CPU cores by process while sending, stage times) per workload and
    level. Admissions
    are numbered from ``first_hadm``, so that sweeps in one run never share one."""
    cfg = kafka.own_topics(settings, "bench-")
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    workers = [
        context.Process(target=serve, args=(cfg, stop, pipeline, worker_options), daemon=True)
        for _ in range(n_workers)
    ]
    for worker in workers:
        worker.start()
    # The linger is in the measured latency, which starts at an event's scheduled send time.
    producer = kafka.producer(
        cfg,
        role="producer",
        client_id="m3t-bench",
        **{"linger.ms": linger_ms, "enable.idempotence": False},
    )
    observer = ScoreObserver(cfg)
    # Every process on this machine the load goes through: the load generator and the
    # observer are this process (its worker children counted apart).
    meter = h.CpuMeter(
        {
            "workers": [w.pid for w in workers],
            "load generator + observer": [os.getpid()],
            **{
                name: service_pids(settings if name == "kafka" else base, name)
                for name in services.SERVICES
            },
        }
    )
    pids = [w.pid for w in workers]
    rng = random.Random(seed)
    next_hadm, runs = first_hadm, []
    try:
        next_hadm = _wait_until_scoring(
            cfg, producer, observer, workers, next_hadm, ready_timeout_s
        )
        for workload in workloads:
            if workload in (CENSUS, HOSTILE):
                ward = list(range(next_hadm, next_hadm + census))
                next_hadm += census
                _admit(cfg, producer, observer, ward, ready_timeout_s)
            levels = [(rate, seconds) for rate in rates] + ([held] if held else [])
            for rate, level_s in levels:
                if workload in (CENSUS, HOSTILE):
                    run_, cores, wake_ups, stages = _level(
                        cfg,
                        producer,
                        observer,
                        meter,
                        pids,
                        rate,
                        level_s,
                        drain_s,
                        lambda i: ward[rng.randrange(len(ward))],
                        lambda h_, when: observation(h_, when, rng),
                        hostile=hostile_events(ward[0]) if workload == HOSTILE else None,
                    )
                else:
                    first = next_hadm
                    run_, cores, wake_ups, stages = _level(
                        cfg,
                        producer,
                        observer,
                        meter,
                        pids,
                        rate,
                        level_s,
                        drain_s,
                        lambda i: first + i,
                        admission,
                    )
                    next_hadm += len(run_.scheduled)
                    # A hospital's Redis holds its census, not the 10^5 admissions a few levels
                    # create: left there, they made each append-only-file rewrite that came
                    # in a later level fork a child writing a few hundred MB (10 s of a core).
                    _cleanup(cfg, range(first, next_hadm))
                # Reasons of this level's scores that came during the drain count too.
                reasons = observer.take_reason_lags()
                runs.append((workload, level_s, run_, cores, wake_ups, stages, reasons))
    finally:
        stop.set()
        observer.close()
        producer.flush(5)
        for worker in workers:
            worker.join(timeout=20)
            if worker.is_alive():
                worker.terminate()
        _cleanup(cfg, range(first_hadm, next_hadm))
    return runs


def _admit(cfg, producer, observer, ward: list[int], timeout_s: float) -> None:
    """Admit the census and wait until every admission has its first score."""
    for hadm_id in ward:
        _send(producer, cfg, hadm_id)
    producer.flush(timeout_s)
    if not wait_until(lambda: observer.scored.issuperset(ward), timeout_s, 0.05):
        raise TimeoutError(
            f"{len(set(ward) - observer.scored)} of the {len(ward)} census admissions "
            f"were not scored within {timeout_s:.0f} s"
        )


def _send(producer, cfg: Settings, hadm_id: int, value: bytes | None = None) -> None:
    kafka.produce(
        producer, cfg.kafka.topic_events, value or admission(hadm_id), str(hadm_id).encode()
    )
    producer.poll(0)


def _wait_until_scoring(cfg, producer, observer, workers, hadm_id: int, timeout_s: float) -> int:
    """Send one event a second until every worker has joined the group and one event is
    scored: the workers are assigned their partitions and warmed up."""
    deadline = time.monotonic() + timeout_s
    first = hadm_id
    while time.monotonic() < deadline:
        dead = [w.exitcode for w in workers if not w.is_alive()]
        if dead:
            raise RuntimeError(f"a stream worker exited with code {dead[0]} before scoring")
        _send(producer, cfg, hadm_id)
        producer.flush(5)
        hadm_id += 1
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if observer.scored & set(range(first, hadm_id)) and kafka.group_members(
                cfg, cfg.kafka.consumer_group
            ) == len(workers):
                return hadm_id
            time.sleep(0.1)
    raise TimeoutError(
        f"no score within {timeout_s:.0f} s of starting the workers (the score observer saw "
        f"{len(observer.scored)} score(s); {_stored_scores(cfg, range(first, hadm_id))} of the "
        f"{hadm_id - first} warm-up admissions have a score in Redis; "
        f"{kafka.group_members(cfg, cfg.kafka.consumer_group)} of {len(workers)} workers "
        "in the group)"
    )


def _stored_scores(cfg: Settings, hadm_ids) -> int:
    from m3t.clients import redis_client
    from stream.scores import SCORE_KEY

    client = redis_client(cfg)
    try:
        return sum(client.exists(SCORE_KEY.format(hadm_id=h)) for h in hadm_ids)
    finally:
        client.close()


def _level(
    cfg,
    producer,
    observer,
    meter: h.CpuMeter,
    pids: list[int],
    rate: float,
    seconds: float,
    drain_s: float,
    admission_of,
    encode,
    settle_s: float = 120.0,
    hostile: list[bytes] | None = None,
):
    """One offered rate: event i is for admission ``admission_of(i)``, ``encode(hadm_id,
    when)`` its bytes. Event times are the schedule's, so they increase per admission.
    Returns the run, the CPU cores each process used while the events were sent, the
    wake-ups of each process's threads meanwhile per event sent, and the workers' stage
    times (``stage_summary``).

    The result is the run as it stood ``drain_s`` after the last send. Past saturation the
    workers are still behind then: the next level starts once they have caught up (up to
    ``settle_s``), so it does not inherit this one's backlog. ``hostile``: events sent, in
    turn, after every ``HOSTILE_EVERY``-th one (not scored, so not in the run)."""
    run = h.schedule(rate, seconds)
    start = datetime.now(UTC)
    targets = [admission_of(i) for i in range(len(run.scheduled))]
    encoded = []
    for i, (hadm_id, offset) in enumerate(zip(targets, run.scheduled.tolist())):
        when = start + timedelta(seconds=offset)
        encoded.append(encode(hadm_id, when))
        observer.expect(hadm_id, when.timestamp(), run, i)
    stages_before = stage_totals(cfg, pids)
    woken = meter.wake_ups()
    before, began = meter.sample(), time.perf_counter()

    def send(i: int) -> None:
        _send(producer, cfg, targets[i], encoded[i])
        every = HOSTILE_EVERY
        if hostile and i % every == every - 1:
            _send(producer, cfg, targets[i], hostile[(i // every) % len(hostile)])

    h.drive(run, send, synchronous=False)
    cores = meter.cores(before, meter.sample(), time.perf_counter() - began)
    wake_ups = {
        name: round((count - woken[name]) / len(run.scheduled), 2)
        for name, count in meter.wake_ups().items()
    }
    producer.flush(drain_s)

    def all_scored() -> bool:
        return run.completed == len(run.scheduled)

    wait_until(all_scored, drain_s, 0.05)
    result = replace(run, done=run.done.copy())
    wait_until(all_scored, settle_s, 0.05)
    observer.forget()
    time.sleep(METRICS_FLUSH_S)  # the workers' last stage times published
    return result, cores, wake_ups, stage_summary(stages_before, stage_totals(cfg, pids))


def _cleanup(cfg: Settings, hadm_ids) -> None:
    """Remove what the run wrote to Redis (its admissions' scores, features and embeddings)."""
    from features.online import OnlineStore
    from m3t.clients import redis_client
    from stream import scores as sc
    from stream.scoring import EMB_KEY

    client = redis_client(cfg, role="admin")  # deleting is not the stream's right
    try:
        store = OnlineStore.current(client)
    except LookupError:
        store = None
    try:
        hadm_ids = list(hadm_ids)
        for start in range(0, len(hadm_ids), 1000):
            chunk = hadm_ids[start : start + 1000]
            keys = [
                k.format(hadm_id=x) for x in chunk for k in (sc.SCORE_KEY, sc.HISTORY_KEY, EMB_KEY)
            ]
            if store is not None:
                keys += [key for x in chunk for key in store.all_keys(x)]
            client.unlink(*keys)
            client.zrem(sc.RANKING_KEY, *chunk)
    finally:
        client.close()
