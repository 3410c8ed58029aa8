"""FHIR R4 Bundles into the event contract (``ingest.events``), validated with fhir.resources.

The counterpart of ``ingest.hl7`` for FHIR: each resource of a Bundle is validated by its
fhir.resources class (R4B, the R4 structures) and mapped to events. What is taken:

- ``Encounter`` (``identifier``: the admission, digits; ``subject``: its Patient):
  ``in-progress``, ``onleave`` or ``finished`` with the Patient in the Bundle -> an
  ``admission`` at ``period.start`` (admission type from a ``type`` coding of MIMIC's
  admission types, else ``priority`` (v3 ActPriority), else ``class`` (v3 ActCode));
  ``hospitalization.admitSource`` the admission location); ``finished`` -> a ``discharge`` at
  ``period.end``, died when ``hospitalization.dischargeDisposition`` is an expired code
  (``exp``, or UB-04 20, 40, 41, 42) or the Patient's ``deceasedBoolean`` is true; each
  ``location`` with a ``period.start`` (not ``planned``) -> a ``transfer`` to its display,
  its Location's name or identifier; ``entered-in-error`` or ``cancelled`` -> a ``cancel``
  of the admission at ``meta.lastUpdated``, else ``period.start``; ``in-progress`` or
  ``onleave`` updated (``meta.lastUpdated``) after it started -> also a ``cancel`` of the
  discharge at that time: an Encounter in progress again undoes a discharge sent before.
  ``planned``, ``arrived`` and ``triaged`` say nothing yet.
- ``Patient``: ``identifier`` (digits) the subject, ``gender`` male/female, ``birthDate``
  (age in whole years at admission), ``deceasedBoolean``; read through references.
- ``Observation`` with a ``valueQuantity`` -> an ``observation``: a LOINC code of
  ``ingest.loinc``, the unit (``code``, else ``unit``) converted into the item's; status
  final, amended/corrected (-> corrected) or preliminary; ``result_id`` the first
  identifier (``system|value``), else the id; chart time ``effectiveDateTime`` (or
  ``effectivePeriod.start``), event time ``issued``, else the chart time. Other values
  (text, coded) are not features and are passed over.
- ``DiagnosticReport`` of radiology (category ``RAD``, or LOINC 18748-4) -> a ``radiology``
  note: text from ``presentedForm`` (text/plain data), else ``conclusion``; chart time
  ``effectiveDateTime``, event time ``issued``. Other reports are passed over.
- ``DocumentReference`` of a discharge summary (LOINC 18842-5) or a radiology report
  (18748-4, 68604-8) -> a note from the first ``content.attachment.data``; filed to
  ``context.encounter``, chart time ``context.period.start``, else ``date``; event time
  ``date``. A discharge summary must name the earlier stay that wrote it in
  ``context.related`` (a summary of the current stay would leak its outcome).
- ``ImagingStudy`` -> a ``cxr``: ``identifier`` (digits) the study, the first series'
  first instance's ``uid`` (and ``title``, the view), ``started`` the time, and the URI
  of its ``endpoint`` (an Endpoint contained or in the Bundle), which must be a file URI
  under the image roots.

References resolve to an entry of the same Bundle (its ``fullUrl``, ``urn:uuid:`` or
absolute, or ``Type/id``), else to a reference's ``identifier`` (digits), else to ids a
``Directory`` learnt from earlier Bundles. Event ids are content-addressed (a digest of
what the event says): a resent entry gives the same ids, applied once by the stream,
whatever Bundle carries it; a changed one (a correction) new ones.

A Bundle is taken whole or not at all: every entry that cannot be taken is an ``Issue``
(reason, FHIR issue type, entry index and field; never a value), and ``to_events`` raises
``Refused`` carrying them all.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.location import Location
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.subscriptionstatus import SubscriptionStatus
from pydantic import ValidationError

from ingest import events as ev
from ingest import loinc

LOINC = "http://loinc.org"
# MIMIC-IV on FHIR's admission types: taken verbatim (the features know them by name).
MIMIC_ADMISSION_TYPE = "http://mimic.mit.edu/fhir/mimic/CodeSystem/mimic-admission-type"
# v3 ActPriority and ActCode -> MIMIC's admission types, as ingest.hl7's tables do.
PRIORITIES = {"EM": "EW EMER.", "UR": "URGENT", "EL": "ELECTIVE", "R": "ELECTIVE"}
CLASSES = {
    "EMER": "EW EMER.",
    "IMP": "URGENT",
    "ACUTE": "URGENT",
    "AMB": "AMBULATORY OBSERVATION",
    "OBSENC": "OBSERVATION ADMIT",
}
EXPIRED_DISPOSITIONS = frozenset({"exp", "20", "40", "41", "42"})
RESULT_STATUSES = {
    "final": "final",
    "amended": "corrected",
    "corrected": "corrected",
    "preliminary": "preliminary",
}
ADMITTED = frozenset({"in-progress", "onleave", "finished"})
NOT_YET = frozenset({"planned", "arrived", "triaged"})
CANCELLED = frozenset({"entered-in-error", "cancelled"})
RADIOLOGY_CODES = frozenset({"18748-4", "68604-8"})
DISCHARGE_SUMMARY = "18842-5"
BUNDLE_TYPES = frozenset({"transaction", "collection"})
NOTIFICATION_TYPES = frozenset({"history", "subscription-notification"})
# Resources an entry may carry, by resourceType; the notification's own status too.
RESOURCES: dict[str, Any] = {
    "Encounter": Encounter,
    "Patient": Patient,
    "Observation": Observation,
    "DiagnosticReport": DiagnosticReport,
    "DocumentReference": DocumentReference,
    "ImagingStudy": ImagingStudy,
    "Location": Location,
    "Endpoint": Endpoint,
}
NOTIFICATION_STATUS: dict[str, Any] = {
    "Parameters": Parameters,
    "SubscriptionStatus": SubscriptionStatus,
}
# Why something was refused: its FHIR issue type (IssueType) and HTTP status.
REASONS: dict[str, tuple[str, int]] = {
    "oversized_bundle": ("too-costly", 413),
    "invalid_utf8": ("structure", 400),
    "malformed_json": ("structure", 400),
    "not_a_bundle": ("structure", 400),
    "invalid_resource": ("structure", 400),
    "unsupported_bundle_type": ("not-supported", 422),
    "unsupported_resource": ("not-supported", 422),
    "unsupported_method": ("not-supported", 422),
    "missing_field": ("required", 422),
    "invalid_field": ("value", 422),
    "unknown_loinc": ("code-invalid", 422),
    "unknown_unit": ("code-invalid", 422),
    "unsupported_result_status": ("code-invalid", 422),
    "unresolved_reference": ("not-found", 422),
    "outside_image_roots": ("security", 422),
    "invalid_event": ("invariant", 422),
}
SOURCE = "fhir"
_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class Issue:
    """One thing that could not be taken: ``entry`` is the 0-based index in the Bundle
    (None: the Bundle itself), ``where`` a field path; neither carries a value."""

    reason: str
    entry: int | None = None
    where: str = ""

    @property
    def code(self) -> str:
        return REASONS[self.reason][0]

    @property
    def diagnostics(self) -> str:
        place = "Bundle" if self.entry is None else f"entry {self.entry}"
        return f"{place}: {self.where}: {self.reason}" if self.where else f"{place}: {self.reason}"


class Refused(ValueError):
    """A Bundle that cannot be taken, with every issue found; ``status`` the HTTP status."""

    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(i.diagnostics for i in issues))
        self.issues = issues

    @property
    def reason(self) -> str:
        return self.issues[0].reason

    @property
    def status(self) -> int:
        return max(REASONS[i.reason][1] for i in self.issues)


class _EntryRefused(Exception):
    def __init__(self, reason: str, where: str = ""):
        self.reason, self.where = reason, where


@dataclass
class Directory:
    """Ids learnt from Bundles taken earlier (process-local, the most recent ``size``):
    ``Encounter/<id>`` -> (hadm_id, subject_id), ``Patient/<id>`` -> subject_id."""

    size: int = 100_000
    encounters: OrderedDict = field(default_factory=OrderedDict)
    patients: OrderedDict = field(default_factory=OrderedDict)

    def learn(self, mapped: Mapped) -> None:
        for table, learnt in (
            (self.encounters, mapped.encounters),
            (self.patients, mapped.patients),
        ):
            for key, value in learnt.items():
                table[key] = value
                table.move_to_end(key)
                while len(table) > self.size:
                    table.popitem(last=False)


@dataclass(frozen=True)
class Entry:
    """What one entry said: its events (none for a Patient or a text result)."""

    resource_type: str
    events: list


@dataclass(frozen=True)
class Mapped:
    bundle_type: str
    bundle_id: str
    entries: list[Entry]
    encounters: dict = field(default_factory=dict)  # learnt: "Encounter/id" -> (hadm, subject)
    patients: dict = field(default_factory=dict)  # learnt: "Patient/id" -> subject

    @property
    def events(self) -> list:
        return [e for entry in self.entries for e in entry.events]


def parse(raw: bytes | str | dict, max_bytes: int) -> dict:
    """The Bundle's JSON object, size and encoding checked; or ``Refused``."""
    if isinstance(raw, dict):
        return raw
    if len(raw) > max_bytes:
        raise Refused([Issue("oversized_bundle", None, f"over {max_bytes} bytes")])
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise Refused([Issue("invalid_utf8")]) from None
    if ev.json_depth(raw.encode()) > ev.MAX_JSON_DEPTH:
        raise Refused([Issue("malformed_json", None, "nesting")])
    try:
        data = json.loads(raw)
    except ValueError:
        raise Refused([Issue("malformed_json")]) from None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise Refused([Issue("not_a_bundle", None, "resourceType")])
    return data


