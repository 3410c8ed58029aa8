"""Issue 7: the benchmark harness, and every stage at tiny sizes on the real services."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks import harness as h
from benchmarks.cli import app
from m3t.services.process import wait_until
from m3t.settings import Settings

runner = CliRunner()


# --- the method ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0],
        [42.0],
        [0.5, 0.25],
        np.random.default_rng(7).lognormal(0, 1, 1001).tolist(),
    ],
)
def test_percentile_matches_numpy(values):
    for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
        assert h.percentile(values, q) == pytest.approx(
            np.percentile(values, q), rel=1e-12, abs=1e-12
        )


def test_percentile_rejects_nothing_and_out_of_range():
    with pytest.raises(ValueError):
        h.percentile([], 50)
    with pytest.raises(ValueError):
        h.percentile([1.0], 101)


def test_latency_summary_in_milliseconds():
    seconds = np.random.default_rng(1).exponential(0.01, 500)
    summary = h.latency_summary(seconds.tolist())
    for q in (50, 95, 99):
        assert summary[f"p{q}_ms"] == pytest.approx(np.percentile(seconds * 1000, q))
    assert summary["samples"] == 500


class FakeClock:
    """Virtual time: sleeping and sending advance it, nothing waits."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_open_loop_measures_from_the_scheduled_time():
    # 100 events/s offered (one every 10 ms) to a sender that takes 20 ms: each event waits
    # behind the earlier ones, and that queueing is part of its latency.
    clock = FakeClock()
    sent_at = []

    def slow_send(i):
        sent_at.append(clock.now)
        clock.sleep(0.020)

    run = h.open_loop(100, 0.2, slow_send, clock=clock, sleep=clock.sleep)
    assert len(run.scheduled) == 20
    np.testing.assert_allclose(run.latencies_s, 0.020 + 0.010 * np.arange(20), atol=1e-9)
    assert run.achieved_per_s == pytest.approx(20 / 0.4)
    # Nothing was sent before its time, and a late event went out at once (no catching-up pause).
    np.testing.assert_allclose(np.array(sent_at) - 100.0, 0.020 * np.arange(20), atol=1e-9)


def test_open_loop_keeps_the_schedule_when_the_system_keeps_up():
    clock = FakeClock()
    run = h.open_loop(50, 1.0, lambda i: clock.sleep(0.001), clock=clock, sleep=clock.sleep)
    np.testing.assert_allclose(run.latencies_s, 0.001, atol=1e-9)
    assert run.summary()["p99_ms"] == pytest.approx(1.0)


def test_events_due_closer_than_the_shortest_sleep_go_together_never_early():
    # 10,000 events/s: one due every 0.1 ms, shorter than the shortest sleep.
    clock = FakeClock()
    sleeps, sent_at = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        clock.sleep(seconds)

    run = h.schedule(10_000, 0.1)
    h.drive(run, lambda i: sent_at.append(clock.now), synchronous=False, clock=clock, sleep=sleep)
    late = np.array(sent_at) - run.start - run.scheduled
    assert late.min() >= -1e-12  # none before its time
    assert late.max() <= h.MIN_SLEEP_S + 1e-9
    assert min(sleeps) >= h.MIN_SLEEP_S
    assert len(sleeps) <= 0.1 / h.MIN_SLEEP_S + 1  # one per shortest sleep at most
    # At a ward's rate each event still goes at its time.
    clock, sent_at = FakeClock(), []
    run = h.schedule(200, 0.1)
    h.drive(
        run, lambda i: sent_at.append(clock.now), synchronous=False, clock=clock, sleep=clock.sleep
    )
    np.testing.assert_allclose(np.array(sent_at) - run.start, run.scheduled, atol=1e-9)


def test_asynchronous_completions_count_from_the_schedule():
    clock = FakeClock()
    run = h.schedule(10, 0.5)
    h.drive(run, lambda i: None, synchronous=False, clock=clock, sleep=clock.sleep)
    run.complete(0, run.start + 0.3)  # event 0 (due at 0 s) done at 0.3 s
    run.complete(4, run.start + 0.45)  # event 4 (due at 0.4 s) done at 0.45 s
    assert run.completed == 2
    np.testing.assert_allclose(sorted(run.latencies_s), [0.05, 0.3])
    assert run.summary()["sent"] == 5


def test_measure_reports_median_min_max_after_warmup():
    clock = FakeClock()
    durations = iter([5.0, 1.0, 2.0, 4.0])  # the first is the warm-up and must not count
    result = h.measure(
        lambda: clock.sleep(next(durations)), items=100, warmup=1, repeats=3, clock=clock
    )
    assert result["items_per_s"] == pytest.approx(50.0)
    assert result["items_per_s_min"] == pytest.approx(25.0)
    assert result["items_per_s_max"] == pytest.approx(100.0)


