"""LOINC codes of the results a feed may send, mapped to the feature items (``ingest.itemids``).

The one table of the HL7 door: a result whose LOINC code is not here, or whose unit is not
one its code lists, is refused (``unknown_loinc``, ``unknown_unit``), never guessed. Each
unit carries the factor that converts a value in it into the item's MIMIC unit (creatinine
in umol/L: divided by 88.42 into mg/dL). Units are matched without regard to case or
spaces, as senders spell UCUM loosely (``mg/dl``, ``10*3/uL``); a temperature in degrees
Celsius is the one conversion that is not a factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ingest import itemids

Convert = Callable[[float], float]


def _factor(factor: float) -> Convert:
    return lambda value: value * factor


def _celsius_to_fahrenheit(value: float) -> float:
    return value * 9 / 5 + 32


SAME = _factor(1.0)
MMOL = ("mmol/l", "meq/l")
THOUSANDS_PER_UL = ("10*3/ul", "k/ul", "10^3/ul", "10*9/l", "10^9/l", "x10e3/ul")
PER_MINUTE = ("/min", "bpm", "{beats}/min", "{breaths}/min", "beats/min", "breaths/min")
MMHG = ("mm[hg]", "mmhg")


@dataclass(frozen=True)
class Code:
    loinc: str
    itemid: int
    units: dict[str, Convert]  # normalised unit -> conversion into the item's unit

    def observation(self, value: float, **fields) -> dict:
        """An observation's payload (``ingest.events.ObservationPayload``) of ``value``,
        already in the item's unit: the item's id, unit and kind, and ``fields``
        (charttime, result_id, status). ValueError when ``value`` is not finite."""
        if not math.isfinite(value):
            raise ValueError("not a finite value")
        item = itemids.ITEMS[self.itemid]
        return dict(itemid=item.itemid, value=value, unit=item.unit, kind=item.kind, **fields)


def _units(*pairs: tuple[tuple[str, ...] | str, Convert]) -> dict[str, Convert]:
    table: dict[str, Convert] = {}
    for names, convert in pairs:
        for name in (names,) if isinstance(names, str) else names:
            table[normalise_unit(name)] = convert
    return table


def normalise_unit(unit: str) -> str:
    return "".join(unit.split()).lower()


_GLUCOSE = _units(("mg/dl", SAME), ("mmol/l", _factor(18.016)))
_LACTATE = _units(("mmol/l", SAME), ("mg/dl", _factor(1 / 9.008)))
_CREATININE = _units(("mg/dl", SAME), ("umol/l", _factor(1 / 88.42)))

CODES: tuple[Code, ...] = (
    Code("2160-0", 50912, _CREATININE),  # creatinine, serum or plasma
    Code("14682-9", 50912, _CREATININE),  # creatinine, serum or plasma, molar
    Code("3094-0", 51006, _units(("mg/dl", SAME))),  # urea nitrogen, serum or plasma
    Code("6299-2", 51006, _units(("mg/dl", SAME))),  # urea nitrogen, blood
    Code("2951-2", 50983, _units((MMOL, SAME))),  # sodium, serum or plasma
    Code("2947-0", 50983, _units((MMOL, SAME))),  # sodium, blood
    Code("2823-3", 50971, _units((MMOL, SAME))),  # potassium, serum or plasma
    Code("6298-4", 50971, _units((MMOL, SAME))),  # potassium, blood
    Code("1963-8", 50882, _units((MMOL, SAME))),  # bicarbonate, serum or plasma
    Code("2028-9", 50882, _units((MMOL, SAME))),  # carbon dioxide total, serum or plasma
    Code("2345-7", 50931, _GLUCOSE),  # glucose, serum or plasma
    Code("14749-6", 50931, _GLUCOSE),  # glucose, serum or plasma, molar
    Code("718-7", 51222, _units(("g/dl", SAME), ("g/l", _factor(0.1)))),  # hemoglobin
    Code("6690-2", 51301, _units((THOUSANDS_PER_UL, SAME))),  # leukocytes
    Code("777-3", 51265, _units((THOUSANDS_PER_UL, SAME))),  # platelets
    Code("2524-7", 50813, _LACTATE),  # lactate, serum or plasma
    Code("32693-4", 50813, _LACTATE),  # lactate, blood
    Code("8867-4", 220045, _units((PER_MINUTE, SAME))),  # heart rate
    Code("8480-6", 220179, _units((MMHG, SAME))),  # systolic blood pressure
    Code("8462-4", 220180, _units((MMHG, SAME))),  # diastolic blood pressure
    Code("9279-1", 220210, _units((PER_MINUTE, SAME))),  # respiratory rate
    Code("59408-5", 220277, _units(("%", SAME))),  # SpO2 by pulse oximetry
    Code("2708-6", 220277, _units(("%", SAME))),  # oxygen saturation, arterial
    Code("8310-5", 223761, _units((("[degf]", "degf"), SAME), ("cel", _celsius_to_fahrenheit))),
)

BY_LOINC: dict[str, Code] = {code.loinc: code for code in CODES}
assert all(code.itemid in itemids.ITEMS for code in CODES), "a LOINC code maps to no item"
