"""HL7 v2.x messages into the event contract (``ingest.events``), parsed with python-hl7.

What is taken (fields by their HL7 numbers):

- ``ADT^A01``/``A04`` -> an ``admission``: PID-3 (first id) the subject, PV1-19 (visit
  number) the admission, PV1-44 the admit time, PV1-4 (admission type, else PV1-2 patient
  class) mapped to MIMIC's admission types by ``ADMISSION_TYPES``, PID-8 the sex (M or F),
  the age in whole years from PID-7 (birth date) at the admit time.
- ``ADT^A03`` -> a ``discharge``: PV1-45 the discharge time, the stay from PV1-44;
  died in hospital when PV1-36 (discharge disposition) is an expired code of the UB-04
  patient status (``EXPIRED_DISPOSITIONS``: 20, 40, 41, 42) or PID-30 (death indicator) is Y.
- ``ADT^A01``/``A04`` with PV1-3 (assigned location) also -> a ``transfer`` into its point of
  care (PV1-3.1) at the admit time; ``ADT^A02`` -> a ``transfer`` into PV1-3.1 at EVN-6
  (event occurred), else EVN-2 (recorded), else MSH-7.
- ``ADT^A08`` -> the ``admission`` again (an update: the one sent last gives the
  demographics), timed at EVN-2, else MSH-7.
- ``ADT^A11``, ``A12``, ``A13`` -> a ``cancel`` of the admission, the transfer, the
  discharge, timed at EVN-2, else MSH-7 (it undoes what it cancels dated at or before it).
- ``ORU^R01`` -> one ``observation`` per numeric result (OBX-2 ``NM``): OBX-3 a LOINC code
  of ``ingest.loinc`` (its unit, OBX-6, converted into the item's); results of other value
  types (text, coded) are not features and are passed over. The event is timed when the
  result was available, OBX-19 (analysis time), else OBR-22 (result reported), else when it
  was observed; the chart time is OBX-14, else OBR-7. The result's id is OBR-3 (filler
  order number), OBX-3 and OBX-4 (sub-id), when OBR-3 is given; its status OBX-11: C
  corrected (it replaces the value of the same result), P preliminary, F, R or empty final.

- ``MDM^T02`` -> a ``note``: TXA-2 the document type (``RAD`` a radiology report, ``DS`` a
  discharge summary), TXA-4 the chart time, TXA-12 the note id, the text the TX/FT OBX
  values one a line; timed at EVN-2, else MSH-7. A discharge summary is of an earlier stay,
  named by PV1-50 (alternate visit id), and is sent into the new admission (PV1-19).
- ``ORU^R01`` whose OBR-4 (universal service id) names a radiology report (LOINC 18748-4
  or a text with "radiology") or a discharge summary (18842-5, "discharge summary") ->
  a ``note`` from its TX/FT OBX values: OBR-3 the note id, OBR-7 the chart time, timed at
  OBR-22, else MSH-7.
- ``ORU^R01`` OBX of type ``RP`` (reference pointer) -> a ``cxr``: OBX-5.1 the image URI,
  which must lie under the configured image roots (else ``image_refused``), OBR-3 the
  study id, OBX-4 the DICOM id, OBR-7 the study time (also the event time).

A result's order fields (OBR-3, OBR-7, OBR-22) are those of the OBR it follows, and a
report's text is the TX/FT OBX under its own OBR. A frame holds one message, with one PID
and one PV1 (a second is ``unsupported_message``). Escape sequences are undone here
(``_unescape``), never logged, with formatting counts capped.

Times (HL7 TS, to the minute at least) with a UTC offset are converted to UTC; without one
they are taken as the contract takes MIMIC's, as given. ``event_id`` is derived from the
sender (MSH-3, MSH-4), the message control id (MSH-10) and the segment's position, so a
resent message produces identical events.

Anything else is refused with a ``Refused`` whose ``reason`` is one of ``REASONS`` and whose
detail names a field or a segment by position, never a value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

import hl7
from pydantic import ValidationError

from ingest import events as ev
from ingest import loinc

ENCODING_CHARACTERS = "^~\\&"
# HL7 table 0007 admission type, else table 0004 patient class -> MIMIC's admission_type.
# Table 0007 is user-defined: the two-letter codes are this site's for MIMIC's other types.
ADMISSION_TYPES = {
    "E": "EW EMER.",  # emergency
    "A": "EW EMER.",  # accident
    "U": "URGENT",
    "C": "ELECTIVE",  # elective
    "R": "ELECTIVE",  # routine
    "L": "URGENT",  # labour and delivery
    "N": "URGENT",  # newborn
    "OA": "OBSERVATION ADMIT",
    "AO": "AMBULATORY OBSERVATION",
    "DE": "DIRECT EMER.",
    "DO": "DIRECT OBSERVATION",
    "EO": "EU OBSERVATION",
    "SD": "SURGICAL SAME DAY ADMISSION",
}
# The code each admission type is sent with (ingest.hl7_writer).
ADMISSION_TYPE_CODES = {"EW EMER.": "E", "URGENT": "U", "ELECTIVE": "C"} | {
    kind: code for code, kind in ADMISSION_TYPES.items() if len(code) == 2
}
DOCUMENT_TYPES = {"RAD": "radiology", "DS": "discharge"}
# OBR-4 of a report: LOINC code or words -> note type.
REPORT_CODES = {"18748-4": "radiology", "18842-5": "discharge"}
REPORT_WORDS = (("discharge summary", "discharge"), ("radiology", "radiology"))
TEXT_TYPES = frozenset({"TX", "FT"})
PATIENT_CLASSES = {"E": "EW EMER.", "I": "URGENT", "O": "AMBULATORY OBSERVATION"}
EXPIRED_DISPOSITIONS = frozenset({"20", "40", "41", "42"})
RESULT_STATUSES = {"F": "final", "R": "final", "": "final", "P": "preliminary", "C": "corrected"}
ADMITS, DISCHARGES, RESULTS = {"ADT^A01", "ADT^A04"}, {"ADT^A03"}, {"ORU^R01"}
DOCUMENTS = {"MDM^T02"}
TRANSFERS, UPDATES = {"ADT^A02"}, {"ADT^A08"}
CANCELS = {"ADT^A11": "admission", "ADT^A12": "transfer", "ADT^A13": "discharge"}
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
    "unsupported_document": "AE",
    "image_refused": "AE",
    "invalid_event": "AE",
}
ONCE = ("MSH", "PID", "PV1")  # segments a message here carries at most once
_SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}(\||$)")
# Escape sequences (2.7): separators, highlighting, and formatting commands for plain text.
_ESCAPE = re.compile(r"\\([^\\]*)\\")
_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", "H": "", "N": ""} | {
    ".br": "\n",
    ".ce": "\n",
    ".fi": "",
    ".nf": "",
}
_FORMATTING = re.compile(r"(\.sp|\.sk|\.in|\.ti)([+-]?[0-9]{1,9})?")
_REPEATED = {".sp": "\n", ".sk": " ", ".in": " ", ".ti": " "}
MAX_REPEAT = 10  # a formatting count is capped: "\.sp400000000\" is not 400 MB of lines
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
    names = []
    for n, segment in enumerate(text.split("\r"), 1):
        if not _SEGMENT.match(segment):
            raise Refused("malformed_segment", f"segment {n}")
        names.append(segment[:3])
    for name in ONCE:  # a second message in the frame, or a second patient or visit
        if names.count(name) > 1:
            raise Refused("unsupported_message", f"{name} repeated")
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
        message_type=_code(_get(message, "MSH", 9, component=1)),
        trigger=_code(_get(message, "MSH", 9, component=2)),
        control_id=_raw(msh, 10),
        processing_id=_raw(msh, 11) or "P",
        version=_raw(msh, 12) or "2.5",
    )


def to_events(raw: bytes | str, image_roots: tuple[Path, ...] | None = None) -> Mapped:
    """The events one message says, each validated by the contract; or ``Refused``.
    ``image_roots``: where an image reference may point (None: not checked here)."""
    try:
        return _mapped(parse(raw), image_roots)
    except Refused:
        raise
    except Exception as exc:  # what no rule foresaw is refused, never a dropped connection
        raise Refused("malformed_message", type(exc).__name__) from None


def _mapped(message: hl7.Message, image_roots: tuple[Path, ...] | None) -> Mapped:
    head = header(message)
    if not head.control_id:
        raise Refused("missing_field", "MSH-10")
    kind = f"{head.message_type}^{head.trigger}"
    if kind in ADMITS:
        admission = _admission(message, head, kind)
        mapped = [
            admission,
            *_transfer(message, head, kind, admission.payload.admittime, required=False),
        ]
    elif kind in UPDATES:
        mapped = [_admission(message, head, kind, sent=_sent(message))]
    elif kind in TRANSFERS:
        when = _time(message, "EVN", 6) or _sent(message)
        mapped = _transfer(message, head, kind, when, required=True)
    elif kind in CANCELS:
        mapped = [_cancel(message, head, kind)]
    elif kind in DISCHARGES:
        mapped = [_discharge(message, head, kind)]
    elif kind in RESULTS:
        mapped = _observations(message, head, kind)
        mapped += _report(message, head, kind) + _images(message, head, kind, image_roots)
    elif kind in DOCUMENTS:
        mapped = [_document(message, head, kind)]
    else:
        raise Refused("unsupported_message", "MSH-9")
    try:
        return Mapped(head, [ev.validate(event) for event in mapped])
    except ev.InvalidEvent as exc:
        raise Refused("invalid_event", exc.detail or exc.reason) from None


# --------------------------------------------------------------------------- messages


def _sent(message: hl7.Message) -> datetime:
    """When the message's event was recorded: EVN-2, else the message time MSH-7."""
    when = _time(message, "EVN", 2) or _time(message, "MSH", 7)
    if when is None:
        raise Refused("missing_field", "EVN-2")
    return when


