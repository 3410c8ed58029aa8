"""The alerting process against the real Kafka and Redis: scores produced to the scores topic
raise and clear alerts on the alerts topic (read back with kcat, an independent client) and
in GET /alerts; silent rules' alerts are recorded but not shown; a redelivered score raises
nothing twice; transitions Kafka never acknowledged are published on the next start; and
`m3t alerts simulate` on a history in Redis and a dataset's labels."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import numpy as np

from m3t import kafka
from m3t.services.process import wait_until
from m3t.settings import AlertRule, AlertSettings, Settings
from stream.alert_rules import AlertState
from stream.alerts import ACTIVE_KEY, ALERT_KEY, OUTBOX_KEY, SILENT_KEY, AlertProcess, AlertStore
from stream.api_tokens import TokenStore
from stream.scores import HISTORY_KEY, RiskScore, ScoreStore
from tests.kcat import kcat
from tests.test_api_security import bearer, invoke, own_state, serving

RULES = AlertSettings(
    rules={
        "": AlertRule(threshold=0.5, hysteresis=0.05, min_interval_h=0.0),
        "SICU": AlertRule(threshold=0.5, silent=True),
    }
)


def produce_scores(settings: Settings, redis_client, scores: list[tuple[int, float, float, str]]):
    """As the worker does: each score written to Redis, then published (as the stream)."""
    store = ScoreStore(redis_client)
    producer = kafka.producer(settings, role="stream", client_id="t-scores")
    for hadm_id, feature_time, prob, ward in scores:
        score = RiskScore.predicted(hadm_id, 3.0, prob, "m:1", feature_time, feature_time)
        store.write_batch([score])
        record = json.loads(score.as_json()) | {"ward": ward}
        kafka.produce(
            producer, settings.kafka.topic_scores, json.dumps(record).encode(), b"%d" % hadm_id
        )
    assert producer.flush(30) == 0


def alerts_on_topic(settings: Settings) -> list[dict]:
    read = ["-C", "-t", settings.kafka.topic_alerts, "-o", "beginning", "-e", "-q"]
    result = kcat(settings, "reader", *read, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line]


def run_until(settings: Settings, done) -> AlertProcess:
    """An alerting process in a thread until ``done(process)``; the process (stopped)."""
    process = AlertProcess(settings)
    stop = threading.Event()
    thread = threading.Thread(target=process.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: done(process), 60, 0.2), dict(process.counts)
    finally:
        stop.set()
        thread.join(30)
    return process


def forget(redis_client, hadm_ids) -> None:
    for key in (ACTIVE_KEY, SILENT_KEY):
        redis_client.zrem(key, *map(str, hadm_ids))
    redis_client.srem(OUTBOX_KEY, *hadm_ids)
    redis_client.delete(*(ALERT_KEY.format(hadm_id=h) for h in hadm_ids))


def test_scores_raise_and_clear_alerts_once_on_the_topic_and_in_the_api(
    isolated_settings, redis_client, scores_restored, tmp_path
):
    cfg = isolated_settings.model_copy(update={"alerts": RULES})
    base = 74_000_000 + uuid.uuid4().int % 100_000 * 10
    shown, silent, cleared = base + 1, base + 2, base + 3
    scores = [
        (shown, 100.0, 0.3, ""),
        (shown, 200.0, 0.6, ""),
        (silent, 100.0, 0.7, "SICU"),
        (cleared, 100.0, 0.52, ""),
        (cleared, 200.0, 0.48, ""),  # within the hysteresis: held
        (cleared, 300.0, 0.3, ""),
    ]
    store = AlertStore(redis_client)
    try:
        produce_scores(cfg, redis_client, scores)

        def folded(_process):
            states = store.states([shown, silent, cleared])
            times = [json.loads(f["state"])["feature_time"] if f else None for f in states.values()]
            return times == [200.0, 100.0, 300.0]

        process = run_until(cfg, folded)
        assert dict(process.counts) == {"scores": 6, "raised": 3, "cleared": 1}
        published = alerts_on_topic(cfg)
        assert sorted((a["hadm_id"], a["kind"], a["silent"]) for a in published) == [
            (shown, "raised", False),
            (silent, "raised", True),
            (cleared, "cleared", False),
            (cleared, "raised", False),
        ]
        raised = next(a for a in published if a["hadm_id"] == shown)
        assert raised["feature_time"] == 200.0 and raised["mortality_prob"] == 0.6
        assert raised["alert_id"] == f"{shown}:raised:200.0" and raised["criteria"] == ["threshold"]
        assert redis_client.zscore(ACTIVE_KEY, str(shown)) == 200.0
        assert redis_client.zscore(SILENT_KEY, str(silent)) == 100.0
        assert redis_client.zscore(ACTIVE_KEY, str(silent)) is None
        assert redis_client.zscore(ACTIVE_KEY, str(cleared)) is None
        assert not any(redis_client.sismember(OUTBOX_KEY, h) for h in (shown, silent, cleared))

        api_cfg = own_state(cfg, tmp_path)
        reader = TokenStore(api_cfg).add("ward", "reader")
        with serving(api_cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
            answer = api.get("/alerts", headers=bearer(reader))
            assert answer.status_code == 200
            mine = [a for a in answer.json() if a["hadm_id"] in (shown, silent, cleared)]
            assert mine == [
                {
                    "hadm_id": shown,
                    "ward": "",
                    "raised_at": 200.0,
                    "criteria": ["threshold"],
                    "mortality_prob": 0.6,
                    "feature_time": 200.0,
                    "silent": False,
                }
            ]
            metrics = api.get("/metrics", headers=bearer(TokenStore(api_cfg).add("p", "metrics")))
            assert 'm3t_alerts_active{mode="shown"}' in metrics.text
            assert "m3t_inpatient_mortality_prob_bucket" in metrics.text
        listed = invoke(api_cfg, "alerts", "list", "--silent", "--json")
        assert listed.exit_code == 0, listed.output
        assert silent in [a["hadm_id"] for a in json.loads(listed.stdout)]

        # Redelivered: the same scores again, and all of them read afresh by another group.
        produce_scores(cfg, redis_client, scores[1:2] + scores[-1:])
        before = {h: f for h, f in store.states([shown, silent, cleared]).items()}
        again = cfg.model_copy(
            update={
                "kafka": cfg.kafka.model_copy(
                    update={"alerts_group": f"{cfg.kafka.alerts_group}-again"}
                )
            }
        )
        process = run_until(again, lambda p: p.counts["scores"] >= len(scores) + 2)
        assert dict(process.counts) == {"scores": len(scores) + 2}
        assert len(alerts_on_topic(cfg)) == 4
        assert store.states([shown, silent, cleared]) == before
    finally:
        forget(redis_client, [shown, silent, cleared])


def test_transitions_kafka_never_acknowledged_are_published_on_start(
    isolated_settings, redis_client, scores_restored
):
    """A process killed after deciding an alert, before Kafka acknowledged it."""
    cfg = isolated_settings.model_copy(update={"alerts": RULES})
    hadm_id = 75_000_000 + uuid.uuid4().int % 100_000
    store = AlertStore(redis_client)
    state = AlertState(feature_time=50.0, active=True, raised_at=50.0, mortality_prob=0.9)
    unsent = [{"alert_id": f"{hadm_id}:raised:50.0", "kind": "raised", "hadm_id": hadm_id}]
    try:
        assert store.write(hadm_id, state, "", False, unsent)
        assert not store.write(hadm_id, state, "", False, [])  # not newer: refused
        assert store.outbox() == {hadm_id: unsent}
        process = AlertProcess(cfg)
        process.recover()
        process.consumer.close()
        assert [a["alert_id"] for a in alerts_on_topic(cfg)] == [unsent[0]["alert_id"]]
        assert hadm_id not in store.outbox()
    finally:
        forget(redis_client, [hadm_id])


def test_hostile_score_records_are_counted_unreadable_and_each_score_takes_its_wards_rule(
    isolated_settings, redis_client, scores_restored
):
    """One poll: records no worker could write (a process that fails on one fails again on
    it after every restart), and one admission's scores from two wards with their own rules."""
    rules = AlertSettings(
        rules={
            "A": AlertRule(threshold=0.5, hysteresis=0.05, min_interval_h=0.0),
            "B": AlertRule(threshold=0.9, hysteresis=0.05, min_interval_h=0.0),
        }
    )
    cfg = isolated_settings.model_copy(update={"alerts": rules})
    hadm_id = 76_000_000 + uuid.uuid4().int % 100_000
    ScoreStore(redis_client).write_batch([RiskScore.predicted(hadm_id, 3.0, 0.7, "m:1", 1.0, 1.0)])

    def record(**fields) -> bytes:
        return json.dumps(
            {"hadm_id": hadm_id, "feature_time": 50.0, "mortality_prob": 0.95, "ward": "A"} | fields
        ).encode()

    hostile = [
        b'{"hadm_id": 1e400, "feature_time": 1, "mortality_prob": 0.9}',
        b'{"hadm_id": Infinity, "feature_time": 1, "mortality_prob": 0.9}',
        b"[" * 100_000,
        record(mortality_prob=float("nan")),
        record(mortality_prob=float("inf")),
        record(feature_time=float("inf")),
        record(feature_time=1e308),
        record(mortality_prob=1.5),
        record(hadm_id=1.5),
        record(hadm_id=True),
    ]
    process = AlertProcess(cfg)
    try:
        published = process.process(
            [*hostile, record(feature_time=100.0, mortality_prob=0.7, ward="A"),
             record(feature_time=200.0, mortality_prob=0.7, ward="B")]
        )  # fmt: skip
        assert process.counts["unreadable"] == len(hostile)
        # 0.7 raises under A's 0.5 and clears under B's 0.9, as it would one score a poll.
        assert [(t["kind"], t["ward"]) for t in published] == [("raised", "A"), ("cleared", "B")]
        state = json.loads(AlertStore(redis_client).states([hadm_id])[hadm_id]["state"])
        assert state["feature_time"] == 200.0 and not state["active"]
    finally:
        process.consumer.close()
        forget(redis_client, [hadm_id])
        redis_client.delete(f"m3t:score:{{{hadm_id}}}", f"m3t:score-history:{{{hadm_id}}}")
        redis_client.zrem("m3t:risk:inpatients", hadm_id)


