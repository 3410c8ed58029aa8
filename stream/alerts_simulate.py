"""``m3t alerts simulate``: what a rule would have done on scored history.

Scores (each admission's score history in Redis, or any (feature time, probability, ward)
sequences) are replayed in feature-time order through ``stream.alert_rules.step``, the
fold the alerting process runs, with each ward's current probabilities kept for top-k (an
admission leaves its ward after its last score). Reported: alerts raised per 100
patient-days, and with outcome labels (the discharge events of a cohort, or a dataset from
``m3t features build``) the sensitivity (deaths with an alert during the stay / deaths) and
PPV (alerted admissions that died / alerted admissions), over the labelled admissions.
Patient-days are each stay's length where a cohort gives it, else its scored span (first
to last score).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis

from m3t.settings import AlertRule
from stream.alert_rules import AlertState, step
from stream.scores import HISTORY_KEY

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Outcome:
    died: bool
    los_days: float | None = None  # the whole stay's, where known


@dataclass
class SimulationReport:
    admissions: int
    patient_days: float
    alerts: int
    alerts_per_100_patient_days: float | None  # None: no patient-days
    alerted_admissions: int
    labelled: int
    deaths: int
    alerted_deaths: int
    sensitivity: float | None
    ppv: float | None

    def as_dict(self) -> dict:
        return asdict(self)


History = dict[int, list[tuple[float, float, str]]]  # admission -> (feature time, prob, ward)


def simulate(
    histories: History,
    rule_of: Callable[[str], AlertRule],
    outcomes: dict[int, Outcome] | None = None,
) -> SimulationReport:
    """Replay ``histories`` under ``rule_of(ward)`` and score the alerts against
    ``outcomes``."""
    outcomes = outcomes or {}
    ordered = {h: sorted(s) for h, s in histories.items() if s}
    last_time = {h: s[-1][0] for h, s in ordered.items()}
    states: dict[int, AlertState] = defaultdict(AlertState)
    ward_probs: dict[str, dict[int, float]] = defaultdict(dict)
    ward_of: dict[int, str] = {}
    raised: dict[int, int] = defaultdict(int)
    merged = heapq.merge(*([(t, h, p, w) for t, p, w in s] for h, s in ordered.items()))
    for feature_time, h, prob, ward in merged:
        if ward_of.get(h, ward) != ward:  # moved: out of the old ward's ranking
            ward_probs[ward_of[h]].pop(h, None)
        ward_of[h] = ward
        rule = rule_of(ward)
        ward_probs[ward][h] = prob
        kth = None
        if rule.top_k is not None and len(ward_probs[ward]) >= rule.top_k:
            kth = heapq.nlargest(rule.top_k, ward_probs[ward].values())[-1]
        states[h], t = step(rule, states[h], h, ward, feature_time, prob, kth)
        if t is not None and t.kind == "raised":
            raised[h] += 1
        if feature_time == last_time[h]:
            ward_probs[ward].pop(h, None)
    days = sum(
        outcomes[h].los_days
        if h in outcomes and outcomes[h].los_days is not None
        else (s[-1][0] - s[0][0]) / SECONDS_PER_DAY
        for h, s in ordered.items()
    )
    alerts = sum(raised.values())
    labelled = [h for h in ordered if h in outcomes]
    deaths = [h for h in labelled if outcomes[h].died]
    alerted = [h for h in labelled if raised[h]]
    alerted_deaths = [h for h in deaths if raised[h]]
    return SimulationReport(
        admissions=len(ordered),
        patient_days=days,
        alerts=alerts,
        alerts_per_100_patient_days=100.0 * alerts / days if days > 0 else None,
        alerted_admissions=sum(1 for h in ordered if raised[h]),
        labelled=len(labelled),
        deaths=len(deaths),
        alerted_deaths=len(alerted_deaths),
        sensitivity=len(alerted_deaths) / len(deaths) if deaths else None,
        ppv=len(alerted_deaths) / len(alerted) if alerted else None,
    )


def redis_histories(client: redis.Redis, count: int = 1000) -> History:
    """Every admission's score history in Redis (the admin's client: it scans the keys)."""
    prefix = HISTORY_KEY.split("{{")[0]
    histories: History = {}
    for key in client.scan_iter(f"{prefix}*", count=count):
        hadm_id = int(key.decode().split("{")[1].rstrip("}"))
        entries = client.xrange(key)
        histories[hadm_id] = [
            (
                float(f[b"feature_time"]),
                float(f[b"mortality_prob"]),
                f.get(b"ward", b"").decode(),
            )
            for _, f in entries
        ]
    return histories


def dataset_outcomes(dataset_dir: Path) -> dict[int, Outcome]:
    """In-hospital death per admission from a dataset ``m3t features build`` wrote."""
    with np.load(Path(dataset_dir) / "dataset.npz") as data:
        hadm, died = data["hadm_id"], data["mortality"]
    outcomes: dict[int, Outcome] = {}
    for h, d in zip(hadm.tolist(), died.tolist()):
        outcomes[int(h)] = Outcome(bool(d) or outcomes.get(int(h), Outcome(False)).died)
    return outcomes


def discharge_outcomes(events: Iterable) -> dict[int, Outcome]:
    """In-hospital death and length of stay from discharge events (a cohort's)."""
    return {
        e.hadm_id: Outcome(bool(e.payload.hospital_expire_flag), float(e.payload.los_days))
        for e in events
        if e.type == "discharge"
    }
