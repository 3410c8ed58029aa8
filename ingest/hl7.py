"""HL7 v2.x messages into the event contract (``ingest.events``), parsed with python-hl7.

What is taken (fields by their HL7 numbers):

- ``ADT^A01``/``A04`` -> an ``admission``: PID-3 (first id) the subject, PV1-19 (visit
  number) the admission, PV1-44 the admit time, PV1-4 (admission type, else PV1-2 patient
  class) mapped to MIMIC's admission types by ``ADMISSION_TYPES``, PID-8 the sex (M or F),
  the age in whole years from PID-7 (birth date) at the admit time.
- ``ADT^A03`` -> a ``discharge``: PV1-45 the discharge time, the stay from PV1-44;
  died in hospital when PV1-36 (discharge disposition) is an expired code of the UB-04
  patient status (``EXPIRED_DISPOSITIONS``: 20, 40, 41, 42) or PID-30 (death indicator) is Y.
- ``ORU^R01`` -> one ``observation`` per numeric result (OBX-2 ``NM``): OBX-3 a LOINC code
  of ``ingest.loinc`` (its unit, OBX-6, converted into the item's); results of other value
  types (text, coded) are not features and are passed over. The event is timed when the
  result was available, OBX-19 (analysis time), else OBR-22 (result reported), else when it
  was observed; the chart time is OBX-14, else OBR-7. Result status (OBX-11) F, P, R, C or
  empty is taken (a correction is one more value for now).

Times (HL7 TS, to the minute at least) with a UTC offset are converted to UTC; without one
they are taken as the contract takes MIMIC's, as given. ``event_id`` is derived from the
sender (MSH-3, MSH-4), the message control id (MSH-10) and the segment's position, so a
resent message produces identical events.

Anything else is refused with a ``Refused`` whose ``reason`` is one of ``REASONS`` and whose
detail names a field or a segment by position, never a value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import hl7
from pydantic import ValidationError

from ingest import events as ev
from ingest import itemids, loinc

ENCODING_CHARACTERS = "^~\\&"
# HL7 table 0007 admission type, else table 0004 patient class -> MIMIC's admission_type.
ADMISSION_TYPES = {
    "E": "EW EMER.",  # emergency
    "A": "EW EMER.",  # accident
    "U": "URGENT",
    "C": "ELECTIVE",  # elective
    "R": "ELECTIVE",  # routine
    "L": "URGENT",  # labour and delivery
    "N": "URGENT",  # newborn
}
PATIENT_CLASSES = {"E": "EW EMER.", "I": "URGENT", "O": "AMBULATORY OBSERVATION"}
EXPIRED_DISPOSITIONS = frozenset({"20", "40", "41", "42"})
RESULT_STATUSES = frozenset({"F", "P", "R", "C", ""})
ADMITS, DISCHARGES, RESULTS = {"ADT^A01", "ADT^A04"}, {"ADT^A03"}, {"ORU^R01"}
# Why a message was refused, and whether it is rejected outright (AR: the message itself
# cannot be processed) or in error (AE: its content breaks a rule).
REASONS = {
    "invalid_utf8": "AR",
    "malformed_message": "AR",
    "malformed_segment": "AR",
    "wrong_encoding_characters": "AR",
    "unsupported_message": "AR",
    "missing_field": "AE",
    "invalid_field": "AE",
    "unknown_loinc": "AE",
    "unknown_unit": "AE",
    "unsupported_result_status": "AE",
    "invalid_event": "AE",
}
_SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}(\||$)")
_TS = re.compile(r"(\d{12})(\d{2})?(?:\.\d+)?([+-]\d{4})?$")


class Refused(ValueError):
    """A message that cannot be taken; ``reason`` is short and stable, ``detail`` names a
    field or segment by position and never carries a value (it may be patient data)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    @property
    def ack_code(self) -> str:
        return REASONS[self.reason]


@dataclass(frozen=True)
class Header:
    """What an acknowledgement needs from MSH (raw, still escaped: safe to copy back)."""

    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5"


@dataclass(frozen=True)
class Mapped:
    header: Header
    events: list


