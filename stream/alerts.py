"""The alerting process (``m3t alerts run``): risk scores in, alerts raised and cleared out.

A consumer group on the scores topic (records keyed by admission, so one member owns an
admission's scores, in order) folds each score into its admission's alert state under its
ward's rule (``stream.alert_rules``), keeps the state and the active alerts in Redis, and
produces each transition to the alerts topic. Signed in as the ``alerts`` role: it reads
scores and writes alerts, nothing else.

Exactly-once effect. A state is written only if its feature time is newer than the stored
one (compare-and-set in Redis), so a redelivered score changes nothing. The transitions a
write decided are kept in the state (``unsent``) with the admission in an outbox set, in the
same step, and leave both only once Kafka acknowledged them; offsets are committed after.
A process killed in between produces them again on start (``recover``): a transition may
reach the topic twice, never not at all, with the same ``alert_id`` to dedupe by.

Layout (hash tags keep an admission's key on one Redis Cluster slot; the indexes are
written apart from it, idempotently, so nothing spans slots):
  m3t:alert:{HADM}        hash: state (JSON, ``AlertState``), feature_time, ward, silent,
                          unsent (JSON list of transitions not yet acknowledged by Kafka)
  m3t:alert:active        sorted set of admissions with a shown alert, by raise time
  m3t:alert:silent        the same for silent rules' alerts (recorded, not shown)
  m3t:alert:outbox        admissions with unsent transitions
  m3t:alert:ward:<ward>   sorted set of the ward's current probabilities (top-k rules)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import redis

from features.online import OPEN_TTL_S
from ingest.events import INT64_MAX
from m3t import kafka
from m3t.clients import LuaScript, redis_client, run_scripts
from m3t.settings import AlertRule, Settings
from stream.alert_rules import AlertState, step
from stream.scores import SCORE_KEY

log = logging.getLogger(__name__)

ALERT_KEY = "m3t:alert:{{{hadm_id}}}"
ACTIVE_KEY = "m3t:alert:active"
SILENT_KEY = "m3t:alert:silent"
OUTBOX_KEY = "m3t:alert:outbox"
WARD_KEY = "m3t:alert:ward:{ward}"

# Compare-and-set by feature time. KEYS: the alert hash. ARGV: feature time, state, ward,
# silent, unsent, TTL.
_WRITE_STATE = LuaScript("""
local current = redis.call('HGET', KEYS[1], 'feature_time')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'feature_time', ARGV[1], 'state', ARGV[2], 'ward', ARGV[3],
           'silent', ARGV[4], 'unsent', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
