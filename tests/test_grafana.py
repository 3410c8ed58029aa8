"""deploy/grafana/m3t.json queries only metrics the API exports: every metric name in its
queries is a sample of a real GET /metrics, served with a worker's snapshot, a scored
inpatient, refusals and a rate limit met, so that every family has samples."""

from __future__ import annotations

import json
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from m3t.settings import PROJECT_ROOT
from stream.api_tokens import TokenStore
from stream.metrics import COUNTERS, METRICS_KEY, WorkerMetrics
from stream.scores import RiskScore, ScoreStore
from tests.test_api_security import bearer, own_state, serving

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "m3t.json"


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_grafana_json_with_the_score_distribution_over_time():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert [t["expr"] for p in heatmaps for t in p["targets"]] == [
        "sum(m3t_inpatient_mortality_prob_bucket) by (le)"
    ]
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_every_metric_the_dashboard_queries_is_exported(
    settings, tmp_path, redis_client, scores_restored
):
    cfg = own_state(settings, tmp_path, rate_limit_per_minute=2)
    ScoreStore(redis_client).write_batch(
        [RiskScore.predicted(77_000_001, 3.0, 0.42, "m:1", 1.0, 2.0)]
    )
    worker = WorkerMetrics(redis_client, "grafana-test", images={"unreadable": 1})
    worker.latency.observe(0.02)
    worker.batch_size.observe(4)
    worker.lag = {"0": 3}
    worker.flush({**{name: 1 for name in COUNTERS}, "dead_letter_reasons": {"bad_json": 1}})
    store = TokenStore(cfg)
    reader, scraper = store.add("ward", "reader"), store.add("prometheus", "metrics")
    try:
        with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
            assert api.get("/risk/top").status_code == 401
            statuses = [api.get("/alerts", headers=bearer(reader)).status_code for _ in range(3)]
            assert statuses[-1] == 429
            text = api.get("/metrics", headers=bearer(scraper)).text
    finally:
        redis_client.hdel(METRICS_KEY, "grafana-test")
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {m for q in queries(dashboard) for m in re.findall(r"\bm3t_[a-z0-9_]+", q)}
    assert used and used <= exported, sorted(used - exported)
    assert "m3t_inpatient_mortality_prob_bucket" in used