def parse(raw: bytes | str) -> hl7.Message:
    """Decode, check the framing of segments and the encoding characters, and parse."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise Refused("invalid_utf8", "not UTF-8") from None
    text = raw.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Refused("malformed_message", "no MSH segment first")
    if text[3:9] != "|" + ENCODING_CHARACTERS + "|" and text[3:10] != "|^~\\&#|":
        raise Refused("wrong_encoding_characters", "MSH-1/MSH-2")
    for n, segment in enumerate(text.split("\r"), 1):
        if not _SEGMENT.match(segment):
            raise Refused("malformed_segment", f"segment {n}")
    try:
        return hl7.parse(text)
    except Exception as exc:  # the library's own parse errors have no common base
        raise Refused("malformed_message", type(exc).__name__) from None


def header(message: hl7.Message) -> Header:
    msh = message.segment("MSH")
    return Header(
        sending_application=_raw(msh, 3),
        sending_facility=_raw(msh, 4),
        receiving_application=_raw(msh, 5),
        receiving_facility=_raw(msh, 6),
        message_type=_get(message, "MSH", 9, component=1),
        trigger=_get(message, "MSH", 9, component=2),
        control_id=_get(message, "MSH", 10),
        processing_id=_raw(msh, 11) or "P",
        version=_raw(msh, 12) or "2.5",
    )


def to_events(raw: bytes | str) -> Mapped:
    """The events one message says, each validated by the contract; or ``Refused``."""
    message = parse(raw)
    head = header(message)
    if not head.control_id:
        raise Refused("missing_field", "MSH-10")
    kind = f"{head.message_type}^{head.trigger}"
    if kind in ADMITS:
        mapped = [_admission(message, head, kind)]
    elif kind in DISCHARGES:
        mapped = [_discharge(message, head, kind)]
    elif kind in RESULTS:
        mapped = _observations(message, head, kind)
    else:
        raise Refused("unsupported_message", "MSH-9")
    try:
        return Mapped(head, [ev.validate(event) for event in mapped])
    except ev.InvalidEvent as exc:
        raise Refused("invalid_event", exc.detail or exc.reason) from None


# --------------------------------------------------------------------------- messages


def _admission(message: hl7.Message, head: Header, kind: str) -> ev.AdmissionEvent:
    admitted = _time(message, "PV1", 44, required=True)
    sex = _required(message, "PID", 8)
    if sex not in ("M", "F"):
        raise Refused("invalid_field", "PID-8")
    born = _time(message, "PID", 7, required=True, date_only=True)
    age = _years_between(born, admitted)
    if not 0 <= age <= 120:
        raise Refused("invalid_field", "PID-7")
    return _build(
        ev.AdmissionEvent,
        message,
        head,
        kind,
        segment=("PV1", 1),
        event_time=admitted,
        payload=dict(
            admittime=admitted, admission_type=_admission_type(message), gender=sex, age=age
        ),
    )


def _discharge(message: hl7.Message, head: Header, kind: str) -> ev.DischargeEvent:
    admitted = _time(message, "PV1", 44, required=True)
    discharged = _time(message, "PV1", 45, required=True)
    if discharged < admitted:
        raise Refused("invalid_field", "PV1-45")
    died = (
        _get(message, "PV1", 36) in EXPIRED_DISPOSITIONS or _get(message, "PID", 30).upper() == "Y"
    )
    return _build(
        ev.DischargeEvent,
        message,
        head,
        kind,
        segment=("PV1", 1),
        event_time=discharged,
        payload=dict(
            dischtime=discharged,
            los_days=(discharged - admitted) / timedelta(days=1),
            hospital_expire_flag=died,
        ),
    )


def _observations(message: hl7.Message, head: Header, kind: str) -> list[ev.ObservationEvent]:
    observed = []
    results = message.segments("OBX") if _has(message, "OBX") else []
    for n in range(1, len(results) + 1):
        if _get(message, "OBX", 2, n=n) != "NM":
            continue
        code = _get(message, "OBX", 3, n=n)
        system = _get(message, "OBX", 3, n=n, component=3)
        entry = loinc.BY_LOINC.get(code)
        if entry is None or system not in ("LN", ""):
            raise Refused("unknown_loinc", f"OBX {n}: OBX-3")
        convert = entry.units.get(loinc.normalise_unit(_get(message, "OBX", 6, n=n)))
        if convert is None:
            raise Refused("unknown_unit", f"OBX {n}: OBX-6")
        if _get(message, "OBX", 11, n=n) not in RESULT_STATUSES:
            raise Refused("unsupported_result_status", f"OBX {n}: OBX-11")
        try:
            value = convert(float(_get(message, "OBX", 5, n=n)))
        except ValueError:
            raise Refused("invalid_field", f"OBX {n}: OBX-5") from None
        if not math.isfinite(value):
            raise Refused("invalid_field", f"OBX {n}: OBX-5")
        charted = _time(message, "OBX", 14, n=n) or _time(message, "OBR", 7)
        available = _time(message, "OBX", 19, n=n) or _time(message, "OBR", 22) or charted
        if charted is None:
            raise Refused("missing_field", f"OBX {n}: OBX-14")
        item = itemids.ITEMS[entry.itemid]
        observed.append(
            _build(
                ev.ObservationEvent,
                message,
                head,
                kind,
                segment=("OBX", n),
                event_time=available,
                payload=dict(
                    itemid=item.itemid,
                    value=value,
                    unit=item.unit,
                    charttime=charted,
                    kind=item.kind,
                ),
            )
        )
    return observed


def _build(event_type, message, head: Header, kind: str, *, segment, event_time, payload):
    sender = f"{head.sending_application}^{head.sending_facility}"
    name, n = segment
    try:
        return event_type(
            event_id=ev.event_id(f"hl7:{sender}", f"{head.control_id}/{name}/{n}"),
            hadm_id=_id(message, "PV1", 19),
            subject_id=_id(message, "PID", 3),
            event_time=event_time,
            source=f"hl7/{kind}",
            payload=payload,
        )
    except ValidationError as exc:  # the field and the rule, never the value
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Refused("invalid_event", f"{where}: {first['type']}") from None


def _admission_type(message: hl7.Message) -> str:
    admission_type = ADMISSION_TYPES.get(_get(message, "PV1", 4))
    return admission_type or PATIENT_CLASSES.get(_get(message, "PV1", 2), "")


# --------------------------------------------------------------------------- fields


def _has(message: hl7.Message, segment: str) -> bool:
    return any(str(s[0]) == segment for s in message)


def _get(message: hl7.Message, segment: str, field: int, *, n: int = 1, component: int = 1):
    """The field's first repetition's component, unescaped; empty when absent."""
    if not _has(message, segment):
        return ""
    return message.extract_field(segment, n, field, 1, component).strip()


def _raw(msh, field: int) -> str:
    """MSH's field as sent (still escaped), empty when absent; MSH's numbers are HL7's."""
    try:
        return str(msh(field))
    except IndexError:
        return ""


