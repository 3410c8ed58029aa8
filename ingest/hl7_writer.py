"""A cohort's events as the HL7 v2 message stream a hospital's interface engine would send.

Each event becomes one message, in event-time order, that ``ingest.hl7`` maps back to the
same event (all but its id and source), so a cohort streamed through the MLLP listener
gives the features ``m3t ingest replay`` gives:

- ``admission`` -> ``ADT^A01`` (PV1-4 the admission type's code, PID-7 a birth date giving
  the age in whole years at the admit time); ``discharge`` -> ``ADT^A03``; ``transfer`` ->
  ``ADT^A02`` (PV1-3 the careunit, EVN-6 its time); ``cancel`` -> ``ADT^A11/A12/A13``;
- ``observation`` -> ``ORU^R01`` with one ``NM`` OBX (its LOINC code, the item's unit,
  OBX-14 the chart time, OBX-19 when it was available), OBX-11 its status and, where it
  has a result id, OBR-3 the filler order number;
- ``note`` -> ``MDM^T02`` (TXA-2 RAD or DS, the text one TX OBX a line; PV1-50 the stay a
  discharge summary was written in);
- ``cxr`` -> ``ORU^R01`` with an ``RP`` OBX pointing at the image.

Written one segment a line, a blank line between messages (``m3t ingest send-hl7`` reads
it). Text is escaped by HL7's rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from ingest import events as ev
from ingest import itemids, loinc
from ingest.hl7 import ADMISSION_TYPE_CODES

SENDER = "M3TSYNTH|HOSP|M3T|M3T"
CANCEL_TRIGGERS = {"admission": "A11", "transfer": "A12", "discharge": "A13"}
STATUS_CODES = {"final": "F", "preliminary": "P", "corrected": "C"}
DOCUMENT_CODES = {"radiology": "RAD", "discharge": "DS"}
IMAGING = "18748-4^Diagnostic imaging study^LN"


def _unconverted(entry: loinc.Code) -> str:
    """A unit the code takes without converting the value (the item's own)."""
    probes = (0.1, 1.2345, 98.6, 1000.0)
    return next(u for u, convert in entry.units.items() if all(convert(x) == x for x in probes))


# itemid -> (its LOINC code, a unit ingest.hl7 takes unconverted)
_CODES: dict[int, tuple[str, str]] = {}
for _code, _entry in loinc.BY_LOINC.items():
    _CODES.setdefault(_entry.itemid, (_code, _unconverted(_entry)))


def ts(moment: datetime) -> str:
    """HL7 TS to the second, in the event's UTC clock (no offset: read back as given)."""
    return moment.strftime("%Y%m%d%H%M%S")


def escape(text: str) -> str:
    """HL7's escapes for the separators (the escape character first)."""
    for char, code in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\")):
        text = text.replace(char, code)
    return text.replace("&", "\\T\\")


class Hl7Writer:
    """Messages for a cohort's events; it keeps each admission's admit time and patient,
    which every ADT message repeats."""

    def __init__(self):
        self.count = 0
        self.admitted: dict[int, ev.AdmissionEvent] = {}

    def messages(self, events: Iterable) -> Iterator[str]:
        for event in sorted(events, key=ev.sort_key):
            if event.type == "admission":
                self.admitted.setdefault(event.hadm_id, event)
            yield self.message(event)

    def message(self, event) -> str:
        self.count += 1
        build = getattr(self, f"_{event.type}")
        segments = build(event)
        return "\r".join(segments) + "\r"

    # -- segments

    def _msh(self, kind: str, event) -> str:
        return f"MSH|^~\\&|{SENDER}|{ts(event.event_time)}||{kind}|M{self.count:09d}|P|2.5"

    def _pid(self, event) -> str:
        admitted = self.admitted.get(event.hadm_id)
        if admitted is None:
            return f"PID|1||{event.subject_id}^^^HOSP^MR"
        p = admitted.payload
        return (
            f"PID|1||{event.subject_id}^^^HOSP^MR||Doe^Pat||{_born(p.admittime, p.age)}|{p.gender}"
        )

    def _pv1(self, event, *, unit: str = "", kind_code: str = "", disch: str = "", **extra) -> str:
        admitted = self.admitted.get(event.hadm_id)
        fields = [""] * 51
        fields[0] = "PV1"
        fields[1] = "1"
        fields[2] = "I"
        fields[3] = escape(unit)
        fields[4] = kind_code
        fields[19] = str(event.hadm_id)
        if admitted is not None:
            fields[44] = ts(admitted.payload.admittime)
        fields[45] = disch
        for position, value in extra.items():
            fields[int(position[1:])] = value
        return "|".join(fields).rstrip("|")

    def _admission(self, event) -> list[str]:
        self.admitted.setdefault(event.hadm_id, event)
        code = ADMISSION_TYPE_CODES.get(event.payload.admission_type, "")
        admitted = self.admitted[event.hadm_id]
        trigger = "A01" if admitted is event else "A08"
        if trigger == "A08":  # the admission re-sent: the update carries it
            self.admitted[event.hadm_id] = event
        return [
            self._msh(f"ADT^{trigger}", event),
            f"EVN|{trigger}|{ts(event.event_time)}",
            self._pid(event),
            self._pv1(event, kind_code=code),
        ]

    def _discharge(self, event) -> list[str]:
        p = event.payload
        return [
            self._msh("ADT^A03", event),
            f"EVN|A03|{ts(event.event_time)}",
            self._pid(event),
            self._pv1(event, disch=ts(p.dischtime), f36="20" if p.hospital_expire_flag else "01"),
        ]

    def _transfer(self, event) -> list[str]:
        return [
            self._msh("ADT^A02", event),
            f"EVN|A02|{ts(event.event_time)}||||{ts(event.event_time)}",
            self._pid(event),
            self._pv1(event, unit=event.payload.careunit),
        ]

    def _cancel(self, event) -> list[str]:
        trigger = CANCEL_TRIGGERS[event.payload.cancels]
        return [
            self._msh(f"ADT^{trigger}", event),
            f"EVN|{trigger}|{ts(event.event_time)}",
            self._pid(event),
            self._pv1(event),
        ]

    def _observation(self, event) -> list[str]:
        p = event.payload
        item = itemids.ITEMS[p.itemid]
        code, unit = _CODES[p.itemid]
        filler = escape(p.result_id) if p.result_id else ""
        return [
            self._msh("ORU^R01", event),
            self._pid(event),
            self._pv1(event),
            f"OBR|1||{filler}|{code}^{escape(item.label)}^LN|||{ts(p.charttime)}",
            f"OBX|1|NM|{code}^{escape(item.label)}^LN||{p.value!r}|{escape(unit)}"
            f"|||||{STATUS_CODES[p.status]}|||{ts(p.charttime)}|||||{ts(event.event_time)}",
        ]

    def _note(self, event) -> list[str]:
        p = event.payload
        lines = p.text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        extra = {"f50": str(p.from_hadm_id)} if p.note_type == "discharge" else {}
        return [
            self._msh("MDM^T02", event),
            f"EVN|T02|{ts(event.event_time)}",
            self._pid(event),
            self._pv1(event, **extra),
            f"TXA|1|{DOCUMENT_CODES[p.note_type]}|TX|{ts(p.charttime)}"
            + "|" * 8
            + escape(p.note_id),
            *(f"OBX|{n}|TX|||{escape(line)}" for n, line in enumerate(lines, 1)),
        ]

    def _cxr(self, event) -> list[str]:
        p = event.payload
        return [
            self._msh("ORU^R01", event),
            self._pid(event),
            self._pv1(event),
            f"OBR|1||{p.study_id}|{IMAGING}|||{ts(p.studytime)}",
            f"OBX|1|RP|{IMAGING}|{escape(p.dicom_id)}|{escape(p.uri)}||||||F",
        ]


def _born(admitted: datetime, age: float) -> str:
    """A birth date at which the patient is ``age`` whole years old on ``admitted``."""
    day = min(admitted.day, 28)  # on or before the admit day of its month: the birthday passed
    return f"{admitted.year - int(age):04d}{admitted.month:02d}{day:02d}"


def write(events: Iterable, path: Path) -> int:
    """The messages for ``events``, one segment a line, a blank line between messages;
    returns how many."""
    writer = Hl7Writer()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for message in writer.messages(events):
            out.write(message.replace("\r", "\n") + "\n")
    return writer.count
