"""The event contract: what travels on the admission-events topic.

Every event is one JSON object: an envelope (schema version, a deterministic id, the
admission it belongs to, event time and ingest time, where it came from) around a typed
payload. Messages are keyed by ``hadm_id`` so one admission's events stay ordered in one
partition. Images travel by reference (``uri``), never inside a message.

``discharge`` carries the outcome (length of stay, in-hospital death). It is a training
label and the signal to close an admission online; it is never a model input.

Note streams: ``radiology`` reports written during the admission feed one LSTM; the
``discharge`` summary of the patient's most recent *earlier* admission feeds the other (a
discharge summary of the current stay would leak its outcome). The reader emits that
earlier summary into the new admission at its admit time, with ``from_hadm_id`` naming
the admission that wrote it.

Hospital feeds add three things (``ingest.hl7``, ``ingest.fhir``):

- ``transfer``: the admission moved to a ward or unit (``careunit``) at ``intime``; the
  latest transfer by ``intime`` is the admission's ward.
- ``cancel``: an admission (HL7 A11), a discharge (A13) or a transfer (A12) entered in error.
  It undoes events of that kind dated at or before its own ``event_time``; a later one of
  that kind counts again (a cancelled discharge reopens the admission until it is discharged
  anew).
- an ``observation`` with ``status`` "corrected" replaces the value of the result it
  corrects: the one with the same ``result_id`` (the filler order and test, a FHIR
  Observation's id), or without one, the same item at the same ``charttime``. An
  ``admission`` may be sent again (HL7 A08, an update): the one with the latest
  ``event_time`` gives the demographics.

``event_id`` is derived from the source position, so a replay or a redelivery carries the
same id and the online store can apply it once.

The contract is also the door: an event that any producer could send is either a valid
event or an ``InvalidEvent`` with a short, stable ``reason``, never another exception.

- ``tombstone``: no value at all (a Kafka tombstone, empty bytes).
- ``oversized_event``: over ``max_bytes``, rejected before it is parsed.
- ``too_deep``: JSON nested deeper than ``MAX_JSON_DEPTH``, found by a scan of the bytes
  before any recursive parse.
- ``invalid_utf8``: bytes that are not UTF-8, or a lone surrogate (``"\\ud800"``) in a string.
- ``malformed_json``: not JSON, or not a JSON object.
- ``unsupported_schema_version``: a ``schema_version`` other than ``SCHEMA_VERSION``.
- ``non_finite``: ``NaN``, ``Infinity`` or an overflowing number (``1e999``) in a number field.
- ``implausible_value``: an observation of a known item (``ingest.itemids``) outside the
  item's plausible range; other itemids are passed on (the features ignore them). Checked
  at the door only: events built in process may hold such values.
- ``charted_after_event_time``: an observation or note whose ``charttime`` is after its
  ``event_time`` (when the hospital knew it): at the door only, like the ranges.
- ``schema_violation``: any other rule, among them ids outside ``0 .. 2**63 - 1``, strings
  over their length limit and times outside the years ``MIN_YEAR .. MAX_YEAR``.

The ``detail`` names the field and the rule, never the value (it may be PHI).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ingest import itemids

SCHEMA_VERSION = 1
# Free-text notes above this size are dead-lettered rather than truncated silently.
MAX_NOTE_CHARS = 100_000
# Larger messages are dead-lettered unparsed; a note of MAX_NOTE_CHARS fits with room to
# spare (the worker passes its own setting, ``stream.max_event_bytes``, of the same default).
MAX_EVENT_BYTES = 512 * 1024
# A valid event nests two deep (envelope, payload); anything far deeper is hostile.
MAX_JSON_DEPTH = 64
INT64_MAX = 2**63 - 1
# MIMIC's de-identified dates are shifted into roughly 2100-2214 and a live feed dates
# events now, so 1900-2399 holds every real event with room to spare, while a year like
# 9999 (which would pin an admission's feature time and overflow time arithmetic) is refused.
MIN_YEAR, MAX_YEAR = 1900, 2399
# Every reason an InvalidEvent from this module can give (see the module docstring).
REASONS = (
    "tombstone",
    "oversized_event",
    "too_deep",
    "invalid_utf8",
    "malformed_json",
    "unsupported_schema_version",
    "non_finite",
    "implausible_value",
    "charted_after_event_time",
    "schema_violation",
)

EventType = Literal["admission", "observation", "note", "cxr", "discharge", "transfer", "cancel"]


def _text(max_length: int, min_length: int = 0):
    """A string of at most ``max_length`` characters. With a length constraint, pydantic also
    refuses a lone surrogate in a string built in Python (``string_unicode``), which Python
    allows and UTF-8, Redis and Kafka do not; its JSON parser refuses one in bytes."""
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length)]


# MIMIC's ids (subject, admission, item, study) are positive integers; int64 is where the
# features and the scores keep them. (0 passes too: simulations number from 0.)
Id = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Checked on the local time (an offset moves it by a day at most), so nothing overflows.
Time = Annotated[datetime, Field(ge=datetime(MIN_YEAR, 1, 1), lt=datetime(MAX_YEAR + 1, 1, 1))]
# Field sizes, generous beside MIMIC's (ids of 24 hex digits, DICOM ids of 44 characters,
# units like "mg/dL", admission locations under 40 characters, file URIs under PATH_MAX).
EventId = _text(128, min_length=1)
Source = _text(256, min_length=1)
Label = _text(128)
Unit = _text(64)
NoteId = _text(128)
DicomId = _text(128)
ViewPosition = _text(64)
Uri = _text(4096, min_length=1)
NoteText = _text(MAX_NOTE_CHARS)
ResultId = _text(256, min_length=1)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AdmissionPayload(_Payload):
    admittime: Time
    admission_type: Label
    admission_location: Label | None = None
    insurance: Label | None = None
    gender: Literal["M", "F"]
    age: float = Field(ge=0, le=120)


class ObservationPayload(_Payload):
    itemid: Id
    value: float
    unit: Unit | None = None
    charttime: Time
    # "lab" (hosp/labevents) or "vital" (icu/chartevents)
    kind: Literal["lab", "vital"]
    result_id: ResultId | None = None
    status: Literal["final", "preliminary", "corrected"] = "final"


class NotePayload(_Payload):
    note_type: Literal["radiology", "discharge"]
    text: NoteText
    charttime: Time
    note_id: NoteId
    from_hadm_id: Id


class CxrPayload(_Payload):
    study_id: Id
    dicom_id: DicomId
    view_position: ViewPosition | None = None
    uri: Uri
    studytime: Time


class DischargePayload(_Payload):
    dischtime: Time
    los_days: float = Field(ge=0)
    hospital_expire_flag: bool


class TransferPayload(_Payload):
    careunit: Label
    intime: Time


class CancelPayload(_Payload):
    cancels: Literal["admission", "discharge", "transfer"]


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    hadm_id: Id
    subject_id: Id
    event_time: Time
    ingest_time: Time = Field(default_factory=lambda: datetime.now(UTC))
    source: Source

    @field_validator("event_time", "ingest_time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # MIMIC times are naive local times; carry them as UTC-aware so ordering is total.
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class AdmissionEvent(_Envelope):
    type: Literal["admission"] = "admission"
    payload: AdmissionPayload


class ObservationEvent(_Envelope):
    type: Literal["observation"] = "observation"
    payload: ObservationPayload


class NoteEvent(_Envelope):
    type: Literal["note"] = "note"
    payload: NotePayload


class CxrEvent(_Envelope):
    type: Literal["cxr"] = "cxr"
    payload: CxrPayload


class DischargeEvent(_Envelope):
    type: Literal["discharge"] = "discharge"
    payload: DischargePayload


class TransferEvent(_Envelope):
    type: Literal["transfer"] = "transfer"
    payload: TransferPayload


class CancelEvent(_Envelope):
    type: Literal["cancel"] = "cancel"
    payload: CancelPayload


AnyEvent = (
    AdmissionEvent
    | ObservationEvent
    | NoteEvent
    | CxrEvent
    | DischargeEvent
    | TransferEvent
    | CancelEvent
)
Event = Annotated[AnyEvent, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)

# Same-timestamp events are ordered so an admission opens first and closes last, and a
# cancel comes after what it cancels.
TYPE_ORDER: dict[str, int] = {
    "admission": 0,
    "observation": 1,
    "note": 1,
    "cxr": 1,
    "transfer": 1,
    "discharge": 2,
    "cancel": 3,
}


class InvalidEvent(ValueError):
    """An event that breaks the contract; ``reason`` is short and carries no patient data."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def event_id(source: str, position: Any) -> str:
    """A stable id for the event read at ``position`` of ``source``."""
    return hashlib.blake2b(f"{source}\x1f{position}".encode(), digest_size=12).hexdigest()