def to_events(
    raw: bytes | str | dict,
    *,
    roots: Iterable[Path] = (),
    directory: Directory | None = None,
    max_bytes: int = 16 * 1024 * 1024,
    notification: bool = False,
) -> Mapped:
    """The events a Bundle says, each validated by the contract; or ``Refused`` with every
    issue. ``notification``: a Subscription notification (a history Bundle whose first
    entry is the notification's status; a handshake or heartbeat says nothing)."""
    data = parse(raw, max_bytes)
    bundle_type = data.get("type")
    allowed = NOTIFICATION_TYPES if notification else BUNDLE_TYPES
    if not isinstance(bundle_type, str) or bundle_type not in allowed:
        raise Refused([Issue("unsupported_bundle_type", None, "Bundle.type")])
    entries = data.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Refused([Issue("invalid_resource", None, "Bundle.entry")])
    bundle_id = data.get("id") if isinstance(data.get("id"), str) else ""
    bundle_id = bundle_id if re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", bundle_id) else ""
    first = 0
    if notification:
        if not _notification_status(entries):
            return Mapped(bundle_type, bundle_id, [])
        first = 1
    reader = _Bundle(entries, first, [Path(r) for r in roots], directory or Directory())
    return reader.map(bundle_type, bundle_id)


def _notification_status(entries: list[dict]) -> bool:
    """Whether the notification carries events (an event-notification); refused when its
    first entry is not a notification status."""
    resource = entries[0].get("resource") if entries else None
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if kind not in NOTIFICATION_STATUS:
        raise Refused([Issue("unsupported_resource", 0, "resourceType")])
    try:
        status = NOTIFICATION_STATUS[kind].model_validate(resource)
    except (ValidationError, KeyError, TypeError, ValueError):
        raise Refused([Issue("invalid_resource", 0, kind)]) from None
    if kind == "SubscriptionStatus":
        return status.type == "event-notification"
    for parameter in status.parameter or []:
        if parameter.name == "type":
            return parameter.valueCode == "event-notification"
    return True


