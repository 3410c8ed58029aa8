"""``m3t bench feeds`` (#21): its generated feed, and the stage at tiny sizes on the real Kafka."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks import bench_feeds
from benchmarks import harness as h
from ingest.hl7 import to_events


def test_the_generated_feed_is_taken_whole_with_unique_control_ids():
    messages = bench_feeds.hl7_messages(200, seed=2, tag="t")
    mapped = [to_events(m) for m in messages]  # none refused
    assert len({m.header.control_id for m in mapped}) == 200
    kinds = Counter(f"{m.header.message_type}^{m.header.trigger}" for m in mapped)
    assert set(kinds) == {"ADT^A01", "ORU^R01", "ADT^A03"}
    assert kinds["ORU^R01"] == bench_feeds.RESULTS_PER_ADMISSION * kinds["ADT^A01"]
    assert bench_feeds.hl7_messages(20, seed=2, tag="t") == messages[:20]


@pytest.mark.services
def test_feeds_stage(settings, tmp_path):
    result = bench_feeds.run(
        settings,
        messages=120,
        connections=4,
        rates=(50,),
        rate_seconds=1.0,
        repeats=1,
        warmup=0,
        fhir_bundles=60,
    )
    data = json.loads(h.save(result, tmp_path)["latest"].read_text())
    rows = {(r["case"], r["variant"]): r for r in data["rows"]}
    saturation = rows["saturation", "4 connections"]
    assert saturation["items_per_s"] > 0 and saturation["p99_ms"] >= saturation["p50_ms"] > 0
    assert 0 < saturation["cpu_cores"] <= 1.05  # the listener is held to one core
    load = rows["offered load", "4 connections"]
    assert load["completed"] == load["sent"] == 50 and load["offered_per_s"] == 50
    cases = {"listener step", "saturation", "offered load", "fhir step", "fhir post"}
    assert {case for case, _ in rows} == cases
    # every message ACKed AA (the run raises otherwise), and the listener took them all
    assert data["params"]["listener_counts"]["accepted"] == 120 + 50
    fhir = rows["fhir post", "8 connections"]
    assert fhir["items_per_s"] > 0 and fhir["p99_ms"] >= fhir["p50_ms"] > 0
