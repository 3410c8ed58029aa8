"""The MIMIC-IV items the model uses, with the ranges a real measurement can take.

Observations are emitted only for these itemids; rows of any other known item are a
counted skip (``itemid_not_used``), not an error. A value outside ``[low, high]`` is not a
clinical extreme but a physical impossibility or a unit mix-up (a negative heart rate, a
sodium of 1400), so it is dead-lettered as ``out_of_range``.

Labels, fluids, categories and units are copied from the MIMIC-IV demo 2.2 dictionaries
(``hosp/d_labitems``, ``icu/d_items``) and the units its ``labevents.valueuom`` carries;
the synthetic generator writes them back out as its own dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Item:
    itemid: int
    name: str  # short feature name used downstream
    kind: Literal["lab", "vital"]
    label: str  # d_labitems.label / d_items.label
    category: str
    unit: str
    low: float  # plausible range, inclusive
    high: float
    fluid: str = "Blood"  # labs only
    abbreviation: str = ""  # vitals only (d_items.abbreviation)


LABS: tuple[Item, ...] = (
    Item(50912, "creatinine", "lab", "Creatinine", "Chemistry", "mg/dL", 0.0, 30.0),
    Item(51006, "bun", "lab", "Urea Nitrogen", "Chemistry", "mg/dL", 0.0, 300.0),
    Item(50983, "sodium", "lab", "Sodium", "Chemistry", "mEq/L", 80.0, 200.0),
    Item(50971, "potassium", "lab", "Potassium", "Chemistry", "mEq/L", 0.5, 15.0),
    Item(50882, "bicarbonate", "lab", "Bicarbonate", "Chemistry", "mEq/L", 0.0, 70.0),
    Item(50931, "glucose", "lab", "Glucose", "Chemistry", "mg/dL", 0.0, 3000.0),
    Item(51222, "hemoglobin", "lab", "Hemoglobin", "Hematology", "g/dL", 0.0, 30.0),
    Item(51301, "wbc", "lab", "White Blood Cells", "Hematology", "K/uL", 0.0, 1000.0),
    Item(51265, "platelets", "lab", "Platelet Count", "Hematology", "K/uL", 0.0, 5000.0),
    Item(50813, "lactate", "lab", "Lactate", "Blood Gas", "mmol/L", 0.0, 50.0),
)

VITALS: tuple[Item, ...] = (
    Item(
        220045,
        "heart_rate",
        "vital",
        "Heart Rate",
        "Routine Vital Signs",
        "bpm",
        0.0,
        350.0,
        abbreviation="HR",
    ),
    Item(
        220179,
        "sbp",
        "vital",
        "Non Invasive Blood Pressure systolic",
        "Routine Vital Signs",
        "mmHg",
        0.0,
        400.0,
        abbreviation="NBPs",
    ),
    Item(
        220180,
        "dbp",
        "vital",
        "Non Invasive Blood Pressure diastolic",
        "Routine Vital Signs",
        "mmHg",
        0.0,
        300.0,
        abbreviation="NBPd",
    ),
    Item(
        220210,
        "resp_rate",
        "vital",
        "Respiratory Rate",
        "Respiratory",
        "insp/min",
        0.0,
        150.0,
        abbreviation="RR",
    ),
    Item(
        220277,
        "spo2",
        "vital",
        "O2 saturation pulseoxymetry",
        "Respiratory",
        "%",
        0.0,
        100.0,
        abbreviation="SpO2",
    ),
    Item(
        223761,
        "temperature_f",
        "vital",
        "Temperature Fahrenheit",
        "Routine Vital Signs",
        "°F",
        75.0,
        115.0,
        abbreviation="Temperature F",
    ),
)

ITEMS: dict[int, Item] = {item.itemid: item for item in LABS + VITALS}
LAB_IDS = frozenset(item.itemid for item in LABS)
VITAL_IDS = frozenset(item.itemid for item in VITALS)
# Order of the numeric features (one per item), for whoever builds feature vectors.
FEATURE_NAMES: tuple[str, ...] = tuple(item.name for item in LABS + VITALS)