# --------------------------------------------------------------------------- a Bundle


@dataclass(frozen=True)
class _Resolved:
    id: int
    resource: Any = None  # the resource, when in the Bundle
    subject: int | None = None  # an Encounter's subject, when known


class _Bundle:
    def __init__(self, entries: list[dict], first: int, roots: list[Path], directory: Directory):
        self.raw = entries
        self.first = first
        self.roots = [os.path.realpath(r) for r in roots]
        self.directory = directory
        self.resources: dict[int, Any] = {}
        self.index: dict[str, int] = {}  # fullUrl and Type/id -> entry

    def map(self, bundle_type: str, bundle_id: str) -> Mapped:
        issues: list[Issue] = []
        for n in range(self.first, len(self.raw)):
            try:
                self._validate(n)
            except _EntryRefused as refused:
                issues.append(Issue(refused.reason, n, refused.where))
        if issues:
            raise Refused(issues)
        entries, encounters, patients = [], {}, {}
        for n in range(self.first, len(self.raw)):
            resource = self.resources[n]
            kind = type(resource).__name__
            try:
                mapped = getattr(self, f"_{kind.lower()}")(n, resource)
                events = [_identified(e) for e in mapped]
                for e in events:
                    ev.validate(e)
                if kind == "Encounter" and resource.id:
                    learnt = (self._hadm(resource), self._subject_of(resource))
                    encounters[f"Encounter/{resource.id}"] = learnt
                elif kind == "Patient" and resource.id:
                    patients[f"Patient/{resource.id}"] = _identifier(resource, "Patient")
            except _EntryRefused as refused:
                issues.append(Issue(refused.reason, n, refused.where))
                continue
            except ev.InvalidEvent as exc:
                issues.append(Issue("invalid_event", n, (exc.detail or exc.reason)[:120]))
                continue
            except ValidationError as exc:  # the field and the rule, never the value
                first = exc.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                issues.append(Issue("invalid_event", n, f"{where}: {first['type']}"[:120]))
                continue
            except Exception as exc:  # what no rule foresaw refuses its entry, never the server
                issues.append(Issue("invalid_resource", n, f"{kind}: {type(exc).__name__}"))
                continue
            entries.append(Entry(kind, events))
        if issues:
            raise Refused(issues)
        return Mapped(bundle_type, bundle_id, entries, encounters, patients)

    def _validate(self, n: int) -> None:
        entry = self.raw[n]
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise _EntryRefused("missing_field", "resource")
        kind = resource.get("resourceType")
        model = RESOURCES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise _EntryRefused("unsupported_resource", "resourceType")
        request = entry.get("request")
        if request is not None and (
            not isinstance(request, dict) or request.get("method") not in ("POST", "PUT")
        ):  # a DELETE or PATCH would undo or change what no event here can say
            raise _EntryRefused("unsupported_method", "request.method")
        if (where := _loose_base64(resource)) is not None:
            raise _EntryRefused("invalid_field", f"{kind}.{where}"[:120])
        try:
            parsed = model.model_validate(resource)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
            raise _EntryRefused("invalid_resource", f"{kind}.{where}"[:120]) from None
        except (KeyError, TypeError, ValueError):  # fhir.resources' own lookups
            raise _EntryRefused("invalid_resource", kind) from None
        self.resources[n] = parsed
        url = entry.get("fullUrl")
        if isinstance(url, str) and url:
            self.index[url] = n
        if parsed.id:
            self.index[f"{kind}/{parsed.id}"] = n

    # ---------------------------------------------------------------- references

    def _resolve(self, ref, kind: str, where: str) -> _Resolved:
        if ref is None:
            raise _EntryRefused("missing_field", where)
        target = ref.reference or ""
        if target:
            local = self.index.get(target)
            if local is None and "/" in target:  # an absolute URL naming Type/id
                local = self.index.get("/".join(target.rstrip("/").split("/")[-2:]))
            if local is not None:
                resource = self.resources[local]
                if type(resource).__name__ != kind:
                    raise _EntryRefused("unresolved_reference", where)
                subject = self._subject_of(resource) if kind == "Encounter" else None
                return _Resolved(_identifier(resource, kind), resource, subject)
        if ref.identifier is not None and ref.identifier.value:
            if not _DIGITS.fullmatch(ref.identifier.value):
                raise _EntryRefused("invalid_field", f"{where}.identifier")
            return _Resolved(int(ref.identifier.value))
        known = "/".join(target.rstrip("/").split("/")[-2:]) if target else ""
        if kind == "Encounter" and known in self.directory.encounters:
            hadm, subject = self.directory.encounters[known]
            return _Resolved(hadm, None, subject)
        if kind == "Patient" and known in self.directory.patients:
            return _Resolved(self.directory.patients[known])
        raise _EntryRefused("unresolved_reference", where)

    def _subject_of(self, encounter: Encounter) -> int | None:
        if encounter.subject is None:
            return None
        try:
            return self._resolve(encounter.subject, "Patient", "Encounter.subject").id
        except _EntryRefused:
            return None

    def _admission_of(self, ref, subject_ref, where: str) -> tuple[int, int]:
        """(hadm_id, subject_id) of the Encounter ``ref`` names."""
        encounter = self._resolve(ref, "Encounter", where)
        subject = encounter.subject
        if subject_ref is not None:
            subject = self._resolve(subject_ref, "Patient", where.split(".")[0] + ".subject").id
        if subject is None:
            raise _EntryRefused("unresolved_reference", where.split(".")[0] + ".subject")
        return encounter.id, subject

    def _hadm(self, encounter: Encounter) -> int:
        return _identifier(encounter, "Encounter")

    # ---------------------------------------------------------------- resources

    def _patient(self, n: int, patient: Patient) -> list:
        _identifier(patient, "Patient")
        return []

    def _location(self, n: int, location: Location) -> list:
        return []

    def _endpoint(self, n: int, endpoint: Endpoint) -> list:
        return []

    def _encounter(self, n: int, encounter: Encounter) -> list:
        hadm = self._hadm(encounter)
        status = encounter.status
        person = self._resolve(encounter.subject, "Patient", "Encounter.subject")
        envelope = dict(hadm_id=hadm, subject_id=person.id, source="fhir/Encounter")
        start = _instant(encounter.period.start if encounter.period else None)
        if status in NOT_YET:
            return []
        if status in CANCELLED:
            updated = encounter.meta.lastUpdated if encounter.meta else None
            when = _instant(updated) or start
            if when is None:
                raise _EntryRefused("missing_field", "Encounter.period.start")
            return [ev.CancelEvent(**_envelope(envelope, when), payload={"cancels": "admission"})]
        if status not in ADMITTED:
            raise _EntryRefused("invalid_field", "Encounter.status")
        if start is None:
            raise _EntryRefused("missing_field", "Encounter.period.start")
        patient = person.resource
        events: list = []
        if patient is not None:  # without it, an update of the transfers or the discharge
            events.append(self._admitted(encounter, patient, start, envelope))
        events += self._transfers(encounter, envelope)
        updated = _instant(encounter.meta.lastUpdated if encounter.meta else None)
        if status != "finished" and updated is not None and updated > start:
            cancel = {"cancels": "discharge"}
            events.append(ev.CancelEvent(**_envelope(envelope, updated), payload=cancel))
        if status == "finished":
            end = _instant(encounter.period.end)
            if end is None:
                raise _EntryRefused("missing_field", "Encounter.period.end")
            if end < start:
                raise _EntryRefused("invalid_field", "Encounter.period.end")
            hospitalization = encounter.hospitalization
            disposition = hospitalization.dischargeDisposition if hospitalization else None
            died = bool(_codes(disposition) & EXPIRED_DISPOSITIONS) or bool(
                patient is not None and patient.deceasedBoolean
            )
            payload = dict(
                dischtime=end, los_days=(end - start) / timedelta(days=1), hospital_expire_flag=died
            )
            events.append(ev.DischargeEvent(**_envelope(envelope, end), payload=payload))
        return events

    def _admitted(self, encounter: Encounter, patient: Patient, start: datetime, envelope):
        sex = {"male": "M", "female": "F"}.get(patient.gender or "")
        if sex is None:
            raise _EntryRefused("invalid_field", "Patient.gender")
        born = patient.birthDate
        if born is None:
            raise _EntryRefused("missing_field", "Patient.birthDate")
        if not isinstance(born, date):  # a year or a year-month only
            raise _EntryRefused("invalid_field", "Patient.birthDate")
        age = float(start.year - born.year - ((start.month, start.day) < (born.month, born.day)))
        if not 0 <= age <= 120:
            raise _EntryRefused("invalid_field", "Patient.birthDate")
        hospitalization = encounter.hospitalization
        source = hospitalization.admitSource if hospitalization else None
        payload = dict(
            admittime=start,
            admission_type=_admission_type(encounter),
            admission_location=_label(source),
            gender=sex,
            age=age,
        )
        return ev.AdmissionEvent(**_envelope(envelope, start), payload=payload)

    def _transfers(self, encounter: Encounter, envelope: dict) -> list:
        moves = []
        for k, stay in enumerate(encounter.location or []):
            if stay.status == "planned" or stay.period is None or stay.period.start is None:
                continue
            intime = _instant(stay.period.start)
            unit = self._careunit(stay.location, f"Encounter.location[{k}].location")
            payload = dict(careunit=unit, intime=intime)
            moves.append(ev.TransferEvent(**_envelope(envelope, intime), payload=payload))
        return moves

    def _careunit(self, ref, where: str) -> str:
        if ref.display:
            return ref.display[:128]
        local = self.index.get(ref.reference or "")
        if local is not None and isinstance(self.resources[local], Location):
            location = self.resources[local]
            if location.name:
                return location.name[:128]
        if ref.identifier is not None and ref.identifier.value:
            return ref.identifier.value[:128]
        raise _EntryRefused("missing_field", f"{where}.display")

    def _observation(self, n: int, observation: Observation) -> list:
        quantity = observation.valueQuantity
        if quantity is None:
            return []  # a text or coded result: not a feature
        code = next(
            (
                loinc.BY_LOINC[c.code]
                for c in (observation.code.coding or [])
                if c.system in (LOINC, None) and c.code in loinc.BY_LOINC
            ),
            None,
        )
        if code is None:
            raise _EntryRefused("unknown_loinc", "Observation.code")
        status = RESULT_STATUSES.get(observation.status or "")
        if status is None:
            raise _EntryRefused("unsupported_result_status", "Observation.status")
        unit = quantity.code or quantity.unit or ""
        convert = code.units.get(loinc.normalise_unit(unit))
        if convert is None:
            raise _EntryRefused("unknown_unit", "Observation.valueQuantity.code")
        if quantity.value is None:
            raise _EntryRefused("missing_field", "Observation.valueQuantity.value")
        if quantity.comparator:  # "> 300" is not 300: a bound is no value to fold
            raise _EntryRefused("invalid_field", "Observation.valueQuantity.comparator")
        period = observation.effectivePeriod
        charted = _instant(
            observation.effectiveDateTime
            or observation.effectiveInstant
            or (period.start if period else None)
        )
        try:
            payload = code.observation(
                convert(float(quantity.value)),
                charttime=charted,
                result_id=_result_id(observation),
                status=status,
            )
        except ValueError:
            raise _EntryRefused("invalid_field", "Observation.valueQuantity.value") from None
        if charted is None:
            raise _EntryRefused("missing_field", "Observation.effectiveDateTime")
        hadm, subject = self._admission_of(
            observation.encounter, observation.subject, "Observation.encounter"
        )
        return [
            ev.ObservationEvent(
                hadm_id=hadm,
                subject_id=subject,
                source="fhir/Observation",
                event_time=_utc(_instant(observation.issued) or charted),
                event_id="-",
                payload=payload,
            )
        ]

    def _diagnosticreport(self, n: int, report: DiagnosticReport) -> list:
        categories = {c for concept in report.category or [] for c in _codes(concept)}
        if "RAD" not in categories and not _codes(report.code) & RADIOLOGY_CODES:
            return []  # not a radiology report: not a feature
        text = None
        for k, form in enumerate(report.presentedForm or []):
            if form.data is not None:
                text = _attachment_text(form, f"DiagnosticReport.presentedForm[{k}]")
                break
        if text is None:
            text = report.conclusion
        if text is None:
            raise _EntryRefused("missing_field", "DiagnosticReport.presentedForm")
        charted = _instant(report.effectiveDateTime) or _instant(
            report.effectivePeriod.start if report.effectivePeriod else None
        )
        if charted is None:
            raise _EntryRefused("missing_field", "DiagnosticReport.effectiveDateTime")
        hadm, subject = self._admission_of(
            report.encounter, report.subject, "DiagnosticReport.encounter"
        )
        payload = dict(
            note_type="radiology",
            text=text,
            charttime=charted,
            note_id=_note_id(report, "DiagnosticReport"),
            from_hadm_id=hadm,
        )
        available = _instant(report.issued) or charted
        return [_note_event(hadm, subject, "fhir/DiagnosticReport", available, payload)]

    def _documentreference(self, n: int, document: DocumentReference) -> list:
        codes = _codes(document.type)
        if DISCHARGE_SUMMARY in codes:
            note_type = "discharge"
        elif codes & RADIOLOGY_CODES:
            note_type = "radiology"
        else:
            return []  # another kind of document: not a feature
        context = document.context
        encounters = context.encounter if context else None
        if not encounters:
            raise _EntryRefused("missing_field", "DocumentReference.context.encounter")
        hadm, subject = self._admission_of(
            encounters[0], document.subject, "DocumentReference.context.encounter"
        )
        written_by = hadm
        if note_type == "discharge":
            related = context.related or []
            if not related:
                raise _EntryRefused("missing_field", "DocumentReference.context.related")
            written_by = self._resolve(
                related[0], "Encounter", "DocumentReference.context.related"
            ).id
            if written_by == hadm:  # the current stay's summary would leak its outcome
                raise _EntryRefused("invalid_field", "DocumentReference.context.related")
        if not document.content:
            raise _EntryRefused("missing_field", "DocumentReference.content")
        content = document.content[0]
        text = _attachment_text(content.attachment, "DocumentReference.content[0].attachment")
        if text is None:
            raise _EntryRefused("missing_field", "DocumentReference.content[0].attachment.data")
        period = context.period
        dated = _instant(document.date)
        charted = _instant(period.start if period else None) or dated
        if charted is None:
            raise _EntryRefused("missing_field", "DocumentReference.date")
        payload = dict(
            note_type=note_type,
            text=text,
            charttime=charted,
            note_id=_note_id(document, "DocumentReference"),
            from_hadm_id=written_by,
        )
        return [_note_event(hadm, subject, "fhir/DocumentReference", dated or charted, payload)]

    def _imagingstudy(self, n: int, study: ImagingStudy) -> list:
        study_id = _identifier(study, "ImagingStudy")
        series = (study.series or [None])[0]
        instance = (series.instance or [None])[0] if series else None
        if instance is None:
            raise _EntryRefused("missing_field", "ImagingStudy.series[0].instance[0]")
        started = _instant(study.started)
        if started is None:
            raise _EntryRefused("missing_field", "ImagingStudy.started")
        uri = self._endpoint_address(study, series)
        hadm, subject = self._admission_of(study.encounter, study.subject, "ImagingStudy.encounter")
        payload = dict(
            study_id=study_id,
            dicom_id=instance.uid,
            view_position=instance.title,
            uri=uri,
            studytime=started,
        )
        envelope = dict(hadm_id=hadm, subject_id=subject, source="fhir/ImagingStudy")
        return [ev.CxrEvent(**_envelope(envelope, started), payload=payload)]

    def _endpoint_address(self, study: ImagingStudy, series) -> str:
        refs = list(study.endpoint or []) + list(series.endpoint or [])
        if not refs:
            raise _EntryRefused("missing_field", "ImagingStudy.endpoint")
        target = refs[0].reference or ""
        endpoint = None
        if target.startswith("#"):
            endpoint = next(
                (
                    c
                    for c in study.contained or []
                    if c.id == target[1:] and isinstance(c, Endpoint)
                ),
                None,
            )
        elif target in self.index and isinstance(self.resources[self.index[target]], Endpoint):
            endpoint = self.resources[self.index[target]]
        if endpoint is None:
            raise _EntryRefused("unresolved_reference", "ImagingStudy.endpoint")
        address = endpoint.address
        parsed = urlparse(address)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise _EntryRefused("outside_image_roots", "Endpoint.address")
        try:
            real = os.path.realpath(unquote(parsed.path))
        except ValueError:  # a NUL byte names no file
            raise _EntryRefused("outside_image_roots", "Endpoint.address") from None
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            raise _EntryRefused("outside_image_roots", "Endpoint.address")
        return address