# Envelope fields that say how an event travelled, not what it says: a replay or a resend
# through another client may differ in them (``ingest_time`` is set when it is produced).
TRANSPORT_FIELDS = frozenset({"schema_version", "event_id", "ingest_time"})


def content_digest(event) -> bytes:
    """16 bytes naming what ``event`` says: a blake2b of the parsed event, all but its
    ``TRANSPORT_FIELDS``, as the contract serialises it (pydantic's JSON: each type's fields
    in a fixed order, numbers and strings in one spelling). However a client spelled or
    ordered the JSON, the same event has the same digest; one differing in any other field
    (a time given in another UTC offset included) has another."""
    content = event.model_dump_json(exclude=TRANSPORT_FIELDS).encode()
    return hashlib.blake2b(content, digest_size=16).digest()


def sort_key(event: AnyEvent):
    return (event.event_time, TYPE_ORDER[event.type], event.event_id)


def json_schema() -> dict:
    """The contract as JSON Schema (published next to the topic for other producers)."""
    return _EVENT.json_schema()


def encode(event) -> bytes:
    return event.model_dump_json().encode()


def key(event) -> bytes:
    return str(event.hadm_id).encode()


def decode(raw: bytes | str | dict | None, *, max_bytes: int = MAX_EVENT_BYTES):
    """Parse and validate one event; raise InvalidEvent with a reason otherwise.

    Bytes (or text) larger than ``max_bytes`` are refused unparsed. A valid event is parsed
    and validated once, by pydantic; the reason of an invalid one is found afterwards.
    """
    if type(raw) is not bytes:
        if isinstance(raw, dict):
            return _validate_dict(raw)
        raw = _as_bytes(raw, max_bytes)
    if not raw:
        raise InvalidEvent("tombstone", "no value")
    if len(raw) > max_bytes:
        raise InvalidEvent("oversized_event", f"over {max_bytes} bytes")
    try:  # the common case, valid bytes: pydantic parses the JSON itself, no dict first
        event = _EVENT.validate_json(raw)
    except ValidationError as exc:
        raise _reason(raw, exc) from None
    _at_the_door(event)
    return event


