"""Alert rules over one admission's score sequence: the one source of truth that the alerting
process (``stream.alerts``) and ``m3t alerts simulate`` (``stream.alerts_simulate``) share.

``step`` folds one score into an admission's ``AlertState`` under a ward's rule
(``m3t.settings.AlertRule``) and says whether an alert was raised or cleared. A rule raises
when any of its criteria holds: the mortality probability at or above ``threshold``, a
``rise`` over its lowest within ``window_h`` hours, or a place among the ward's ``top_k``.
Hysteresis: an active alert clears only once no criterion holds with ``hysteresis`` taken
off each line (threshold - h, rise - h, the ward's k-th probability - h), and no alert is
raised within ``min_interval_h`` of the previous raise, so a score hovering at the line
does not flap. Time is the score's feature time, so a replay decides as the live run did;
a score no newer than the last one folded changes nothing (redeliveries, replays).
Top-k needs the ward's other admissions: the caller gives the ward's k-th probability.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from m3t.settings import AlertRule

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class AlertState:
    """What an admission's alerting remembers between scores."""

    feature_time: float | None = None  # of the last score folded
    active: bool = False
    raised_at: float | None = None  # feature time of the latest raise
    mortality_prob: float | None = None  # of the last score folded
    criteria: tuple[str, ...] = ()  # those that held at the latest raise
    # (feature time, probability) of the scores within the rise window, oldest first.
    window: tuple[tuple[float, float], ...] = ()

    def as_dict(self) -> dict:
        return {
            "feature_time": self.feature_time,
            "active": self.active,
            "raised_at": self.raised_at,
            "mortality_prob": self.mortality_prob,
            "criteria": list(self.criteria),
            "window": [list(p) for p in self.window],
        }

    @classmethod
    def from_dict(cls, d: dict) -> AlertState:
        return cls(
            d.get("feature_time"),
            bool(d.get("active")),
            d.get("raised_at"),
            d.get("mortality_prob"),
            tuple(d.get("criteria", ())),
            tuple((float(t), float(p)) for t, p in d.get("window", ())),
        )


@dataclass(frozen=True)
class Transition:
    """An alert raised or cleared by one score."""

    kind: Literal["raised", "cleared"]
    hadm_id: int
    ward: str
    feature_time: float
    mortality_prob: float
    criteria: tuple[str, ...]
    silent: bool

    @property
    def alert_id(self) -> str:
        """Stable across redeliveries: a consumer of the alerts topic dedupes by it."""
        return f"{self.hadm_id}:{self.kind}:{self.feature_time!r}"

    def as_dict(self) -> dict:
        return {
            "alert_id": self.alert_id,
            "kind": self.kind,
            "hadm_id": self.hadm_id,
            "ward": self.ward,
            "feature_time": self.feature_time,
            "mortality_prob": self.mortality_prob,
            "criteria": list(self.criteria),
            "silent": self.silent,
        }


def criteria_met(
    rule: AlertRule,
    prob: float,
    lowest_in_window: float | None,
    kth_prob: float | None,
    slack: float = 0.0,
) -> tuple[str, ...]:
    """The rule's criteria that hold for ``prob``, each line lowered by ``slack``.
    ``kth_prob``: the ward's k-th highest current probability (None: fewer than k scored,
    so every one is in the top k)."""
    met = []
    if rule.threshold is not None and prob >= rule.threshold - slack:
        met.append("threshold")
    if (
        rule.rise is not None
        and lowest_in_window is not None
        and prob - lowest_in_window >= rule.rise - slack
    ):
        met.append("rise")
    if rule.top_k is not None and (kth_prob is None or prob >= kth_prob - slack):
        met.append("top_k")
    return tuple(met)


def step(
    rule: AlertRule,
    state: AlertState,
    hadm_id: int,
    ward: str,
    feature_time: float,
    prob: float,
    kth_prob: float | None = None,
    discharged: bool = False,
) -> tuple[AlertState, Transition | None]:
    """Fold one score into ``state``: the new state and the alert it raised or cleared.
    A discharged admission's alert clears and it raises none."""
    if state.feature_time is not None and feature_time <= state.feature_time:
        return state, None  # already folded, or older than what was
    since = feature_time - rule.window_h * SECONDS_PER_HOUR
    earlier = tuple(p for p in state.window if p[0] >= since)
    lowest = min((p for _, p in earlier), default=None)
    window = (*earlier, (feature_time, prob)) if rule.rise is not None else ()
    folded = replace(state, feature_time=feature_time, mortality_prob=prob, window=window)

    def transition(kind, criteria) -> Transition:
        return Transition(kind, hadm_id, ward, feature_time, prob, criteria, rule.silent)

    if state.active:
        holds = criteria_met(rule, prob, lowest, kth_prob, slack=rule.hysteresis)
        if holds and not discharged:
            return folded, None
        cleared = replace(folded, active=False)
        return cleared, transition("cleared", state.criteria)
    met = criteria_met(rule, prob, lowest, kth_prob)
    if not met or discharged:
        return folded, None
    recent = (
        state.raised_at is not None
        and feature_time - state.raised_at < rule.min_interval_h * SECONDS_PER_HOUR
    )
    if recent:
        return folded, None
    raised = replace(folded, active=True, raised_at=feature_time, criteria=met)
    return raised, transition("raised", met)


def replay(
    rule: AlertRule,
    hadm_id: int,
    ward: str,
    scores: list[tuple[float, float]],
    state: AlertState | None = None,
) -> tuple[AlertState, list[Transition]]:
    """Fold a sequence of (feature time, probability) without top-k (it needs the ward):
    the final state and every transition, in order."""
    state = state or AlertState()
    transitions = []
    for feature_time, prob in scores:
        state, t = step(rule, state, hadm_id, ward, feature_time, prob)
        if t is not None:
            transitions.append(t)
    return state, transitions