# --------------------------------------------------------------------------- fields


def _identifier(resource, kind: str) -> int:
    """The first identifier made of digits (a MIMIC id), else the id if it is digits."""
    for identifier in resource.identifier or []:
        if identifier.value and _DIGITS.fullmatch(identifier.value):
            return int(identifier.value)
    if resource.id and _DIGITS.fullmatch(resource.id):
        return int(resource.id)
    raise _EntryRefused("missing_field", f"{kind}.identifier")


def _result_id(observation: Observation) -> str | None:
    for identifier in observation.identifier or []:
        if identifier.value:
            value = (
                f"{identifier.system}|{identifier.value}" if identifier.system else identifier.value
            )
            return value[:256]
    return f"Observation/{observation.id}" if observation.id else None


def _note_id(resource, kind: str) -> str:
    identifiers = list(resource.identifier or [])
    master = getattr(resource, "masterIdentifier", None)
    for identifier in ([master] if master else []) + identifiers:
        if identifier.value:
            return identifier.value[:128]
    if resource.id:
        return resource.id
    raise _EntryRefused("missing_field", f"{kind}.identifier")


def _codes(concept) -> set[str]:
    return {c.code for c in (concept.coding or []) if c.code} if concept else set()


def _label(concept) -> str | None:
    if concept is None:
        return None
    if concept.text:
        return concept.text[:128]
    for coding in concept.coding or []:
        if coding.display or coding.code:
            return (coding.display or coding.code)[:128]
    return None


