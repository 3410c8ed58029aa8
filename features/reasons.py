"""What a score's explanation is made of: the groups of model inputs it attributes the score
to, their human-readable names, their values as measured, and how fresh the data was.

A *group* is what a clinician would call one thing: an item (creatinine, with all its
statistics: latest, mean, min, max, count, hours since, the 24-hour window), or one
demographic. ``GROUP_MATRIX`` marks each group's columns of ``NUMERIC_FEATURES``; the
exported explanation graph (``trainer.explain``) sets a group's columns to "missing" to
measure what the group contributed. After the numeric groups come the optional
modalities, each contributing through the fusion head (``MODALITY_REASONS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features import definitions as fd
from features import model_inputs as mi
from ingest.itemids import LABS, VITALS


@dataclass(frozen=True)
class Group:
    feature: str  # the name shown: item label and the statistic its value is
    modality: str  # "labs_vitals" or "demographics" (contract: the score record's reasons)
    columns: tuple[int, ...]  # its columns of NUMERIC_FEATURES
    value_column: int | None  # the column whose raw value is shown (None: no single value)


_STAT_LABELS = {
    "last": "latest",
    "mean": "mean",
    "min": "min",
    "max": "max",
    "count": "count",
    "hours_since_last": "hours since latest",
}


def feature_label(name: str) -> str:
    """A ``NUMERIC_FEATURES`` name for people: ``creatinine.mean_24h`` -> ``Creatinine (mean,
    last 24 h, mg/dL)``."""
    if name == "age":
        return "Age (years)"
    if name == "sex_male":
        return "Sex (male)"
    if name == "hours_since_admission":
        return "Hours since admission"
    if name.startswith("admission_type="):
        return f"Admission type {name.split('=', 1)[1].lower()}"
    item_name, stat = name.split(".", 1)
    item = next(i for i in fd.MEASURED if i.name == item_name)
    window = ""
    if "_" in stat and stat.endswith("h") and stat.split("_")[0] in fd.WINDOW_STATS:
        stat, hours = stat.split("_", 1)
        window = f", last {hours[:-1]} h"
    unit = "" if stat in ("count", "hours_since_last") else f", {item.unit}"
    return f"{item.label} ({_STAT_LABELS.get(stat, stat)}{window}{unit})"


def _groups() -> tuple[Group, ...]:
    index = {name: i for i, name in enumerate(fd.NUMERIC_FEATURES)}
    types = tuple(i for n, i in index.items() if n.startswith("admission_type="))
    groups = [
        Group("Age (years)", "demographics", (index["age"],), index["age"]),
        Group("Sex (male)", "demographics", (index["sex_male"],), index["sex_male"]),
        Group("Admission type", "demographics", types, None),
        Group(
            "Hours since admission",
            "demographics",
            (index["hours_since_admission"],),
            index["hours_since_admission"],
        ),
    ]
    for item in fd.MEASURED:
        columns = tuple(i for n, i in index.items() if n.split(".", 1)[0] == item.name)
        last = index[f"{item.name}.last"]
        groups.append(Group(feature_label(f"{item.name}.last"), "labs_vitals", columns, last))
    return tuple(groups)


GROUPS: tuple[Group, ...] = _groups()
assert sorted(c for g in GROUPS for c in g.columns) == list(range(fd.N_NUMERIC))

# [G, F]: 1 where the feature belongs to the group.
GROUP_MATRIX = np.zeros((len(GROUPS), fd.N_NUMERIC), np.float32)
for _g, _group in enumerate(GROUPS):
    GROUP_MATRIX[_g, list(_group.columns)] = 1.0

# The optional modalities, in ``mi.MODALITIES`` order: (name shown, reasons' modality).
MODALITY_REASONS: tuple[tuple[str, str], ...] = (
    ("Radiology reports", "notes"),
    ("Previous discharge summary", "notes"),
    ("Chest X-ray", "cxr"),
)
assert len(MODALITY_REASONS) == len(mi.MODALITIES)

# The explanation graph's contributions: one column per group, then one per modality.
N_CONTRIBUTIONS = len(GROUPS) + len(MODALITY_REASONS)
REASON_NAMES: tuple[str, ...] = tuple(g.feature for g in GROUPS) + tuple(
    name for name, _ in MODALITY_REASONS
)
REASON_MODALITIES: tuple[str, ...] = tuple(g.modality for g in GROUPS) + tuple(
    modality for _, modality in MODALITY_REASONS
)

_LAB_SINCE = [fd.NUMERIC_FEATURES.index(f"{i.name}.hours_since_last") for i in LABS]
_VITAL_SINCE = [fd.NUMERIC_FEATURES.index(f"{i.name}.hours_since_last") for i in VITALS]


def raw_values(numeric: np.ndarray, mask: np.ndarray, mean, std) -> np.ndarray:
    """[B, F] float64 feature values as measured (the model's inputs un-normalised), NaN
    where missing."""
    raw = numeric.astype(np.float64) * std + mean
    return np.where(mask > 0, raw, np.nan)


def shown_values(raw: np.ndarray) -> np.ndarray:
    """[B, N_CONTRIBUTIONS] the value shown with each reason, NaN where none."""
    out = np.full((len(raw), N_CONTRIBUTIONS), np.nan)
    for g, group in enumerate(GROUPS):
        if group.value_column is not None:
            out[:, g] = raw[:, group.value_column]
    return out


def _youngest(raw: np.ndarray, columns: list[int]) -> np.ndarray:
    ages = raw[:, columns]
    seen = ~np.isnan(ages).all(axis=1)
    return np.where(seen, np.nanmin(np.where(np.isnan(ages), np.inf, ages), axis=1), np.nan)


def freshness(
    raw: np.ndarray,
    modality_mask: np.ndarray,
    note_hours: np.ndarray,
    cxr_hours: np.ndarray,
    as_of_hours: np.ndarray,
) -> list[dict]:
    """Per admission, the age in hours at feature time of its latest lab, vital, note and
    X-ray (None where there is none) and which of them were absent.

    Args:
        raw: ``raw_values`` [B, F].
        modality_mask: what the model saw [B, 3] (radiology note, discharge note, X-ray).
        note_hours, cxr_hours: [B] epoch hours of the newest note and X-ray (NaN: none).
        as_of_hours: [B] the feature time, epoch hours.
    """
    labs, vitals = _youngest(raw, _LAB_SINCE), _youngest(raw, _VITAL_SINCE)
    has_note = (modality_mask[:, 0] > 0) | (modality_mask[:, 1] > 0)
    has_cxr = modality_mask[:, 2] > 0
    note_age = np.where(has_note, as_of_hours - note_hours, np.nan)
    cxr_age = np.where(has_cxr, as_of_hours - cxr_hours, np.nan)
    out = []
    for row in zip(labs, vitals, note_age, cxr_age, has_note, has_cxr):
        lab, vital, note, cxr, noted, imaged = row
        ages = {
            "lab_age_h": _hours(lab),
            "vital_age_h": _hours(vital),
            "note_age_h": _hours(note),
            "cxr_age_h": _hours(cxr),
        }
        present = {
            "labs": not np.isnan(lab),
            "vitals": not np.isnan(vital),
            "notes": bool(noted),
            "cxr": bool(imaged),
        }
        out.append({**ages, "absent": [name for name, seen in present.items() if not seen]})
    return out


def newest_times(notes) -> tuple[float, float]:
    """Epoch hours of the newest note (this stay's radiology reports or the previous
    admission's discharge summary) and X-ray of ``features.state.Notes``, NaN where none."""
    newest = max([notes.dis_key[0], *(n[0] for n in notes.rad_notes[-1:])])
    return tuple(float(t) if np.isfinite(t) else np.nan for t in (newest, notes.cxr_key[0]))


def _hours(value: float) -> float | None:
    return None if np.isnan(value) else round(max(float(value), 0.0), 2)