def _required(message: hl7.Message, segment: str, field: int) -> str:
    value = _get(message, segment, field)
    if not value:
        raise Refused("missing_field", f"{segment}-{field}")
    return value


def _id(message: hl7.Message, segment: str, field: int) -> int:
    value = _required(message, segment, field)
    if not value.isdigit() or int(value) > ev.INT64_MAX:
        raise Refused("invalid_field", f"{segment}-{field}")
    return int(value)


def _time(message, segment, field, *, n=1, required=False, date_only=False) -> datetime | None:
    value = _get(message, segment, field, n=n)
    if not value:
        if required:
            raise Refused("missing_field", f"{segment}-{field}")
        return None
    if date_only and len(value) == 8:
        value += "0000"
    match = _TS.match(value)
    try:
        if match is None:
            raise ValueError
        seconds = match.group(2) or "00"
        moment = datetime.strptime(match.group(1) + seconds, "%Y%m%d%H%M%S")
        if offset := match.group(3):
            sign = 1 if offset[0] == "+" else -1
            shift = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
            moment = (moment - sign * shift).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise Refused("invalid_field", f"{segment}-{field}") from None
    return moment


def _years_between(born: datetime, at: datetime) -> float:
    years = at.year - born.year - ((at.month, at.day) < (born.month, born.day))
    return float(years)