def _admission_type(encounter: Encounter) -> str:
    for concept in encounter.type or []:
        for coding in concept.coding or []:
            if coding.system == MIMIC_ADMISSION_TYPE and coding.code:
                return coding.code[:128]
    for code in _codes(encounter.priority):
        if code in PRIORITIES:
            return PRIORITIES[code]
    klass = encounter.class_fhir
    return CLASSES.get(klass.code or "", "") if klass else ""


def _attachment_text(attachment, where: str) -> str | None:
    if attachment.data is None:
        return None
    content_type = (attachment.contentType or "text/plain").split(";")[0].strip().lower()
    if content_type != "text/plain":
        raise _EntryRefused("invalid_field", f"{where}.contentType")
    data = attachment.data
    try:
        raw = data if isinstance(data, bytes) else base64.b64decode(data, validate=True)
        return raw.decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _EntryRefused("invalid_field", f"{where}.data") from None


def _loose_base64(node, path: str = "") -> str | None:
    """The path of the first base64Binary ``data`` that is not strict base64, else None:
    fhir.resources decodes leniently, so "!!!" would pass as an empty text."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key == "data" and isinstance(value, str):
                try:
                    base64.b64decode(value, validate=True)
                except binascii.Error:
                    return where
            elif (found := _loose_base64(value, where)) is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            if (found := _loose_base64(value, path)) is not None:
                return found
    return None


def _instant(value) -> datetime | None:
    """A FHIR dateTime as the contract's naive UTC time (as ``ingest.hl7`` converts)."""
    if value is None or not isinstance(value, datetime):
        return None
    if value.tzinfo is not None:
        try:
            value = value.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31 west of it
            raise _EntryRefused("invalid_field", "dateTime out of range") from None
    return value


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _envelope(envelope: dict, when: datetime) -> dict:
    return dict(envelope, event_time=_utc(when), event_id="-")


def _note_event(hadm: int, subject: int, source: str, available: datetime, payload: dict):
    return ev.NoteEvent(
        hadm_id=hadm,
        subject_id=subject,
        source=source,
        event_time=_utc(available),
        event_id="-",
        payload=payload,
    )


def _identified(event):
    """The event with its content-addressed id: what it says, not how it was sent."""
    digest = ev.content_digest(event).hex()
    return event.model_copy(update={"event_id": ev.event_id(SOURCE, f"{event.type}/{digest}")})
