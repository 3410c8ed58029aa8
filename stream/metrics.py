"""Worker metrics, shared through Redis so the API can expose every worker's in one place.

Each worker keeps plain counters and fixed-bucket histograms and publishes them as its field
of one hash (``m3t:metrics:workers``: worker id -> a JSON snapshot with its ``updated``
time), so a reader gets every worker's in one HGETALL, with no scan of the keyspace. A
snapshot older than ``STALE_AFTER_S`` (its worker died) is ignored by the reader and removed
by the next worker that publishes. The API renders them in the Prometheus text format with a
``worker`` label through a prometheus_client collector.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from m3t.clients import LuaScript, run_scripts
from stream.alerts import ACTIVE_KEY, SILENT_KEY
from stream.scores import RANKING_KEY

METRICS_KEY = "m3t:metrics:workers"
# A worker publishes every second or so: a snapshot this old is a dead worker's.
STALE_AFTER_S = 30
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COUNTERS = ("events", "dead_letters", "scored", "batches", "commits")
RISK_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# KEYS: the snapshots' hash. ARGV: worker id, its snapshot, the oldest fresh `updated`, TTL.
# The hash expires once no worker publishes.
_PUBLISH = LuaScript("""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local ok, snapshot = pcall(cjson.decode, fields[i + 1])
  local updated = ok and type(snapshot) == 'table' and tonumber(snapshot['updated'])
  if not updated or updated < tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
""")


@dataclass
class WorkerStats:
    """A worker's counters, published with its metrics."""

    events: int = 0
    dead_letters: int = 0
    scored: int = 0
    batches: int = 0
    commits: int = 0
    retries: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # ReasonerStats, and waiting


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last bucket is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def as_dict(self) -> dict:
        return {"bounds": list(self.bounds), "counts": self.counts, "sum": self.total}


# Where a worker's time goes, stage by stage: Kafka's timestamp to the poll that took the
# event (per event), applying a poll's events to the feature store, and per scoring batch
# the feature read, the model (Triton and the embedding cache), the explanations (with
# ``stream.explanations`` on) and the score writes.
STAGES = ("consume", "apply", "read", "model", "explain", "write")


class StageTimes:
    """Seconds spent in each stage, how many times it ran and over how many items (events
    or admissions); summed, so a reader takes differences between two snapshots."""

    def __init__(self):
        # Every stage is there from the start: the scoring thread adds while flush copies.
        self.totals = {name: [0.0, 0, 0] for name in STAGES}

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        total = self.totals[stage]
        total[0] += seconds
        total[1] += 1
        total[2] += items

    def as_dict(self) -> dict:
        return {
            name: {"seconds": s, "count": c, "items": n}
            for name, (s, c, n) in list(self.totals.items())
        }


class WorkerMetrics:
    """``images``: the scorer's X-rays scored as absent, by reason (its live ``image_errors``),
    published with the counters."""

    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        flush_every_s: float = 1.0,
        images: Mapping[str, int] | None = None,
    ):
        self.client = client
        self.worker_id = worker_id
        self.flush_every_s = flush_every_s
        self.images = images if images is not None else {}
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.stages = StageTimes()
        self.lag: dict[str, int] = {}
        self.events_per_s = 0.0
        self._last_flush = time.monotonic()
        self._events_at_flush = 0

    def due(self) -> bool:
        return time.monotonic() - self._last_flush >= self.flush_every_s

    def flush(self, counters: dict[str, int]) -> None:
        """Publish the worker's counters (its WorkerStats) with the histograms and lag."""
        now = time.monotonic()
        elapsed = max(now - self._last_flush, 1e-9)
        self.events_per_s = (counters["events"] - self._events_at_flush) / elapsed
        self._events_at_flush, self._last_flush = counters["events"], now
        updated = time.time()
        snapshot = {
            "counters": {name: counters[name] for name in COUNTERS},
            "latency": self.latency.as_dict(),
            "batch_size": self.batch_size.as_dict(),
            "stages": self.stages.as_dict(),
            "lag": self.lag,
            "images_absent": dict(self.images),
            "dead_letter_reasons": dict(counters.get("dead_letter_reasons", {})),
            "reasons": dict(counters.get("reasons", {})),
            "events_per_s": self.events_per_s,
            "updated": updated,
        }
        args = [self.worker_id, json.dumps(snapshot), updated - STALE_AFTER_S, STALE_AFTER_S]
        run_scripts(self.client, lambda c: _PUBLISH(c, [METRICS_KEY], args), _PUBLISH)


