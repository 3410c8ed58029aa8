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

``event_id`` is derived from the source position, so a replay or a redelivery carries the
same id and the online store can apply it once.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

SCHEMA_VERSION = 1
# Free-text notes above this size are dead-lettered rather than truncated silently.
MAX_NOTE_CHARS = 100_000

EventType = Literal["admission", "observation", "note", "cxr", "discharge"]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdmissionPayload(_Payload):
    admittime: datetime
    admission_type: str
    admission_location: str | None = None
    insurance: str | None = None
    gender: Literal["M", "F"]
    age: float = Field(ge=0, le=120)


class ObservationPayload(_Payload):
    itemid: int
    value: float
    unit: str | None = None
    charttime: datetime
    # "lab" (hosp/labevents) or "vital" (icu/chartevents)
    kind: Literal["lab", "vital"]


class NotePayload(_Payload):
    note_type: Literal["radiology", "discharge"]
    text: str = Field(max_length=MAX_NOTE_CHARS)
    charttime: datetime
    note_id: str
    from_hadm_id: int


class CxrPayload(_Payload):
    study_id: int
    dicom_id: str
    view_position: str | None = None
    uri: str
    studytime: datetime


class DischargePayload(_Payload):
    dischtime: datetime
    los_days: float = Field(ge=0)
    hospital_expire_flag: bool


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    hadm_id: int
    subject_id: int
    event_time: datetime
    ingest_time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str

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


Event = Annotated[
    AdmissionEvent | ObservationEvent | NoteEvent | CxrEvent | DischargeEvent,
    Field(discriminator="type"),
]
_EVENT = TypeAdapter(Event)

# Same-timestamp events are ordered so an admission opens first and closes last.
TYPE_ORDER: dict[str, int] = {"admission": 0, "observation": 1, "note": 1, "cxr": 1, "discharge": 2}


class InvalidEvent(ValueError):
    """An event that breaks the contract; ``reason`` is short and carries no patient data."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def event_id(source: str, position: Any) -> str:
    """A stable id for the event read at ``position`` of ``source``."""
    return hashlib.blake2b(f"{source}\x1f{position}".encode(), digest_size=12).hexdigest()


def sort_key(event: AdmissionEvent | ObservationEvent | NoteEvent | CxrEvent | DischargeEvent):
    return (event.event_time, TYPE_ORDER[event.type], event.event_id)


def json_schema() -> dict:
    """The contract as JSON Schema (published next to the topic for other producers)."""
    return _EVENT.json_schema()


def encode(event) -> bytes:
    return event.model_dump_json().encode()


def key(event) -> bytes:
    return str(event.hadm_id).encode()


def decode(raw: bytes | str | dict):
    """Parse and validate one event; raise InvalidEvent with a reason otherwise."""
    if isinstance(raw, dict):
        data = raw
    else:
        try:  # the common case, valid bytes: pydantic parses the JSON itself, no dict first
            return _EVENT.validate_json(raw)
        except ValidationError:
            pass  # a bad event: the checks below give its reason
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidEvent("malformed_json", str(exc)[:200]) from None
    if not isinstance(data, dict):
        raise InvalidEvent("malformed_json", "not an object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InvalidEvent("unsupported_schema_version", repr(data.get("schema_version"))[:40])
    try:
        return _EVENT.validate_python(data)
    except ValidationError as exc:
        raise _schema_violation(exc) from None


def validate(event):
    """Round-trip an in-memory event through the schema (used by producers)."""
    return decode(event.model_dump(mode="json"))


def validate_json(raw: bytes | str):
    """Validate encoded bytes on the producing side (pydantic parses the JSON itself,
    without building a dict first); raise InvalidEvent("schema_violation") otherwise."""
    try:
        return _EVENT.validate_json(raw)
    except ValidationError as exc:
        raise _schema_violation(exc) from None


def _schema_violation(exc: ValidationError) -> InvalidEvent:
    # The message names the field and the rule, never the value (it may be PHI).
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return InvalidEvent("schema_violation", f"{where}: {first['type']}")
