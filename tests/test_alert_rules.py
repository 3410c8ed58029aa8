"""Alert rules on constructed score sequences: thresholds with and without hysteresis, the
minimum interval, rises over a window, top-k, silent mode, redeliveries, discharge; and
``alerts.simulate`` against hand-counted figures. Pure logic: no services."""

from __future__ import annotations

import math

from m3t.settings import AlertRule, AlertSettings
from stream.alert_rules import AlertState, replay, step
from stream.alerts_simulate import Outcome, simulate

H = 3600.0
HOVERING = [0.49, 0.51, 0.49, 0.51, 0.49, 0.51]


def kinds(transitions) -> list[str]:
    return [t.kind for t in transitions]


def hourly(probs, start_h: float = 0.0) -> list[tuple[float, float]]:
    return [((start_h + i) * H, p) for i, p in enumerate(probs)]


def test_a_score_hovering_at_the_line_flaps_without_hysteresis_and_not_with_it():
    flapping = AlertRule(threshold=0.5, hysteresis=0.0, min_interval_h=0.0)
    _, transitions = replay(flapping, 1, "", hourly(HOVERING))
    assert kinds(transitions) == ["raised", "cleared", "raised", "cleared", "raised"]

    steady = AlertRule(threshold=0.5, hysteresis=0.05, min_interval_h=0.0)
    state, transitions = replay(steady, 1, "", hourly(HOVERING))
    assert kinds(transitions) == ["raised"]
    assert transitions[0].feature_time == 1 * H and transitions[0].criteria == ("threshold",)
    assert state.active and state.raised_at == 1 * H


def test_an_alert_clears_only_below_the_threshold_less_the_hysteresis():
    rule = AlertRule(threshold=0.5, hysteresis=0.1, min_interval_h=0.0)
    _, transitions = replay(rule, 7, "MICU", hourly([0.4, 0.55, 0.41, 0.40, 0.39, 0.5]))
    assert [(t.kind, t.feature_time / H) for t in transitions] == [
        ("raised", 1),
        ("cleared", 4),  # 0.41 and 0.40 still hold (>= 0.4)
        ("raised", 5),
    ]
    assert transitions[1].criteria == ("threshold",)  # what had raised it
    assert all(t.ward == "MICU" and t.hadm_id == 7 for t in transitions)


def test_the_minimum_interval_holds_back_a_new_alert():
    rule = AlertRule(threshold=0.5, hysteresis=0.0, min_interval_h=6.0)
    _, transitions = replay(rule, 1, "", hourly([0.6, 0.4, 0.6, 0.4, 0.6, 0.4, 0.6, 0.4]))
    # Raised at 0 h, cleared at 1 h; 2 h and 4 h are within 6 h of the raise; 6 h is not.
    assert [(t.kind, t.feature_time / H) for t in transitions] == [
        ("raised", 0),
        ("cleared", 1),
        ("raised", 6),
        ("cleared", 7),
    ]


def test_a_rise_within_the_window_alerts_and_clears_once_the_window_passes_it():
    rule = AlertRule(threshold=None, rise=0.1, window_h=24.0, hysteresis=0.0, min_interval_h=0)
    scores = [(0.0, 0.10), (12 * H, 0.15), (20 * H, 0.22), (30 * H, 0.25), (50 * H, 0.25)]
    state, transitions = replay(rule, 1, "", scores)
    # 20 h: 0.22 - 0.10 >= 0.1. 30 h: lowest since 6 h is 0.15, a rise of 0.10, held.
    # 50 h: lowest since 26 h is 0.25, no rise: cleared.
    assert [(t.kind, t.feature_time / H) for t in transitions] == [("raised", 20), ("cleared", 50)]
    assert transitions[0].criteria == ("rise",)
    assert [t / H for t, _ in state.window] == [30, 50]  # older scores left the window

    # A slow rise over more than the window never alerts.
    slow = [(i * 24 * H, 0.1 + 0.05 * i) for i in range(6)]
    assert replay(rule, 1, "", slow)[1] == []


def test_top_k_alerts_on_the_wards_kth_probability_less_the_hysteresis():
    rule = AlertRule(threshold=None, top_k=2, hysteresis=0.05, min_interval_h=0.0)
    state, raised = step(rule, AlertState(), 1, "W", 0.0, 0.30, kth_prob=0.30)
    assert raised.kind == "raised" and raised.criteria == ("top_k",)
    state, held = step(rule, state, 1, "W", H, 0.27, kth_prob=0.31)  # within 0.05 of the k-th
    assert held is None and state.active
    state, cleared = step(rule, state, 1, "W", 2 * H, 0.25, kth_prob=0.31)
    assert cleared.kind == "cleared"
    # Fewer than k scored in the ward: every one is in the top k.
    assert step(rule, AlertState(), 2, "W", 0.0, 0.01, kth_prob=None)[1].kind == "raised"