class RedisWorkerCollector:
    """A prometheus_client collector over every live worker's snapshot (one HGETALL)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def snapshots(self) -> dict[str, dict]:
        oldest = time.time() - STALE_AFTER_S
        snapshots = {}
        for worker, value in sorted(self.client.hgetall(METRICS_KEY).items()):
            try:
                snapshot = json.loads(value)
            except ValueError:
                continue
            if snapshot.get("updated", 0) >= oldest:
                snapshots[worker.decode()] = snapshot
        return snapshots

    def collect(self):
        snaps = self.snapshots()
        for name in COUNTERS:
            family = CounterMetricFamily(
                f"m3t_{name}",
                f"{name.replace('_', ' ')} processed by the worker",
                labels=["worker"],
            )
            for worker, snap in snaps.items():
                family.add_metric([worker], snap["counters"][name])
            yield family
        rate = GaugeMetricFamily(
            "m3t_events_per_second", "events consumed per second (last interval)", labels=["worker"]
        )
        lag = GaugeMetricFamily(
            "m3t_consumer_lag", "records behind the log end", labels=["worker", "partition"]
        )
        for worker, snap in snaps.items():
            rate.add_metric([worker], snap["events_per_s"])
            for partition, behind in snap["lag"].items():
                lag.add_metric([worker, partition], behind)
        yield rate
        yield lag
        images = CounterMetricFamily(
            "m3t_images_absent",
            "chest X-rays scored as absent, by reason",
            labels=["worker", "reason"],
        )
        letters = CounterMetricFamily(
            "m3t_dead_letters_by_reason",
            "events and admissions sent to the dead-letter topic, by reason",
            labels=["worker", "reason"],
        )
        for worker, snap in snaps.items():
            for reason, count in sorted(snap.get("images_absent", {}).items()):
                images.add_metric([worker, reason], count)
            for reason, count in sorted(snap.get("dead_letter_reasons", {}).items()):
                letters.add_metric([worker, reason], count)
        yield images
        yield letters
        reasons = CounterMetricFamily(
            "m3t_reasons",
            "scores' new reasons: explained, superseded by a newer score, stale when written, "
            "dropped, outages waited out",
            labels=["worker", "outcome"],
        )
        waiting = GaugeMetricFamily(
            "m3t_reasons_waiting", "written scores waiting for their reasons", labels=["worker"]
        )
        for worker, snap in snaps.items():
            counts = dict(snap.get("reasons", {}))
            if "waiting" in counts:
                waiting.add_metric([worker], counts.pop("waiting"))
            for outcome, count in sorted(counts.items()):
                reasons.add_metric([worker, outcome], count)
        yield reasons
        yield waiting
        for metric, help_text in (
            ("latency", "event-to-score latency (seconds)"),
            ("batch_size", "admissions per scoring batch"),
        ):
            family = HistogramMetricFamily(f"m3t_scoring_{metric}", help_text, labels=["worker"])
            for worker, snap in snaps.items():
                h = snap[metric]
                cumulative, buckets = 0, []
                for bound, count in zip([*h["bounds"], "+Inf"], h["counts"]):
                    cumulative += count
                    buckets.append((str(bound), cumulative))
                family.add_metric([worker], buckets, h["sum"])
            yield family


class RiskCollector:
    """The current inpatients' mortality probabilities as a gauge histogram, and the active
    alerts, shown and silent: sampled at each scrape (the ranking read whole, one
    inpatient a member), so the dashboard draws the score distribution over time."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def collect(self):
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(RANKING_KEY, 0, -1, withscores=True)
            pipe.zcard(ACTIVE_KEY)
            pipe.zcard(SILENT_KEY)
            ranked, shown, silent = pipe.execute()
        risks = Histogram(RISK_BUCKETS)
        for _, prob in ranked:
            risks.observe(prob)
        cumulative, buckets = 0, []
        for bound, count in zip([*RISK_BUCKETS, "+Inf"], risks.counts):
            cumulative += count
            buckets.append((str(bound), cumulative))
        yield GaugeHistogramMetricFamily(
            "m3t_inpatient_mortality_prob",
            "current inpatients by their latest mortality probability",
            buckets=buckets,
            gsum_value=risks.total,
        )
        alerts = GaugeMetricFamily("m3t_alerts_active", "active alerts", labels=["mode"])
        alerts.add_metric(["shown"], shown)
        alerts.add_metric(["silent"], silent)
        yield alerts