""")


MAX_FEATURE_TIME = 253_402_300_800.0  # 10000-01-01 in epoch seconds: past any stay


@dataclass(frozen=True)
class Score:
    """What the alerting reads of a score record (``stream.scores.RiskScore.as_json``)."""

    hadm_id: int
    feature_time: float
    mortality_prob: float
    ward: str = ""  # absent from scores written before wards were known

    @classmethod
    def parse(cls, value: bytes) -> Score:
        """The record's score; ``ValueError`` for anything a worker could not have written
        (an id that is no integer, a time or probability that is not finite or out of range):
        NaN would clear an alert, an infinite time would freeze it."""
        try:
            d = json.loads(value)
            hadm_id = d["hadm_id"]
            score = cls(
                hadm_id,
                float(d["feature_time"]),
                float(d["mortality_prob"]),
                str(d.get("ward") or ""),
            )
        except (KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise ValueError(type(exc).__name__) from None
        if type(hadm_id) is not int or not 0 <= hadm_id <= INT64_MAX:
            raise ValueError("hadm_id")
        if not (
            0.0 <= score.feature_time <= MAX_FEATURE_TIME and 0.0 <= score.mortality_prob <= 1.0
        ):
            raise ValueError("feature_time or mortality_prob")
        return score


class AlertStore:
    """Alert states and the active alerts in Redis (``client``: the alerts role's to write,
    the reader's to read the active alerts)."""

    def __init__(self, client: redis.Redis, ttl_s: int = OPEN_TTL_S):
        self.client = client
        self.ttl_s = ttl_s

    def states(self, hadm_ids: list[int]) -> dict[int, dict]:
        """Each admission's stored fields (empty where none)."""
        with self.client.pipeline(transaction=False) as pipe:
            for h in hadm_ids:
                pipe.hgetall(ALERT_KEY.format(hadm_id=h))
            rows = pipe.execute()
        return {h: {k.decode(): v.decode() for k, v in r.items()} for h, r in zip(hadm_ids, rows)}

    def discharged(self, hadm_ids: list[int]) -> set[int]:
        """Those whose score is gone (expired) or records their discharge."""
        with self.client.pipeline(transaction=False) as pipe:
            for h in hadm_ids:
                pipe.hget(SCORE_KEY.format(hadm_id=h), "discharged")
                pipe.exists(SCORE_KEY.format(hadm_id=h))
            rows = pipe.execute()
        return {h for h, flag, exists in zip(hadm_ids, rows[::2], rows[1::2]) if flag or not exists}

    def kth_probabilities(
        self,
        wards: dict[str, int],
        latest: dict[str, dict[int, float]],
        left: dict[str, list[int]],
    ) -> dict[str, float | None]:
        """Each ward's k-th highest current probability (None: fewer than k), after putting
        ``latest`` (ward -> admission -> probability) in and taking ``left`` (ward ->
        admissions discharged or moved away) and any discharged in its top k out."""
        with self.client.pipeline(transaction=False) as pipe:
            for ward, probs in latest.items():
                pipe.zadd(WARD_KEY.format(ward=ward), {str(h): p for h, p in probs.items()})
            for ward, gone in left.items():
                pipe.zrem(WARD_KEY.format(ward=ward), *map(str, gone))
            pipe.execute()
        kth = {}
        for ward, k in wards.items():
            key = WARD_KEY.format(ward=ward)
            while True:
                top = self.client.zrevrange(key, 0, k - 1, withscores=True)
                gone = self.discharged([int(m) for m, _ in top])
                if not gone:
                    break
                self.client.zrem(key, *map(str, gone))
            kth[ward] = top[k - 1][1] if len(top) == k else None
        return kth

    def write(self, hadm_id: int, state: AlertState, ward: str, silent: bool, unsent: list):
        """Store a state and its unsent transitions unless a newer one is stored; True if
        written. The outbox entry goes first, so no unsent transition is out of its sight."""
        if unsent:
            self.client.sadd(OUTBOX_KEY, hadm_id)
        args = [
            repr(state.feature_time),
            json.dumps(state.as_dict()),
            ward,
            "1" if silent else "0",
            json.dumps(unsent),
            self.ttl_s,
        ]
        key = ALERT_KEY.format(hadm_id=hadm_id)
        [written] = run_scripts(self.client, lambda c: _WRITE_STATE(c, [key], args), _WRITE_STATE)
        return bool(written)

    def index(self, hadm_id: int, state: AlertState, silent: bool) -> None:
        """Put the admission in the index its alert belongs to and out of the other
        (idempotent: a replay repairs what a crash left half-done)."""
        shown, hidden = (SILENT_KEY, ACTIVE_KEY) if silent else (ACTIVE_KEY, SILENT_KEY)
        with self.client.pipeline(transaction=False) as pipe:
            if state.active:
                pipe.zadd(shown, {str(hadm_id): state.raised_at})
            else:
                pipe.zrem(shown, str(hadm_id))
            pipe.zrem(hidden, str(hadm_id))
            pipe.execute()

    def sent(self, hadm_ids: list[int]) -> None:
        """Kafka acknowledged these admissions' unsent transitions."""
        if not hadm_ids:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for h in hadm_ids:
                pipe.hset(ALERT_KEY.format(hadm_id=h), "unsent", "[]")
            pipe.srem(OUTBOX_KEY, *hadm_ids)
            pipe.execute()

    def outbox(self) -> dict[int, list[dict]]:
        """Transitions decided but not acknowledged by Kafka, by admission."""
        ids = [int(m) for m in self.client.smembers(OUTBOX_KEY)]
        return {h: json.loads(f.get("unsent") or "[]") for h, f in self.states(ids).items()}

    def active(self, silent: bool = False) -> list[dict]:
        """The active alerts (or the silent ones), oldest raise first, of admissions not
        discharged."""
        ids = [int(m) for m in self.client.zrange(SILENT_KEY if silent else ACTIVE_KEY, 0, -1)]
        if not ids:
            return []
        gone = self.discharged(ids)
        alerts = []
        for h, fields in self.states(ids).items():
            alert = None if h in gone else _alert(h, fields)
            if alert is not None and alert["active"]:
                del alert["active"]
                alerts.append(alert)
        return alerts

    def latest(self, hadm_id: int) -> dict | None:
        """An admission's alert for its page: the active one, or the last raised and since
        cleared (``active`` says which); None without one, or under a silent rule. Only the
        latest is kept in Redis: an admission's earlier alerts are on the alerts topic."""
        alert = _alert(hadm_id, self.states([hadm_id])[hadm_id])
        if alert is None or alert["silent"] or alert["raised_at"] is None:
            return None
        return alert


def _alert(hadm_id: int, fields: dict) -> dict | None:
    """A stored alert state as ``GET /alerts`` shows it, with ``active``; None without one."""
    if "state" not in fields:
        return None
    state = AlertState.from_dict(json.loads(fields["state"]))
    return {
        "hadm_id": hadm_id,
        "ward": fields.get("ward", ""),
        "raised_at": state.raised_at,
        "criteria": list(state.criteria),
        "mortality_prob": state.mortality_prob,
        "feature_time": state.feature_time,
        "silent": fields.get("silent") == "1",
        "active": state.active,
    }


class AlertProcess:
    """Consume scores, fold them into alert states, publish the transitions.

    Args:
        settings: the rules (``settings.alerts``), topics and group.
        max_records: records read per poll.
    """

    def __init__(self, settings: Settings, max_records: int = 500, client_id: str = "m3t-alerts"):
        self.settings = settings
        self.max_records = max_records
        self.redis = redis_client(settings, role="alerts")
        self.store = AlertStore(self.redis)
        self.consumer = kafka.consumer(
            settings, role="alerts", group_id=settings.kafka.alerts_group, client_id=client_id
        )
        self.producer = kafka.producer(settings, role="alerts", client_id=client_id)
        self.counts = defaultdict(int)

    def rule(self, ward: str) -> AlertRule:
        return self.settings.alerts.rule(ward)

    def run(self, idle_timeout_s: float | None = None, stop: threading.Event | None = None):
        """Until ``stop`` is set, or nothing came for ``idle_timeout_s``."""
        stop = stop or threading.Event()
        self.recover()
        last = [time.monotonic()]

        def assigned(_consumer, _partitions):  # the idle time counts from joining the group
            last[0] = time.monotonic()

        self.consumer.subscribe([self.settings.kafka.topic_scores], on_assign=assigned)
        try:
            while not stop.is_set():
                records = kafka.poll_batch(self.consumer, self.max_records, 0.5)
                if not records:
                    if idle_timeout_s is not None and time.monotonic() - last[0] > idle_timeout_s:
                        break
                    continue
                last[0] = time.monotonic()
                self.process([r.value() for r in records])
                self.consumer.commit(asynchronous=False)
        finally:
            self.consumer.close()
            self.redis.close()

    def recover(self) -> None:
        """Publish what a previous run decided but Kafka never acknowledged."""
        pending = self.store.outbox()
        self._publish({h: t for h, t in pending.items() if t})
        self.store.sent(list(pending))

    def process(self, values: list[bytes]) -> list[dict]:
        """Fold a poll's score records; the transitions published."""
        self.counts["scores"] += len(values)
        by_admission: dict[int, list[Score]] = defaultdict(list)
        for value in values:
            try:
                score = Score.parse(value)
            except ValueError:
                self.counts["unreadable"] += 1  # no record content logged: it is patient data
                continue
            by_admission[score.hadm_id].append(score)
        if not by_admission:
            return []
        ids = list(by_admission)
        stored = self.store.states(ids)
        discharged = self.store.discharged(ids)
        kth = self._kth(by_admission, stored, discharged)
        published: dict[int, list[dict]] = {}
        for h, scores in by_admission.items():
            fields = stored[h]
            state = AlertState.from_dict(json.loads(fields["state"])) if "state" in fields else None
            state = state or AlertState()
            unsent = json.loads(fields.get("unsent") or "[]")
            newest = max(scores, key=lambda s: s.feature_time)
            ward, rule = newest.ward, self.rule(newest.ward)  # where the patient is now
            before = state.feature_time
            for s in sorted(scores, key=lambda s: s.feature_time):
                state, t = step(
                    self.rule(s.ward),  # each score by its own ward's rule, as one at a time
                    state,
                    h,
                    s.ward,
                    s.feature_time,
                    s.mortality_prob,
                    kth.get(s.ward),
                    discharged=h in discharged,
                )
                if t is not None:
                    unsent.append(t.as_dict())
            if state.feature_time != before and not self.store.write(
                h, state, ward, rule.silent, unsent
            ):
                continue  # a newer state is stored: another member folded these scores
            self.store.index(h, state, rule.silent)
            if unsent:
                published[h] = unsent
        self._publish(published)
        self.store.sent(list(published))
        return [t for ts in published.values() for t in ts]

    def _kth(
        self, by_admission: dict[int, list[Score]], stored: dict[int, dict], discharged: set[int]
    ) -> dict[str, float | None]:
        """The k-th highest probability of each ward with a top-k rule, this poll's latest
        scores in (the same k-th for the poll's every score of that ward)."""
        latest: dict[str, dict[int, float]] = defaultdict(dict)
        left: dict[str, list[int]] = defaultdict(list)
        wards = {}
        for h, scores in by_admission.items():
            last = max(scores, key=lambda s: s.feature_time)
            before = stored[h].get("ward")
            if before is not None and before != last.ward:
                left[before].append(h)
            k = self.rule(last.ward).top_k
            if k is None:
                continue
            wards[last.ward] = k
            if h in discharged:
                left[last.ward].append(h)
            else:
                latest[last.ward][h] = last.mortality_prob
        if not (wards or left):
            return {}
        return self.store.kth_probabilities(wards, latest, left)

    def _publish(self, transitions: dict[int, list[dict]]) -> None:
        """Produce the transitions and wait until Kafka acknowledged every one."""
        errors = []

        def delivered(err, _msg):
            if err is not None:
                errors.append(err)

        topic = self.settings.kafka.topic_alerts
        for h, ts in transitions.items():
            for t in ts:
                kafka.produce(
                    self.producer, topic, json.dumps(t).encode(), str(h).encode(), delivered
                )
                self.counts[t["kind"]] += 1
        if self.producer.flush(30) or errors:
            raise RuntimeError(f"Kafka did not acknowledge the alerts: {errors[:1]}")