def test_silent_rules_record_their_alerts_marked_silent():
    rule = AlertRule(threshold=0.5, silent=True)
    _, transitions = replay(rule, 1, "SICU", hourly([0.2, 0.7]))
    assert kinds(transitions) == ["raised"] and transitions[0].silent
    assert transitions[0].as_dict()["silent"] is True


def test_a_redelivered_or_older_score_changes_nothing():
    rule = AlertRule(threshold=0.5, min_interval_h=0.0)
    state, raised = step(rule, AlertState(), 1, "", 10.0, 0.7)
    assert raised is not None
    for feature_time, prob in ((10.0, 0.7), (10.0, 0.1), (5.0, 0.1)):
        again, transition = step(rule, state, 1, "", feature_time, prob)
        assert again == state and transition is None
    assert AlertState.from_dict(state.as_dict()) == state
    assert raised.alert_id == step(rule, AlertState(), 1, "", 10.0, 0.7)[1].alert_id


def test_a_discharge_clears_the_alert_and_raises_none():
    rule = AlertRule(threshold=0.5, min_interval_h=0.0)
    state, _ = step(rule, AlertState(), 1, "", 0.0, 0.7)
    state, cleared = step(rule, state, 1, "", H, 0.9, discharged=True)
    assert cleared.kind == "cleared" and not state.active
    assert step(rule, AlertState(), 2, "", 0.0, 0.9, discharged=True)[1] is None


def test_each_ward_has_its_rule_and_the_empty_ward_the_default():
    settings = AlertSettings(rules={"": AlertRule(threshold=0.3), "MICU": AlertRule(top_k=3)})
    assert settings.rule("MICU").top_k == 3
    assert settings.rule("").threshold == 0.3 and settings.rule("CCU").threshold == 0.3
    assert AlertSettings(rules={}).rule("") == AlertRule()


def test_simulate_matches_hand_counted_alerts_sensitivity_and_ppv():
    histories = {
        1: [
            (0.0, 0.3, ""),
            (6 * H, 0.6, ""),
            (12 * H, 0.52, ""),
            (24 * H, 0.3, ""),
            (30 * H, 0.7, ""),
        ],
        2: [(0.0, 0.55, ""), (48 * H, 0.2, "")],
        3: [(0.0, 0.1, ""), (24 * H, 0.2, "")],
        4: [(0.0, 0.2, ""), (72 * H, 0.45, "")],
    }
    outcomes = {1: Outcome(True), 2: Outcome(False), 3: Outcome(True), 4: Outcome(False)}
    rule = AlertRule(threshold=0.5, hysteresis=0.05, min_interval_h=0.0)
    report = simulate(histories, lambda ward: rule, outcomes)
    # Admission 1: raised at 6 h (0.52 holds), cleared at 24 h, raised at 30 h; 2: raised once.
    assert report.alerts == 3 and report.alerted_admissions == 2
    assert report.patient_days == 1.25 + 2 + 1 + 3  # first to last score
    assert math.isclose(report.alerts_per_100_patient_days, 300 / 7.25)
    assert (report.deaths, report.alerted_deaths) == (2, 1)
    assert report.sensitivity == 0.5 and report.ppv == 0.5

    # Stay lengths from discharge events replace the scored spans; unlabelled stays count
    # toward alerts per patient-day only.
    stays = {1: Outcome(True, 4.0), 2: Outcome(False, 6.0)}
    report = simulate(histories, lambda ward: rule, stays)
    assert report.patient_days == 4 + 6 + 1 + 3 and report.labelled == 2
    assert report.sensitivity == 1.0 and report.ppv == 0.5


def test_simulate_ranks_each_ward_for_top_k():
    histories = {
        1: [(0.0, 0.2, "W"), (2 * H, 0.4, "W"), (4 * H, 0.4, "W")],
        2: [(1 * H, 0.3, "W"), (3 * H, 0.35, "W")],
        3: [(1 * H, 0.01, "V")],  # alone in its ward: the top one
    }
    rule = AlertRule(threshold=None, top_k=1, hysteresis=0.0, min_interval_h=0.0)
    report = simulate(histories, lambda ward: rule)
    # 0 h: 1 raised (alone). 1 h: 2 (0.3) tops W, raised. 3 h: 2 (0.35) below 1's 0.4,
    # cleared. 3 raised in V.
    assert report.alerts == 3 and report.alerted_admissions == 3
    assert report.sensitivity is None and report.ppv is None


def test_rules_that_could_never_raise_or_clear_are_refused():
    import pytest
    from pydantic import ValidationError

    for broken in (
        {"threshold": 50},  # a percentage
        {"threshold": 0.0},
        {"threshold": None},  # no criterion at all
        {"threshold": 0.5, "hysteresis": 0.5},  # would never clear
        {"threshold": None, "top_k": 0},
        {"threshold": None, "rise": 0.2, "hysteresis": 0.3},
        {"window_h": 0.0},
    ):
        with pytest.raises(ValidationError):
            AlertRule(**broken)
    assert AlertRule(threshold=None, top_k=3, hysteresis=0.0).top_k == 3
