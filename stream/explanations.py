"""The reasons and data freshness kept with each score (``stream.explanations`` on).

The scorer's explanation graph (``m3t_explain``, ``trainer.explain``) gives each score's
contributions: per feature group and modality, how much of the mortality probability it
accounts for. Here they become the score record's fields (the score store's contract):

* ``reasons``: the ``MAX_REASONS`` largest contributions by size, each with the feature's
  value as measured and its value at the admission's previous score;
* ``freshness``: the age at feature time of the newest lab, vital, note and X-ray, and
  which were absent;
* ``previous_mortality_prob``: the score before this one.

Freshness and the previous risk are cheap and come with the score itself (``annotate``).
New reasons cost about twelve scores (``m3t_explain`` runs ~24 copies of the admission), so
they are computed after the score is written, off the scoring path (``stream.reasoner``):
the score is written with its reasons pending (``null``) and ``annotate`` says which rows
wait for them. A score within ``min_change`` of the previous one keeps that one's reasons
(contributions and values as they were then) and waits for nothing.

The previous score's values come from its hash (``VALUES_FIELD``, every group's value, not
only its reasons'), read for the whole batch in one round trip.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import redis

from features import model_inputs as mi
from features import reasons as fr
from m3t.clients import round_trip
from stream.scores import SCORE_KEY

MAX_REASONS = 5
VALUES_FIELD = "reason_values"  # score hash: {feature: value} of every group at that score
# Smaller contributions are float32 rounding (an occluded group that was already missing
# contributes exactly nothing).
MIN_CONTRIBUTION = 1e-6


@dataclass(frozen=True)
class Pending:
    """A row of the batch whose score waits for new reasons: its values now and at the
    previous score, which the reasons show side by side."""

    row: int
    values: dict
    previous: dict


class Explainer:
    """Args:
    client: Redis (the stream's), for previous scores and note times.
    store: the online store (``features.online.OnlineStore``): normalisation and notes.
    min_change: a score closer than this to the previous one keeps its reasons (0: never).
    """

    def __init__(self, client: redis.Redis, store, min_change: float = 0.0):
        self.client, self.store, self.min_change = client, store, min_change

    def annotate(
        self,
        hadm_ids: list[int],
        inputs: dict,
        mortality: np.ndarray,
        seen_modalities: np.ndarray,
    ) -> tuple[list[dict], list[Pending]]:
        """Per admission: the score record's ``reasons`` (kept, or None while new ones are
        pending), ``freshness`` and ``previous_mortality_prob``, and ``VALUES_FIELD`` for
        the next score; and the rows whose reasons are pending."""
        fitted = self.store.fitted
        raw = fr.raw_values(inputs[mi.NUMERIC], inputs[mi.NUMERIC_MASK], fitted.mean, fitted.std)
        shown = fr.shown_values(raw)
        previous = self._previous(hadm_ids)
        with_text = np.flatnonzero(seen_modalities.max(axis=1) > 0)
        times = np.full((len(hadm_ids), 2), np.nan)
        if len(with_text):
            times[with_text] = self.store.modality_times([hadm_ids[i] for i in with_text])
        fresh = fr.freshness(raw, seen_modalities, times[:, 0], times[:, 1], inputs["as_of"])
        out, pending = [], []
        for row, (before_prob, before_values, kept) in enumerate(previous):
            values = {name: _number(v) for name, v in zip(fr.REASON_NAMES, shown[row]) if v == v}
            renew = (
                kept is None
                or before_prob is None
                or abs(mortality[row] - before_prob) >= self.min_change
            )
            if renew:
                pending.append(Pending(row, values, before_values))
            out.append(
                {
                    "reasons": None if renew else kept,
                    "freshness": fresh[row],
                    "previous_mortality_prob": before_prob,
                    VALUES_FIELD: values,
                }
            )
        return out, pending

    @staticmethod
    def hash_fields(explanation: dict) -> dict[str, str]:
        """What the score's hash keeps for the next score's reasons to compare with."""
        return {VALUES_FIELD: json.dumps(explanation[VALUES_FIELD])}

    def _previous(self, hadm_ids: list[int]) -> list[tuple[float | None, dict, list | None]]:
        """Per admission its previous score's risk, values and reasons (None: none)."""
        fields = ["mortality_prob", VALUES_FIELD, "reasons"]

        def queue(commands):
            for h in hadm_ids:
                commands.hmget(SCORE_KEY.format(hadm_id=h), fields)

        return [
            (
                float(prob) if prob is not None else None,
                json.loads(values) if values else {},
                json.loads(reasons) if reasons else None,
            )
            for prob, values, reasons in round_trip(self.client, queue)
        ]


def top_reasons(contributions: np.ndarray, values: dict, previous: dict) -> list[dict]:
    """The ``MAX_REASONS`` largest contributions by size, largest first."""
    order = np.argsort(-np.abs(contributions), kind="stable")[:MAX_REASONS]
    out = []
    for j in order.tolist():
        c = float(contributions[j])
        if not abs(c) >= MIN_CONTRIBUTION:
            break
        name = fr.REASON_NAMES[j]
        out.append(
            {
                "feature": name,
                "modality": fr.REASON_MODALITIES[j],
                "value": values.get(name),
                "previous": previous.get(name),
                "contribution": _number(c),
            }
        )
    return out


def describe(reason: dict, mortality_prob: float, previous_mortality_prob: float | None) -> str:
    """One reason as a sentence: "Creatinine (latest, mg/dL) 1.1 -> 2.3 raised mortality
    risk 0.08 -> 0.14"."""
    verb = "raised" if reason["contribution"] > 0 else "lowered"
    value, before = reason.get("value"), reason.get("previous")
    what = reason["feature"]
    if value is not None:
        change = f"{_short(before)} -> {_short(value)}" if before is not None else _short(value)
        what += f" {change}"
    risk = f"{mortality_prob:.2f}"
    if previous_mortality_prob is not None:
        risk = f"{previous_mortality_prob:.2f} -> {risk}"
    return f"{what} {verb} mortality risk {risk} (by {abs(reason['contribution']):.3f})"


def _number(value: float) -> float:
    return float(f"{float(value):.4g}")


def _short(value: float) -> str:
    return f"{value:g}" if math.isfinite(value) else str(value)