def _transfer(message, head: Header, kind: str, when, *, required: bool) -> list:
    unit = _get(message, "PV1", 3)
    if not unit:
        if required:
            raise Refused("missing_field", "PV1-3")
        return []
    return [
        _build(
            ev.TransferEvent,
            message,
            head,
            kind,
            segment=("PV1", 3),
            event_time=when,
            payload=dict(careunit=unit, intime=when),
        )
    ]


def _cancel(message: hl7.Message, head: Header, kind: str) -> ev.CancelEvent:
    return _build(
        ev.CancelEvent,
        message,
        head,
        kind,
        segment=("EVN", 1),
        event_time=_sent(message),
        payload=dict(cancels=CANCELS[kind]),
    )


def _admission(
    message: hl7.Message, head: Header, kind: str, sent: datetime | None = None
) -> ev.AdmissionEvent:
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
        event_time=sent or admitted,
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
    for n in _results_of_type(message, "NM"):
        order = _order_of(message)[n]  # the OBR this result is under
        code = _get(message, "OBX", 3, n=n)
        system = _get(message, "OBX", 3, n=n, component=3)
        entry = loinc.BY_LOINC.get(code)
        if entry is None or system not in ("LN", ""):
            raise Refused("unknown_loinc", f"OBX {n}: OBX-3")
        convert = entry.units.get(loinc.normalise_unit(_get(message, "OBX", 6, n=n)))
        if convert is None:
            raise Refused("unknown_unit", f"OBX {n}: OBX-6")
        status = RESULT_STATUSES.get(_get(message, "OBX", 11, n=n))
        if status is None:
            raise Refused("unsupported_result_status", f"OBX {n}: OBX-11")
        filler = _get(message, "OBR", 3, n=order)
        result_id = f"{filler}^{code}^{_get(message, 'OBX', 4, n=n)}"[:256] if filler else None
        charted = _time(message, "OBX", 14, n=n) or _time(message, "OBR", 7, n=order)
        available = _time(message, "OBX", 19, n=n) or _time(message, "OBR", 22, n=order) or charted
        try:
            value = convert(float(_get(message, "OBX", 5, n=n)))
            payload = entry.observation(
                value, charttime=charted, result_id=result_id, status=status
            )
        except ValueError:
            raise Refused("invalid_field", f"OBX {n}: OBX-5") from None
        if charted is None:
            raise Refused("missing_field", f"OBX {n}: OBX-14")
        observed.append(
            _build(
                ev.ObservationEvent,
                message,
                head,
                kind,
                segment=("OBX", n),
                event_time=available,
                payload=payload,
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


def _text_of(message: hl7.Message, order: int | None = None) -> str | None:
    """The TX/FT OBX values (only those under the ``order``-th OBR, when given), unescaped,
    one a line; None when there are none."""
    orders = _order_of(message)
    lines = []
    for n, segment in enumerate(_segments(message).get("OBX", ()), 1):
        if _field(segment, 2) in TEXT_TYPES and order in (None, orders[n]):
            lines.append(_unescape(_field(segment, 5), f"OBX {n}: OBX-5"))
    return "\n".join(lines) if lines else None


def _field(segment, field: int) -> str:
    """A segment's whole field as sent (components and all), empty when absent."""
    try:
        return str(segment(field))
    except IndexError:
        return ""


def _note(message, head, kind, *, note_type, note_id, charted, when, segment, order=None):
    text = _text_of(message, order)
    if text is None:
        raise Refused("missing_field", "OBX-5")
    if not note_id:
        raise Refused("missing_field", "TXA-12" if segment[0] == "TXA" else "OBR-3")
    if charted is None:
        raise Refused("missing_field", "TXA-4" if segment[0] == "TXA" else "OBR-7")
    hadm_id = _id(message, "PV1", 19)
    from_hadm = _id(message, "PV1", 50) if note_type == "discharge" else hadm_id
    return _build(
        ev.NoteEvent,
        message,
        head,
        kind,
        segment=segment,
        event_time=when,
        payload=dict(
            note_type=note_type,
            text=text,
            charttime=charted,
            note_id=note_id,
            from_hadm_id=from_hadm,
        ),
    )


def _document(message: hl7.Message, head: Header, kind: str) -> ev.NoteEvent:
    note_type = DOCUMENT_TYPES.get(_get(message, "TXA", 2))
    if note_type is None:
        raise Refused("unsupported_document", "TXA-2")
    return _note(
        message,
        head,
        kind,
        note_type=note_type,
        note_id=_get(message, "TXA", 12),
        charted=_time(message, "TXA", 4),
        when=_sent(message),
        segment=("TXA", 1),
    )


def _report(message: hl7.Message, head: Header, kind: str) -> list[ev.NoteEvent]:
    """Radiology reports and discharge summaries sent as results (each OBR-4 says which),
    each from the text under its own OBR."""
    notes = []
    for k in range(1, len(_segments(message).get("OBR", ())) + 1):
        code = _get(message, "OBR", 4, n=k)
        words = _get(message, "OBR", 4, n=k, component=2).lower()
        note_type = REPORT_CODES.get(code) or next((t for w, t in REPORT_WORDS if w in words), None)
        if note_type is None or _text_of(message, k) is None:
            continue
        notes.append(
            _note(
                message,
                head,
                kind,
                note_type=note_type,
                note_id=_get(message, "OBR", 3, n=k),
                charted=_time(message, "OBR", 7, n=k),
                when=_time(message, "OBR", 22, n=k) or _time(message, "MSH", 7),
                segment=("OBR", k),
                order=k,
            )
        )
    return notes


def _images(message, head: Header, kind: str, roots) -> list[ev.CxrEvent]:
    """Image references (OBX type RP) under the configured roots."""
    found = []
    for n in _results_of_type(message, "RP"):
        uri = _get(message, "OBX", 5, n=n)
        if not uri:
            raise Refused("missing_field", f"OBX {n}: OBX-5")
        if roots is not None and not _under(uri, roots):
            raise Refused("image_refused", f"OBX {n}: OBX-5 outside the image roots")
        order = _order_of(message)[n]
        studied = _time(message, "OBR", 7, n=order, required=True)
        found.append(
            _build(
                ev.CxrEvent,
                message,
                head,
                kind,
                segment=("OBX", n),
                event_time=studied,
                payload=dict(
                    study_id=_id(message, "OBR", 3, n=order),
                    dicom_id=_required_obx(message, n, 4),
                    uri=uri,
                    studytime=studied,
                ),
            )
        )
    return found


def _required_obx(message, n: int, field: int) -> str:
    value = _get(message, "OBX", field, n=n)
    if not value:
        raise Refused("missing_field", f"OBX {n}: OBX-{field}")
    return value


def _under(uri: str, roots) -> bool:
    """Whether a file URI or path names a file under one of ``roots`` (after resolving
    ``..`` and links, so a reference cannot climb out)."""
    try:
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
            return False
        path = Path(unquote(parsed.path)).resolve()
    except ValueError:  # an unparsable URL, or a NUL byte in the path: names no file
        return False
    return any(path.is_relative_to(Path(root).resolve()) for root in roots)


def _admission_type(message: hl7.Message) -> str:
    admission_type = ADMISSION_TYPES.get(_get(message, "PV1", 4))
    return admission_type or PATIENT_CLASSES.get(_get(message, "PV1", 2), "")


# --------------------------------------------------------------------------- fields


def _results_of_type(message: hl7.Message, value_type: str) -> list[int]:
    """The positions (from 1) of the OBX segments whose value type (OBX-2) is ``value_type``."""
    count = len(message.segments("OBX")) if _has(message, "OBX") else 0
    return [n for n in range(1, count + 1) if _get(message, "OBX", 2, n=n) == value_type]


def _has(message: hl7.Message, segment: str) -> bool:
    return segment in _segments(message)


def _get(message: hl7.Message, segment: str, field: int, *, n: int = 1, component: int = 1):
    """The ``n``-th such segment's field: its first repetition's component (the first
    subcomponent), unescaped; empty when absent."""
    segments = _segments(message).get(segment, ())
    if not 1 <= n <= len(segments):
        return ""
    components = _field(segments[n - 1], field).split("~", 1)[0].split("^")
    if component > len(components):
        return ""
    value = components[component - 1].split("&", 1)[0]
    return _unescape(value, f"{segment}-{field}").strip()


def _unescape(value: str, where: str) -> str:
    """HL7's escape sequences undone (v2.5 section 2.7) without python-hl7's ``unescape``,
    which logs what it cannot read (patient data) and repeats a ``.sp`` count unbounded.
    Highlighting, character-set switches and local (Z) sequences are dropped; an unknown
    sequence stays as sent; bad hex is refused."""
    if "\\" not in value:
        return value

    def one(match: re.Match) -> str:
        code = match.group(1)
        if code in _ESCAPES:
            return _ESCAPES[code]
        if formatting := _FORMATTING.fullmatch(code):
            command, count = formatting.groups()
            return _REPEATED[command] * min(abs(int(count or 1)), MAX_REPEAT)
        if code[:1] in "CMZ" and code:
            return ""
        if code[:1] == "X":
            try:
                return bytes.fromhex(code[1:]).decode()
            except (ValueError, UnicodeDecodeError):
                raise Refused("invalid_field", where) from None
        return match.group(0)

    return _ESCAPE.sub(one, value)


def _order_of(message: hl7.Message) -> dict[int, int]:
    """{OBX position: the position of the OBR it follows (0: none)}, both from 1."""
    found = getattr(message, "_m3t_orders", None)
    if found is None:
        found, order, n = {}, 0, 0
        for segment in message:
            name = str(segment[0])
            if name == "OBR":
                order += 1
            elif name == "OBX":
                n += 1
                found[n] = order
        message._m3t_orders = found
    return found


def _code(value: str) -> str:
    """A message type or trigger event: letters and digits, else empty (so refused)."""
    return value if value.isascii() and value.isalnum() else ""


def _segments(message: hl7.Message) -> dict[str, list[hl7.Segment]]:
    """The message's segments by name, found once per message: the library's own lookup
    scans them all for every field read."""
    found = getattr(message, "_m3t_segments", None)
    if found is None:
        found = {}
        for segment in message:
            found.setdefault(str(segment[0]), []).append(segment)
        message._m3t_segments = found
    return found


def _raw(msh, field: int) -> str:
    """MSH's field as sent (still escaped), empty when absent; MSH's numbers are HL7's."""
    try:
        return str(msh(field))
    except IndexError:
        return ""


def _required(message: hl7.Message, segment: str, field: int, *, n: int = 1) -> str:
    value = _get(message, segment, field, n=n)
    if not value:
        raise Refused("missing_field", f"{segment}-{field}")
    return value


def _id(message: hl7.Message, segment: str, field: int, *, n: int = 1) -> int:
    value = _required(message, segment, field, n=n)
    if not (value.isascii() and value.isdigit()) or int(value) > ev.INT64_MAX:
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
            if int(offset[1:3]) > 14 or int(offset[3:5]) > 59:  # UTC-12:00 to UTC+14:00
                raise ValueError
            shift = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
            moment = (moment - sign * shift).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise Refused("invalid_field", f"{segment}-{field}") from None
    return moment


def _years_between(born: datetime, at: datetime) -> float:
    years = at.year - born.year - ((at.month, at.day) < (born.month, born.day))
    return float(years)