def validate(event):
    """Round-trip an in-memory event through the schema (used by producers)."""
    return decode(event.model_dump(mode="json"))


def validate_json(raw: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES):
    """Validate encoded bytes on the producing side, by the same rules as ``decode``."""
    return decode(raw, max_bytes=max_bytes)


def json_depth(raw: bytes) -> int:
    """How deep the JSON in ``raw`` nests, without parsing it: string contents are cut out
    (an unterminated string runs to the end), then brackets are counted. Linear time."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_A_BRACKET)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


# A string token, possessive so that no position is scanned twice.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _as_bytes(raw: str | bytearray | memoryview | None, max_bytes: int) -> bytes:
    if raw is None or len(raw) == 0:
        raise InvalidEvent("tombstone", "no value")
    if not isinstance(raw, str):
        return bytes(raw)
    if len(raw) > max_bytes:  # each character is at least one byte
        raise InvalidEvent("oversized_event", f"over {max_bytes} bytes")
    try:
        return raw.encode()
    except UnicodeEncodeError:
        raise InvalidEvent("invalid_utf8", "a lone surrogate") from None


def _reason(raw: bytes, exc: ValidationError) -> InvalidEvent:
    """Why pydantic refused ``raw``: the bytes are checked from the outside in, and a
    recursive parser only sees them once their depth is known to be small."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        return InvalidEvent("too_deep", f"nested over {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode()
    except UnicodeDecodeError as error:
        return InvalidEvent("invalid_utf8", f"byte {error.start}")
    try:
        data = json.loads(text)
    except ValueError as error:  # JSONDecodeError, or an integer too long to convert
        where = f"char {error.pos}" if isinstance(error, json.JSONDecodeError) else "number"
        return InvalidEvent("malformed_json", f"{where}: {type(error).__name__}")
    if not isinstance(data, dict):
        return InvalidEvent("malformed_json", "not an object")
    if _has_lone_surrogate(data):
        return InvalidEvent("invalid_utf8", "a lone surrogate in a string")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:  # True and 1.0 pass, as pydantic takes them for 1
        return _unsupported(version)
    return _from_errors(exc)


def _validate_dict(data: dict):
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:  # True and 1.0 pass, as pydantic takes them for 1
        raise _unsupported(version)
    try:
        event = _EVENT.validate_python(data)
    except ValidationError as exc:
        raise _from_errors(exc) from None
    _at_the_door(event)
    return event


def _at_the_door(event) -> None:
    """What the schema cannot say: a known item's value is plausible, and a result or note
    is charted no later than its event time (when the hospital knew it); charted later, it
    would be a measurement from the future at every cutoff in between."""
    if type(event) is ObservationEvent:
        _plausible(event.payload)
    if type(event) in (ObservationEvent, NoteEvent):
        charted = event.payload.charttime
        if (charted if charted.tzinfo else charted.replace(tzinfo=UTC)) > event.event_time:
            detail = f"{event.type}.payload.charttime: after event_time"
            raise InvalidEvent("charted_after_event_time", detail)


def _plausible(payload: ObservationPayload) -> None:
    """The ranges the MIMIC reader applies (``out_of_range``): outside them a value is a unit
    mix-up or a physical impossibility, not a clinical extreme. Checked at the door only
    (decode, validate_json, validate); events built in process are not refused."""
    item = itemids.ITEMS.get(payload.itemid)
    if item is not None and not item.low <= payload.value <= item.high:
        detail = f"observation.payload.value: implausible_value (itemid {item.itemid})"
        raise InvalidEvent("implausible_value", detail)


def _unsupported(version: Any) -> InvalidEvent:
    # A small integer is a version number; anything else is shown only by its type.
    shown = version if type(version) is int and 0 <= version < 1000 else type(version).__name__
    return InvalidEvent("unsupported_schema_version", f"schema_version {shown}")


_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _has_lone_surrogate(data: Any) -> bool:
    """Any string (key or value) with a lone surrogate; ``data`` is json.loads' output,
    whose depth is already bounded, walked without recursion."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# pydantic error types with a reason of their own; every other rule is a schema violation.
_REASON_OF_ERROR = {
    "finite_number": "non_finite",
    "string_unicode": "invalid_utf8",
    "json_invalid": "malformed_json",
}


def _from_errors(exc: ValidationError) -> InvalidEvent:
    # The detail names the field and the rule, never the value (it may be PHI). An unknown
    # field is named by where it is, not by its name, which the producer chose.
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = first["loc"][:-1] if first["type"] == "extra_forbidden" else first["loc"]
    where = ".".join(str(p) for p in loc) or "event"
    detail = f"{where}: {first['type']}"
    return InvalidEvent(_REASON_OF_ERROR.get(first["type"], "schema_violation"), detail[:200])