def test_machine_describes_the_host():
    m = h.machine()
    assert m["cores"] >= 1 and m["cpu"] and m["python"]
    # What a 2-ms sleep and its wake-up cost the thread: some CPU, far less than the sleep.
    assert 0 < m["cpu_us_per_wake_up"] < 2000
    assert m["libraries"]["numpy"] == np.__version__
    assert {
        "torch",
        "onnxruntime",
        "nvidia-dali-cuda120",
        "redis",
        "kafka-python",
        "confluent-kafka",
    } <= set(m["libraries"])
    assert m["git_commit"] is None or len(m["git_commit"]) == 40
    assert "gpu" in m and m["date"].endswith("+00:00")


def test_save_writes_json_markdown_and_plots(tmp_path):
    result = h.Result("demo", {"n": 3})
    result.rows += [
        {"case": "x", "variant": "a", "batch": b, **h.measure(lambda: None, b, warmup=0, repeats=3)}
        for b in (1, 8)
    ]
    result.rows.append(
        {"case": "load", "variant": "a", **h.open_loop(1000, 0.01, lambda i: None).summary()}
    )
    result.comparisons.append(h.ratio("items/s", "a", "b", 3.0, 1.5))
    result.missing["c"] = "not installed"
    result.breakdown_ms = {"stage one": 1.5, "stage two": 0.25}
    paths = h.save(result, tmp_path)
    data = assert_valid(paths["latest"], "demo")
    assert data["comparisons"][0]["ratio"] == 2.0
    assert json.loads(paths["json"].read_text()) == data
    assert paths["json"].name.startswith("demo-") and paths["json"].name != "demo-latest.json"
    markdown = paths["markdown"].read_text()
    assert "| case | variant | batch |" in markdown and "not installed" in markdown
    for kind in ("throughput", "latency", "breakdown"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert h.load(paths["latest"]).rows == data["rows"]


def assert_valid(path, stage: str) -> dict:
    """The result file holds what every result must: stage, machine, parameters, rows."""
    data = json.loads(path.read_text())
    assert data["stage"] == stage and data["schema_version"] == h.SCHEMA_VERSION
    assert {
        "cpu",
        "cores",
        "memory_gib",
        "gpu",
        "python",
        "libraries",
        "git_commit",
        "date",
    } <= set(data["machine"])
    assert isinstance(data["params"], dict) and data["rows"]
    for row in data["rows"]:
        assert row.get("case") and row.get("variant")
        for key in (
            "items_per_s",
            "items_per_s_min",
            "items_per_s_max",
            "p50_ms",
            "p95_ms",
            "p99_ms",
        ):
            if key in row:
                assert isinstance(row[key], float) and row[key] >= 0, (key, row)
        if "items_per_s_min" in row:
            assert row["items_per_s_min"] <= row["items_per_s"] <= row["items_per_s_max"]
        if "p50_ms" in row:
            assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    return data


# --- the stages, tiny, on the real services ----------------------------------------------------


@pytest.mark.services
def test_kafka_stage(settings, tmp_path):
    from benchmarks import bench_kafka

    result = bench_kafka.run(
        settings, n_events=400, repeats=1, warmup=0, rates=(100,), load_seconds=0.5
    )
    data = assert_valid(h.save(result, tmp_path)["latest"], "kafka")
    variants = {(r["case"], r["variant"]) for r in data["rows"]}
    assert {
        ("produce", "kafka-python"),
        ("produce", "confluent"),
        ("consume", "kafka-python"),
        ("consume", "confluent"),
    } <= variants
    load = next(r for r in data["rows"] if r["case"] == "produce->consume")
    assert load["completed"] == load["sent"] == 50
    assert {c["what"] for c in data["comparisons"]} == {"produce events/s", "consume events/s"}


@pytest.mark.services
def test_redis_stage(settings, tmp_path):
    from benchmarks import bench_redis

    result = bench_redis.run(
        settings, admissions=16, observations=3, batches=(1, 8), reads=5, repeats=1, write_batch=50
    )
    data = assert_valid(h.save(result, tmp_path)["latest"], "redis")
    reads = {(r["variant"], r["batch"]) for r in data["rows"] if r["case"] == "read features"}
    assert reads == {(v, b) for v in (bench_redis.STORE, bench_redis.BASELINE) for b in (1, 8)}
    # The floor: the same MGET from Redis's C client (Debian's redis-server brings redis-tools);
    # none on a Redis Cluster, where one MGET cannot span slots.
    floor = [r for r in data["rows"] if r["variant"] == bench_redis.FLOOR]
    assert [r["batch"] for r in floor] == ([] if settings.redis.is_cluster else [1, 8])
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in floor)
    assert set(data["breakdown_ms"]) == {"redis feature write", "redis feature read"}
    # The cost of TLS, beside loopback plaintext in the same run.
    transport = {r["variant"]: r for r in data["rows"] if r["case"].startswith("transport")}
    assert set(transport) == {"loopback plaintext", "TLS"}
    assert all(r["items_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in transport.values())
    assert {c["what"] for c in data["comparisons"]} >= {
        "write events/s",
        "read p50 latency, batch 8",
    }


@pytest.mark.services
def test_redis_baseline_reads_the_same_features(settings, redis_client):
    from benchmarks import bench_redis
    from features import model_inputs as mi
    from features.sample import cohort

    store = bench_redis.scratch_store(redis_client, bench_redis.fitted_features())
    prefix = "m3t:test-bench-baseline"
    histories = cohort(4, seed=3, n_observations=5)
    try:
        bench_redis.write_all(store, [e for events in histories.values() for e in events], 100)
        bench_redis.write_baseline(redis_client, prefix, store, list(histories))
        want = store.read_inputs(list(histories))
        got = bench_redis.read_baseline(redis_client, prefix, list(histories))
        for name in (mi.NUMERIC, mi.NUMERIC_MASK, mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    finally:
        store.drop()
        bench_redis.drop_prefix(redis_client, prefix)


def test_cxr_stage(tmp_path):
    from benchmarks import bench_cxr

    result = bench_cxr.run(Settings(), images=3, batches=(2,), repeats=1, warmup=1)
    data = assert_valid(h.save(result, tmp_path)["latest"], "cxr")
    variants = {(r["case"], r["variant"]) for r in data["rows"]}
    assert {
        ("encoded", bench_cxr.PIL),
        ("encoded", bench_cxr.DALI),
        ("pixels", bench_cxr.DALI),
    } <= variants
    assert all(c["ratio"] > 0 for c in data["comparisons"])


@pytest.mark.services
def test_inference_stage(settings, tmp_path):
    from benchmarks import bench_inference as bi

    result = bi.run(settings, batches=(1, 4), repeats=1, warmup=1, min_items=4)
    data = assert_valid(h.save(result, tmp_path)["latest"], "inference")
    measured = {(r["variant"], r["batch"]) for r in data["rows"] if r["case"] == "M3T-LM"}
    assert {(bi.EAGER, 1), (bi.ONNX, 1), (bi.EAGER, 4), (bi.ONNX, 4)} <= measured
    # Triton is measured when the model is loaded, otherwise the gap says why; same for TensorRT.
    assert (bi.TRITON, 1) in measured or "not ready" in data["missing"][bi.TRITON]
    assert "TensorRT" in data["missing"] or any("TensorRT" in r["variant"] for r in data["rows"])


def test_sigterm_unwinds_a_bench_as_ctrl_c_does():
    import os
    import signal

    from benchmarks.cli import _unwinding_on_sigterm

    previous, unwound = signal.getsignal(signal.SIGTERM), []
    with pytest.raises(SystemExit) as stopped:
        with _unwinding_on_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            finally:  # where a stage stops its workers and removes what it wrote
                unwound.append(True)
    assert unwound == [True] and stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # the command's alone


@pytest.fixture
def scratch_store(redis_client):
    """An online store of its own in the real Redis, dropped after the test."""
    import uuid

    from features.fitted import FittedFeatures
    from features.online import OnlineStore
    from features.vocab import Vocabulary

    store = OnlineStore(
        redis_client,
        FittedFeatures.unnormalised(Vocabulary.fit(["a b"])),
        scratch=f"test-{uuid.uuid4().hex[:8]}",
    )
    yield store
    store.drop()


@pytest.mark.services
def test_an_admission_a_killed_run_left_takes_the_next_runs_admission(scratch_store):
    """A run killed before its cleanup leaves its admissions in Redis; the next run numbers
    its own from the same place, and its warm-up must still be scored."""
    from datetime import UTC, datetime, timedelta

    from benchmarks import bench_e2e
    from ingest import events as ev

    hadm_id, now = bench_e2e.FIRST_HADM, datetime.now(UTC)
    left = ev.decode(bench_e2e.admission(hadm_id, now - timedelta(minutes=5)))
    assert scratch_store.write_batch([left]).applied == 1
    again = ev.decode(bench_e2e.admission(hadm_id, now))
    stats = scratch_store.write_batch([again])
    assert (stats.applied, stats.refused) == (1, [])
    # The same admission sent twice by one run is still one event.
    resent = ev.decode(bench_e2e.admission(hadm_id, now))
    assert scratch_store.write_batch([resent]).duplicates == 1


@pytest.mark.services
def test_a_runs_cleanup_leaves_none_of_its_admissions_keys(
    settings, redis_client, scratch_store, monkeypatch
):
    import random
    from datetime import UTC, datetime, timedelta

    from benchmarks import bench_e2e
    from features.online import OnlineStore
    from ingest import events as ev
    from stream import scores as sc
    from stream.scoring import EMB_KEY

    store = scratch_store
    monkeypatch.setattr(OnlineStore, "current", classmethod(lambda cls, client, **kw: store))
    hadm_id, now = bench_e2e.FIRST_HADM + 999_999, datetime.now(UTC)
    try:
        events = [bench_e2e.admission(hadm_id, now - timedelta(minutes=1))]
        events += [bench_e2e.observation(hadm_id, now, random.Random(i)) for i in range(3)]
        assert store.write_batch([ev.decode(e) for e in events]).applied == 4
        for key in (sc.SCORE_KEY, sc.HISTORY_KEY, EMB_KEY):  # what the workers write beside
            redis_client.set(key.format(hadm_id=hadm_id), b"x")
        redis_client.zadd(sc.RANKING_KEY, {str(hadm_id): 0.5})
        tagged = f"*{{{hadm_id}}}*"
        assert len(list(redis_client.scan_iter(tagged, count=10_000))) >= 7

        bench_e2e._cleanup(settings, [hadm_id])

        assert list(redis_client.scan_iter(tagged, count=10_000)) == []
        assert redis_client.zscore(sc.RANKING_KEY, str(hadm_id)) is None
    finally:
        bench_e2e._cleanup(settings, [hadm_id])


@pytest.mark.services
def test_e2e_stage(settings, redis_client, tmp_path, monkeypatch):
    from benchmarks import bench_e2e
    from m3t.clients import unlink
    from tests import skeleton

    # The workers score the walking skeleton: the harness is measured without a trained model.
    monkeypatch.setattr(bench_e2e, "HOSTILE_EVERY", 5)  # hostile events at these small sizes
    try:
        result = bench_e2e.run(
            settings,
            rates=(20,),
            seconds=1.0,
            drain_s=10.0,
            census=10,
            held=(10, 2.0),
            warmup=(20, 1.0),
            pipeline=skeleton.pipeline,
        )
    finally:  # the skeleton's features (the benchmark removes the rest of what it wrote)
        left = [  # by sweep: the warm-up's admissions, then the recorded sweep's
            unlink(redis_client, redis_client.scan_iter(f"m3t:skeleton:{{{first // 10**6}*"))
            for first in (bench_e2e.FIRST_HADM, bench_e2e.FIRST_HADM + bench_e2e.SWEEP_HADMS)
        ]
    data = assert_valid(h.save(result, tmp_path)["latest"], "e2e")
    assert data["params"]["pipeline"] == "tests.skeleton.pipeline"
    # The warm-up ran first, on admissions of its own, and is not among the rows below.
    assert data["params"]["warmup"] == [20, 1.0] and all(left)
    assert [row["case"] for row in data["rows"]] == [
        "event -> score, new admissions",
        "event -> score, new admissions, held 2 s",
        "event -> score, census 10",
        "event -> score, census 10, held 2 s",
        "event -> score, census 10 + 1% hostile",
        "event -> score, census 10 + 1% hostile, held 2 s",
    ]
    for level in data["rows"]:
        assert level["sent"] == 20 and level["offered_per_s"] == (
            10 if "held" in level["case"] else 20
        )
        assert level["completed"] == 20, "every event should be scored at these rates"
        assert level.get("hostile_sent") == (4 if "hostile" in level["case"] else None)
        # While it sent, every process on the path was counted, the workers at least busy.
        by_process = level["cpu_cores_by_process"]
        assert set(by_process) == {
            "workers",
            "load generator + observer",
            "redis",
            "kafka",
            "triton",
        }
        assert by_process["workers"] > 0 and level["cpu_cores"] == pytest.approx(
            sum(by_process.values()), abs=0.01
        )
        # And how often each process's threads were woken per event: a worker at least once
        # for each (its poll returning the event).
        woken = level["wake_ups_per_event_by_process"]
        assert set(woken) == set(by_process) and woken["workers"] >= 1
        assert level["wake_ups_per_event"] == pytest.approx(sum(woken.values()), abs=0.1)
        # The workers' time by stage: each event consumed and applied, each admission scored.
        stages = level["stages"]
        assert stages["produce -> consume ms/event"] >= 0 and stages["events/poll"] >= 1
        assert stages["model ms/batch"] > 0 and stages["admissions/batch"] >= 1
    assert "end to end (event -> score)" in data["breakdown_ms"]


def test_the_sweep_with_explanations_on_runs_under_the_first_scheduler_it_is_labelled_with(
    settings, monkeypatch
):
    from benchmarks import bench_e2e
    from tests import skeleton

    swept = []

    def record(cfg, base, n_workers, **kwargs):
        swept.append((cfg, n_workers, kwargs))
        return []  # no levels: only what each sweep was given is checked

    monkeypatch.setattr(bench_e2e, "_sweep", record)
    monkeypatch.setattr(bench_e2e.services, "up", lambda *args, **kwargs: None)
    bench_e2e.run(
        settings,
        workers=(2,),
        schedulers=(bench_e2e.SOURCE_LINGER, bench_e2e.WORKER_LINGER),
        explanations=(False, True),
        warmup=None,
        pipeline=skeleton.pipeline,
    )
    # One sweep per scheduler with explanations off, then one with them on.
    assert [cfg.stream.explanations for cfg, _, _ in swept] == [False, False, True]
    cfg, n_workers, kwargs = swept[-1]
    # The first scheduler's own overrides (the source's linger), its worker count, and
    # admissions of its own.
    assert n_workers == 2 and kwargs["linger_ms"] == 5 and kwargs["worker_options"] is None
    assert cfg.kafka.security_protocol == settings.kafka.security_protocol
    assert len({kw["first_hadm"] for _, _, kw in swept}) == 3


def test_a_scheduler_variant_reloads_the_model_with_its_queue_delay_then_as_published(
    settings, triton
):
    from tests import skeleton

    def delay() -> int:
        config = triton.get_model_config(skeleton.MODEL).config
        return config.dynamic_batching.max_queue_delay_microseconds

    published = delay()
    with h.triton_batching(
        settings, {"max_queue_delay_microseconds": 250}, names=(skeleton.MODEL, "m3t_not_loaded")
    ):
        assert delay() == 250 != published
        assert triton.is_model_ready(skeleton.MODEL)
    assert delay() == published and triton.is_model_ready(skeleton.MODEL)


def test_the_ward_benchmarks_rows_stay_on_the_page_above_a_real_ward(settings, redis_client):
    from benchmarks import bench_ward
    from stream.scores import RANKING_KEY

    real = {980_000_000 + i: 0.3 + i / 250 for i in range(150)}  # risks 0.3-0.9
    redis_client.zadd(RANKING_KEY, real)
    try:
        ward = bench_ward.Ward(settings, admissions=20, history=3)
        try:
            for _ in range(3):
                shown = redis_client.zrevrange(RANKING_KEY, 0, bench_ward.PAGE_ROWS - 1)
                assert set(ward.ids) <= {int(m) for m in shown}
                for hadm_id in ward.ids:
                    ward.rescore(hadm_id)
        finally:
            ward.close()
        assert not set(ward.ids) & {int(m) for m in redis_client.zrange(RANKING_KEY, 0, -1)}
    finally:
        redis_client.zrem(RANKING_KEY, *real)


def test_set_gives_a_stage_json_arguments_and_refuses_what_is_not_name_equals_json():
    from benchmarks.cli import _overrides

    assert _overrides(["workers=[1, 2]", 'schedulers=["a", "b"]', "seconds=1.5"]) == {
        "workers": [1, 2],
        "schedulers": ["a", "b"],
        "seconds": 1.5,
    }
    for bad in ("workers", "2x=1", "workers=[1,"):
        result = CliRunner().invoke(app, ["kafka", "--set", bad])
        assert result.exit_code == 2 and "--set" in result.output


def test_schedulers_are_compared_case_by_case_with_the_first():
    from benchmarks import bench_e2e

    first, other = bench_e2e.CURRENT, bench_e2e.QUEUE_DELAY
    rows = [
        {"case": "c", "offered_per_s": 50, "variant": f"1 worker, {s}", "p50_ms": p, "cpu_cores": c}
        for s, p, c in ((first, 8.0, 0.4), (other, 10.0, 0.5))
    ] + [{"case": "c", "offered_per_s": 200, "variant": f"1 worker, {first}", "p50_ms": 9.0}]
    ratios = {r["what"]: r for r in bench_e2e._scheduler_ratios(rows, (first, other))}
    assert set(ratios) == {"p50 c at 50/s", "cores c at 50/s"}
    assert ratios["p50 c at 50/s"]["ratio"] == pytest.approx(0.8)
    assert ratios["cores c at 50/s"]["ratio"] == pytest.approx(0.8)
    assert ratios["p50 c at 50/s"]["denominator"] == other


def test_clusters_are_compared_with_the_single_node_before_and_after_them():
    from benchmarks import bench_e2e

    runs = (bench_e2e.SINGLE_NODE, bench_e2e.CLUSTERS, bench_e2e.SINGLE_NODE)
    rows = [
        {"case": "c", "offered_per_s": 50, "variant": f"1 worker, {d} (run {i})", "p50_ms": p}
        | {"p99_ms": 2 * p, "achieved_per_s": 50.0}
        for i, (d, p) in enumerate(zip(runs, (10.0, 15.0, 12.0)), 1)
    ]
    ratios = bench_e2e._deployment_ratios(rows, runs)
    p50 = {r["denominator"]: r["ratio"] for r in ratios if r["what"].startswith("p50")}
    assert p50 == {"single node (run 1)": 1.5, "single node (run 3)": 1.25}
    assert {r["numerator"] for r in ratios} == {"clusters (run 2)"} and len(ratios) == 6


def two_small_sweeps(settings, redis_client, tmp_path, **variation) -> dict:
    """The e2e stage's saved result for 20 new admissions a second for 1 s through the
    skeleton, swept twice as ``variation`` (``bench_e2e.run``'s arguments) says."""
    from benchmarks import bench_e2e
    from m3t.clients import unlink
    from tests import skeleton

    try:
        result = bench_e2e.run(
            settings,
            rates=(20,),
            seconds=1.0,
            drain_s=10.0,
            workloads=(bench_e2e.NEW_ADMISSIONS,),
            pipeline=skeleton.pipeline,
            **variation,
        )
    finally:  # the sweeps' admissions here, 95 and 96 million on (a cluster's went with it)
        unlink(redis_client, redis_client.scan_iter("m3t:skeleton:{9[56]*"))
    return assert_valid(h.save(result, tmp_path)["latest"], "e2e")


@pytest.mark.single_node
@pytest.mark.services
def test_e2e_prices_kafka_security_beside_plaintext_in_one_run(settings, redis_client, tmp_path):
    from benchmarks import bench_e2e
    from m3t import services

    data = two_small_sweeps(
        settings, redis_client, tmp_path, kafka_security=("SASL_SSL", "PLAINTEXT")
    )
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"1 worker, Kafka SASL_SSL", "1 worker, Kafka PLAINTEXT"}
    assert [(r["sent"], r["completed"]) for r in rows.values()] == [(20, 20)] * 2
    [ratio] = data["comparisons"]
    assert (ratio["numerator"], ratio["denominator"]) == ("SASL_SSL", "PLAINTEXT")
    assert ratio["ratio"] > 0
    twin = bench_e2e.kafka_twin(settings, "PLAINTEXT")
    assert services.SERVICES["kafka"](twin).pid() is None  # the run stopped its second broker


@pytest.mark.single_node
@pytest.mark.services
def test_e2e_runs_one_sweep_on_the_single_node_then_on_the_clusters(
    settings, redis_client, tmp_path
):
    from benchmarks import bench_e2e
    from m3t import services
    from m3t.services.process import free_ports

    ports = tuple(free_ports(18))
    settings = settings.model_copy(  # clusters of this session's own, on free ports
        update={
            "redis": settings.redis.model_copy(
                update={"cluster_ports": ports[:6], "cluster_bus_ports": ports[6:12]}
            ),
            "kafka": settings.kafka.model_copy(
                update={"cluster_ports": ports[12:15], "cluster_controller_ports": ports[15:]}
            ),
        }
    )
    data = two_small_sweeps(
        settings,
        redis_client,
        tmp_path,
        deployments=(bench_e2e.SINGLE_NODE, bench_e2e.CLUSTERS),
    )
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"1 worker, single node (run 1)", "1 worker, clusters (run 2)"}
    assert [(r["sent"], r["completed"]) for r in rows.values()] == [(20, 20)] * 2
    clusters = rows["1 worker, clusters (run 2)"]["cpu_cores_by_process"]
    assert clusters["kafka"] > 0 and clusters["redis"] > 0  # the clusters' nodes were counted
    ratios = {r["what"].split()[0]: r for r in data["comparisons"]}
    assert set(ratios) == {"p50", "p99", "achieved/s"}
    assert {(r["numerator"], r["denominator"]) for r in ratios.values()} == {
        ("clusters (run 2)", "single node (run 1)")
    }
    on_clusters = bench_e2e.on_clusters(settings)
    assert all(not s.pids() for s in services.select(on_clusters, ["kafka", "redis"]))


def test_cpu_meter_counts_a_process_tree_and_leaves_other_names_trees_out():
    import os
    import signal
    import subprocess
    import sys

    python = sys.executable
    # A launcher whose child spins once it has said its pid; another process that only sleeps.
    # Each says when it is ready, so that their start-up CPU falls before the first sample:
    # on a loaded machine, starting two interpreters can take longer than any fixed wait.
    spin = "import os\nprint(os.getpid(), flush=True)\nwhile True: pass\n"
    launcher = subprocess.Popen(
        [python, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sleeper = subprocess.Popen(
        [python, "-c", "import time; print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        spinner = int(launcher.stdout.readline())
        assert sleeper.stdout.readline() == "ready\n"
        whole = h.CpuMeter({"busy tree": [launcher.pid], "idle": [sleeper.pid]})
        split = h.CpuMeter(
            {"launcher": [launcher.pid], "spinner": [spinner]}
        )  # the child is a name of its own
        before, before_split, began = whole.sample(), split.sample(), time.perf_counter()

        def spun_enough() -> bool:
            nonlocal during, during_split, seconds
            during, during_split, seconds = (
                whole.sample(),
                split.sample(),
                time.perf_counter() - began,
            )
            return (
                min(
                    during["busy tree"] - before["busy tree"],
                    during_split["spinner"] - before_split["spinner"],
                )
                >= 0.3
            )

        during = during_split = seconds = None
        wait_until(spun_enough, timeout_s=60, interval_s=0.05)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the spinning child with it
        sleeper.kill()
        launcher.wait(30)
        sleeper.wait(30)

    assert during["busy tree"] - before["busy tree"] >= 0.3, (
        "the child's CPU should count in its launcher's tree"
    )
    assert during["idle"] - before["idle"] < 0.05
    assert during_split["spinner"] - before_split["spinner"] >= 0.3
    assert during_split["launcher"] - before_split["launcher"] < 0.05, (
        "another name's tree is left out"
    )
    cores = h.CpuMeter.cores(before, during, seconds)
    assert 0 < cores["busy tree"] <= os.cpu_count() and cores["idle"] < cores["busy tree"]


def test_cpu_meter_keeps_the_time_of_a_process_that_ended_in_its_tree():
    import subprocess
    import sys

    # A child that spins for a fixed CPU time, then ends and is reaped by its launcher, which
    # says so and waits.
    spin = "import time\nprint('spinning', flush=True)\nwhile time.process_time() < 0.6: pass\n"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            f"subprocess.run([sys.executable, '-c', {spin!r}])\n"
            "print('reaped', flush=True)\nsys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        meter = h.CpuMeter({"tree": [launcher.pid]})
        assert launcher.stdout.readline() == "spinning\n"
        before = meter.sample()
        assert launcher.stdout.readline() == "reaped\n"
        after = meter.sample()
    finally:
        launcher.kill()
        launcher.wait(30)
    # The child's spinning after the first sample counts, though it had ended by the second.
    assert after["tree"] - before["tree"] > 0.1


def test_cpu_meter_counts_the_wake_ups_of_every_thread_in_a_tree():
    import subprocess
    import sys

    # A child whose second thread, once told to go, sleeps 5 ms at a time 100 times, says so
    # and waits on (so that its count stays to be read); a sleeper.
    nap = (
        "import sys, threading, time\n"
        "go = threading.Event()\n"
        "def naps():\n"
        "    go.wait()\n"
        "    for _ in range(100): time.sleep(0.005)\n"
        "    print('done', flush=True); threading.Event().wait()\n"
        "threading.Thread(target=naps, daemon=True).start()\n"
        "print('ready', flush=True); sys.stdin.readline(); go.set(); sys.stdin.read()\n"
    )
    napper = subprocess.Popen(
        [sys.executable, "-c", nap], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sleeper.stdout.readline() == "ready\n"
        meter = h.CpuMeter({"napper": [napper.pid], "sleeper": [sleeper.pid]})
        assert napper.stdout.readline() == "ready\n"
        before = meter.wake_ups()
        napper.stdin.write("go\n")
        napper.stdin.flush()
        assert napper.stdout.readline() == "done\n"
        after = meter.wake_ups()
    finally:
        napper.kill()
        sleeper.kill()
        napper.wait(30)
        sleeper.wait(30)
    # Each nap is a wake-up of the napping thread; going, the two threads woke a few more times.
    assert 100 <= after["napper"] - before["napper"] <= 110
    assert after["sleeper"] - before["sleeper"] == 0


def test_a_score_completes_the_events_its_features_include():
    from benchmarks import bench_e2e

    observer = bench_e2e.ScoreObserver.__new__(
        bench_e2e.ScoreObserver
    )  # no Kafka: the matching alone
    observer.waiting, observer.scored, observer._lock = defaultdict(deque), set(), threading.Lock()
    run = h.schedule(10, 0.3)
    for i, t in enumerate((100.0, 100.5, 101.0)):
        observer.expect(7, t, run, i)
    observer._complete({"hadm_id": 7, "feature_time": 100.5}, when=2.0)
    assert run.done[:2].tolist() == [2.0, 2.0] and np.isnan(
        run.done[2]
    )  # the later event is not in it
    observer._complete({"hadm_id": 7, "feature_time": 100.9}, when=3.0)
    assert np.isnan(run.done[2])
    observer._complete({"hadm_id": 8, "feature_time": 999.0}, when=3.0)  # another admission's score
    assert np.isnan(run.done[2]) and observer.scored == {7, 8}


def test_the_score_observer_times_reasons_from_the_score_they_explain():
    from benchmarks import bench_e2e

    observer = bench_e2e.ScoreObserver.__new__(bench_e2e.ScoreObserver)  # no Kafka
    observer.waiting, observer.scored, observer._lock = defaultdict(deque), set(), threading.Lock()
    observer.pending_reasons, observer.reason_lags_s = {}, []
    fresh = {"absent": []}
    for hadm, t in ((1, 10.0), (2, 10.0), (3, 10.0)):
        observer._complete({"hadm_id": hadm, "feature_time": t, "freshness": fresh}, when=t)
    reasons = [{"feature": "Age"}]
    observer._complete(
        {"hadm_id": 1, "feature_time": 10.0, "freshness": fresh, "reasons": reasons}, when=10.02
    )
    observer._complete(
        {"hadm_id": 2, "feature_time": 10.0, "freshness": fresh, "reasons": reasons}, when=10.1
    )
    # A score that kept its previous reasons came with them: nothing to wait for.
    observer._complete(
        {"hadm_id": 4, "feature_time": 10.0, "freshness": fresh, "reasons": reasons}, when=11.0
    )
    got = observer.take_reason_lags()
    assert got["reasons_n"] == 2
    assert got["reasons_p50_ms"] == pytest.approx(60, abs=1e-6)
    assert observer.take_reason_lags() == {} and observer.pending_reasons == {}


# --- the command line and the GPU script ----------------------------------------------------------


def test_cli_has_a_command_per_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("kafka", "redis", "cxr", "inference", "e2e", "all", "show"):
        assert command in result.output


def test_cli_all_runs_the_chosen_stages_and_summarises(tmp_path, monkeypatch):
    from benchmarks import stages

    # The CLI's quick sizes, shrunk further for a test; the stage runs for real.
    monkeypatch.setitem(
        stages.STAGES,
        "cxr",
        stages.Stage(
            "cxr", "benchmarks.bench_cxr", "cxr", quick=dict(images=2, batches=(1,), repeats=1)
        ),
    )
    monkeypatch.setattr("benchmarks.cli._settings", Settings)  # cxr needs only the data folder
    result = runner.invoke(app, ["all", "--quick", "--stage", "cxr", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert_valid(tmp_path / "cxr-latest.json", "cxr")
    pipeline = json.loads((tmp_path / "pipeline-latest.json").read_text())
    assert pipeline["params"]["stages"] == ["cxr"] and pipeline["breakdown_ms"]
    assert "### cxr" in (tmp_path / "summary-latest.md").read_text()
    shown = runner.invoke(app, ["show", str(tmp_path / "cxr-latest.json")])
    assert shown.exit_code == 0 and "DALI CPU" in shown.output


def test_every_stage_accepts_its_full_and_quick_sizes():
    import importlib
    import inspect

    from benchmarks.stages import STAGES

    assert list(STAGES)[-1] == "e2e", "the whole pipeline runs after the stages it is made of"
    for stage in STAGES.values():
        signature = inspect.signature(importlib.import_module(stage.module).run)
        for sizes in (stage.full, stage.quick):
            signature.bind(None, **sizes)  # raises TypeError on a size the stage does not take


def test_cli_rejects_an_unknown_stage(tmp_path):
    result = runner.invoke(app, ["all", "--stage", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2


def test_gpu_script_dry_run_and_clear_failure_without_cuda(tmp_path, capsys):
    import torch

    from benchmarks import gpu

    # The dry run runs the script's own measuring code on the CPU, at tiny sizes.
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    data = assert_valid(tmp_path / "gpu-latest.json", "gpu")
    assert data["params"]["dry_run"] is True and "GPU" in data["missing"]
    eager = [r for r in data["rows"] if r["variant"] == "eager fp32"]
    assert [r["batch"] for r in eager] == [1, 2] and all(
        r["max_abs_diff_vs_fp32_eager"] == 0 for r in eager
    )
    assert any(r["case"] == "CXR decode+preprocess" for r in data["rows"])
    # The project's DALI pipeline on the CPU, each output checked against its reference.
    dali = [r for r in data["rows"] if r["variant"].startswith("DALI CPU")]
    assert {r["case"] for r in dali} >= {"DALI pipeline, as stored", "DALI pipeline, JPEG q90"}
    assert all(r["failed_images"] == 0 and r["max_abs_diff_vs_reference"] < 1e-3 for r in dali)
    if not torch.cuda.is_available():
        assert gpu.main(["--quick", "--out", str(tmp_path / "real")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.parse(["--batches", "0"])


def test_stage_summary_divides_a_levels_stage_sums_by_polls_events_and_batches():
    from benchmarks.bench_e2e import stage_summary

    zero = {k: 0 for k in ("seconds", "count", "items")}
    before = {n: dict(zero) for n in ("consume", "apply", "read", "model", "write")}
    after = {
        "consume": {"seconds": 0.3, "count": 10, "items": 100},
        "apply": {"seconds": 0.05, "count": 10, "items": 100},
        "read": {"seconds": 0.004, "count": 4, "items": 40},
        "model": {"seconds": 0.02, "count": 4, "items": 40},
        "write": {"seconds": 0.008, "count": 4, "items": 40},
    }
    summary = stage_summary(before, after)
    assert summary["produce -> consume ms/event"] == pytest.approx(3.0)
    assert summary["feature write ms/poll"] == pytest.approx(5.0)
    assert summary["events/poll"] == 10
    assert summary["model ms/batch"] == pytest.approx(5.0)
    assert summary["admissions/batch"] == 10
    assert stage_summary(after, after)["read ms/batch"] is None  # no batch in the level


def test_the_scaling_model_sizes_each_process_from_events_per_core():
    from benchmarks import scaling

    row = {
        "case": "event -> score, census 1,000",
        "variant": "1 worker",
        "offered_per_s": 2000.0,
        "achieved_per_s": 2000.0,
        "p50_ms": 5.0,
        "p99_ms": 20.0,
        "cpu_cores": 1.0,
        "cpu_cores_by_process": {"workers": 0.4, "kafka": 0.2, "redis": 0.2, "triton": 0.2},
        "stages": {"model ms/batch": 2.0},
    }
    per_core = scaling.per_core({"rows": [row]}, row["case"], 2000.0)
    assert per_core == {"workers": 5000.0, "kafka": 10000.0, "redis": 10000.0, "triton": 10000.0}
    small, large = scaling.sizing(per_core, rates=(200, 20_000))
    assert small == {
        "events_per_s": 200,
        "workers": 1,
        "partitions": 4,
        "redis_shards": 1,
        "kafka_brokers": 3,
        "triton_instances": 1,
    }
    # 20,000/s needs 4 worker-cores at 0.6 of a core each: 7 workers, 14 partitions.
    assert (large["workers"], large["partitions"], large["redis_shards"]) == (7, 14, 4)
    assert "| 20,000 | 7 | 14 | 4 |" in scaling.sizing_table(per_core, rates=(20_000,))
    assert "| event -> score, census 1,000 | 1 worker | 2,000 | 5.0 | 20.0 |" in (
        scaling.stage_table({"rows": [row]})
    )