def test_simulate_reports_hand_counted_figures_from_redis_history_and_a_dataset(
    settings, redis_client, tmp_path
):
    """The history of tests/test_alert_rules.py's simulate test, written to Redis as the
    score store keeps it, with the labels in a dataset's arrays."""
    hours = 3600.0
    histories = {
        1: [(0, 0.3), (6, 0.6), (12, 0.52), (24, 0.3), (30, 0.7)],
        2: [(0, 0.55), (48, 0.2)],
        3: [(0, 0.1), (24, 0.2)],
        4: [(0, 0.2), (72, 0.45)],
    }
    base = 76_000_000
    try:
        for h, scores in histories.items():
            for t, p in scores:
                redis_client.xadd(
                    HISTORY_KEY.format(hadm_id=base + h),
                    {"mortality_prob": repr(p), "feature_time": repr(t * hours), "model": "m:1"},
                )
        dataset = tmp_path / "dataset"
        dataset.mkdir()
        np.savez(
            dataset / "dataset.npz",
            hadm_id=np.array([base + 1, base + 1, base + 2, base + 3, base + 4]),
            mortality=np.array([0, 1, 0, 1, 0], dtype=np.float32),  # 1 and 3 died
        )
        # Other tests' histories may be in Redis: the labels pick this one's.
        args = [
            "--threshold",
            "0.5",
            "--hysteresis",
            "0.05",
            "--min-interval",
            "0",
            "--labelled-only",
        ]
        result = invoke(settings, "alerts", "simulate", *args, "--dataset", str(dataset), "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["alerts"] == 3 and report["patient_days"] == 7.25
        assert abs(report["alerts_per_100_patient_days"] - 300 / 7.25) < 1e-9
        assert (report["deaths"], report["alerted_deaths"]) == (2, 1)
        assert report["sensitivity"] == 0.5 and report["ppv"] == 0.5
    finally:
        redis_client.delete(*(HISTORY_KEY.format(hadm_id=base + h) for h in histories))


def test_a_cohorts_discharge_events_give_each_stays_death_and_length(cohort):
    from stream.alerts_simulate import discharge_outcomes

    outcomes = discharge_outcomes(e for events in cohort.values() for e in events)
    assert set(outcomes) == set(cohort)
    assert all(o.los_days > 0 for o in outcomes.values())
    assert {o.died for o in outcomes.values()} <= {True, False}


def test_top_k_ranks_the_ward_across_polls_and_drops_the_discharged(
    isolated_settings, redis_client, scores_restored
):
    rules = AlertSettings(
        rules={"TOPW": AlertRule(threshold=None, top_k=1, hysteresis=0.0, min_interval_h=0.0)}
    )
    cfg = isolated_settings.model_copy(update={"alerts": rules})
    base = 78_000_000 + uuid.uuid4().int % 100_000 * 10
    x, y = base + 1, base + 2
    store = AlertStore(redis_client)
    process = AlertProcess(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=process.run, kwargs={"stop": stop}, daemon=True)
    thread.start()

    def folded(hadm_id: int, feature_time: float) -> bool:
        fields = store.states([hadm_id])[hadm_id]
        return bool(fields) and json.loads(fields["state"])["feature_time"] == feature_time

    def send(hadm_id, feature_time, prob):
        produce_scores(cfg, redis_client, [(hadm_id, feature_time, prob, "TOPW")])
        assert wait_until(lambda: folded(hadm_id, feature_time), 60, 0.1)

    try:
        send(x, 100.0, 0.2)  # alone in the ward: the top one
        send(y, 100.0, 0.3)  # above x: the top one too
        send(x, 200.0, 0.25)  # below y's 0.3: cleared
        ScoreStore(redis_client).discharge([y])
        send(x, 300.0, 0.22)  # y discharged: x tops the ward again
    finally:
        stop.set()
        thread.join(30)
    published = alerts_on_topic(cfg)  # in order per admission (its partition's)
    assert [a["kind"] for a in published if a["hadm_id"] == x] == ["raised", "cleared", "raised"]
    assert [a["kind"] for a in published if a["hadm_id"] == y] == ["raised"]
    assert redis_client.zrange("m3t:alert:ward:TOPW", 0, -1) == [str(x).encode()]
    redis_client.delete("m3t:alert:ward:TOPW")
    forget(redis_client, [x, y])


def test_m3t_alerts_run_takes_its_rules_from_the_environment(
    isolated_settings, redis_client, scores_restored
):
    from typer.testing import CliRunner

    from app.cli import app as cli
    from m3t.settings import get_settings
    from tests.conftest import settings_env

    hadm_id = 79_000_000 + uuid.uuid4().int % 100_000
    produce_scores(isolated_settings, redis_client, [(hadm_id, 100.0, 0.35, "CCU")])
    env = settings_env(isolated_settings) | {
        "M3T_ALERTS__RULES": json.dumps({"": {"threshold": 0.9}, "CCU": {"threshold": 0.3}})
    }
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["alerts", "run", "--idle-timeout", "8"], env=env)
    finally:
        get_settings.cache_clear()
    try:
        assert result.exit_code == 0, result.output
        [alert] = alerts_on_topic(isolated_settings)
        assert (alert["hadm_id"], alert["kind"], alert["ward"]) == (hadm_id, "raised", "CCU")
    finally:
        forget(redis_client, [hadm_id])
