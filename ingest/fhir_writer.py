"""A cohort's events as FHIR R4 Bundles (``m3t ingest synth --format fhir``).

The inverse of ``ingest.fhir``: each admission's events, read from the cohort's MIMIC-IV
layout, become transaction Bundles, one per admission-hour (an admission and a discharge
each open a Bundle of their own), with the same event times. ``bundles.ndjson`` holds one
Bundle a line in event-time order, the order a hospital would send them; posted to
``POST /fhir`` they give the events ``m3t ingest replay`` gives, but for their ids, sources
and the fields FHIR has no place for (insurance, the unit as MIMIC spelled it).

References carry both a ``reference`` and an ``identifier`` (the MIMIC id), so each Bundle
stands on its own: an Observation in a later hour names its Encounter by identifier.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ingest import events as ev
from ingest import loinc
from ingest.fhir import DISCHARGE_SUMMARY, LOINC, MIMIC_ADMISSION_TYPE

ENCOUNTER_SYSTEM = "http://mimic.mit.edu/fhir/mimic/identifier/encounter-hosp"
PATIENT_SYSTEM = "http://mimic.mit.edu/fhir/mimic/identifier/patient"
UCUM = "http://unitsofmeasure.org"
DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
# Each item's UCUM unit (its MIMIC unit, as ingest.loinc spells it) and its first LOINC code.
UCUM_UNITS = {
    50912: "mg/dL",
    51006: "mg/dL",
    50983: "mmol/L",
    50971: "mmol/L",
    50882: "mmol/L",
    50931: "mg/dL",
    51222: "g/dL",
    51301: "10*3/uL",
    51265: "10*3/uL",
    50813: "mmol/L",
    220045: "/min",
    220179: "mm[Hg]",
    220180: "mm[Hg]",
    220210: "/min",
    220277: "%",
    223761: "[degF]",
}
LOINC_OF_ITEM = {}
for _code in loinc.CODES:
    LOINC_OF_ITEM.setdefault(_code.itemid, _code.loinc)
assert all(
    loinc.normalise_unit(unit) in loinc.BY_LOINC[LOINC_OF_ITEM[item]].units
    for item, unit in UCUM_UNITS.items()
), "a UCUM unit the LOINC table does not take"


@dataclass(frozen=True)
class Written:
    bundles: int
    entries: int
    events: int
    skipped: int  # events with no FHIR form here (items without a LOINC code)
    path: Path


def write_cohort(root: Path, out: Path) -> Written:
    """Read the cohort at ``root`` (MIMIC-IV layout) and write ``out/bundles.ndjson``."""
    from ingest.mimic import MimicReader

    return write_bundles(MimicReader(root).admissions(), out)


def write_bundles(admissions: Iterable[list], out: Path) -> Written:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bundles.ndjson"
    counts = {"bundles": 0, "entries": 0, "events": 0, "skipped": 0}
    with path.open("w") as sink:
        for bundle, events, skipped in bundles(admissions):
            counts["skipped"] += skipped
            if not bundle["entry"]:
                continue
            sink.write(json.dumps(bundle, separators=(",", ":")) + "\n")
            counts["bundles"] += 1
            counts["entries"] += len(bundle["entry"])
            counts["events"] += events
    return Written(path=path, **counts)


def bundles(admissions: Iterable[list]) -> Iterator[tuple[dict, int, int]]:
    """(Bundle, events in it, events skipped) in the order of each Bundle's first event."""
    heap = []
    for events in admissions:
        ordered = sorted(events, key=ev.sort_key)
        admitted = next((e.payload.admittime for e in ordered if e.type == "admission"), None)
        for group in _groups(ordered):
            heapq.heappush(heap, (ev.sort_key(group[0]), len(heap), group, admitted))
    while heap:
        _, _, group, admitted = heapq.heappop(heap)
        yield _bundle(group, admitted)


def _groups(events: list) -> Iterator[list]:
    """An admission's events by hour; an admission or a discharge opens a group of its own
    (one Encounter a Bundle)."""
    group: list = []
    for event in events:
        if group and (
            event.type in ("admission", "discharge", "transfer")
            or group[-1].type in ("discharge", "transfer")
            or _hour(group[0]) != _hour(event)
        ):
            yield group
            group = []
        group.append(event)
    if group:
        yield group


def _hour(event) -> datetime:
    return event.event_time.replace(minute=0, second=0, microsecond=0)


def _bundle(group: list, admitted: datetime | None) -> tuple[dict, int, int]:
    first = group[0]
    entries, taken, skipped = [], 0, 0
    for event in group:
        resources = _resources(event, admitted)
        if resources is None:
            skipped += 1
            continue
        taken += 1
        entries.extend(resources)
    digest = ev.event_id("fhir-bundle", "/".join(e.event_id for e in group))
    bundle = {
        "resourceType": "Bundle",
        "id": digest,
        "type": "transaction",
        "timestamp": _time(first.event_time),
        "entry": [_entry(resource) for resource in entries],
    }
    return bundle, taken, skipped


def _entry(resource: dict) -> dict:
    kind, rid = resource["resourceType"], resource.get("id")
    if rid:
        return {
            "fullUrl": f"urn:uuid:{_uuid(kind, rid)}",
            "resource": resource,
            "request": {"method": "PUT", "url": f"{kind}/{rid}"},
        }
    return {"resource": resource, "request": {"method": "POST", "url": kind}}


def _uuid(kind: str, rid: str) -> str:
    h = ev.event_id("fhir-uuid", f"{kind}/{rid}")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:24]}0000000{h[0]}"[:36]


def _resources(event, admitted: datetime | None) -> list[dict] | None:
    if event.type in ("discharge", "transfer"):
        if admitted is None:
            return None  # an Encounter needs its start
        return (_discharge if event.type == "discharge" else _transfer)(event, admitted)
    build = {
        "admission": _admission,
        "observation": _observation,
        "note": _note,
        "cxr": _cxr,
    }.get(event.type)
    return None if build is None else build(event)


def _patient_ref(event) -> dict:
    return {
        "reference": f"Patient/{event.subject_id}",
        "identifier": {"system": PATIENT_SYSTEM, "value": str(event.subject_id)},
    }


def _encounter_ref(hadm_id: int) -> dict:
    return {
        "reference": f"Encounter/{hadm_id}",
        "identifier": {"system": ENCOUNTER_SYSTEM, "value": str(hadm_id)},
    }


def _encounter(event, status: str, period: dict, **extra) -> dict:
    return {
        "resourceType": "Encounter",
        "id": str(event.hadm_id),
        "identifier": [{"system": ENCOUNTER_SYSTEM, "value": str(event.hadm_id)}],
        "status": status,
        "class": {"system": ACT_CODE, "code": "IMP"},
        "subject": _patient_ref(event),
        "period": period,
        **extra,
    }


def _admission(event) -> list[dict]:
    p = event.payload
    born = f"{p.admittime.year - int(p.age):04d}-01-01"  # whole years at admission
    patient = {
        "resourceType": "Patient",
        "id": str(event.subject_id),
        "identifier": [{"system": PATIENT_SYSTEM, "value": str(event.subject_id)}],
        "gender": {"M": "male", "F": "female"}[p.gender],
        "birthDate": born,
    }
    extra: dict = {}
    if p.admission_type:
        extra["type"] = [{"coding": [{"system": MIMIC_ADMISSION_TYPE, "code": p.admission_type}]}]
    if p.admission_location:
        extra["hospitalization"] = {"admitSource": {"text": p.admission_location}}
    encounter = _encounter(event, "in-progress", {"start": _time(p.admittime)}, **extra)
    return [patient, encounter]


def _discharge(event, admitted: datetime) -> list[dict]:
    p = event.payload
    code = "exp" if p.hospital_expire_flag else "home"
    hospitalization = {"dischargeDisposition": {"coding": [{"system": DISPOSITION, "code": code}]}}
    period = {"start": _time(admitted), "end": _time(p.dischtime)}
    return [_encounter(event, "finished", period, hospitalization=hospitalization)]


def _observation(event) -> list[dict] | None:
    p = event.payload
    unit = UCUM_UNITS.get(p.itemid)
    if unit is None:
        return None
    resource = {
        "resourceType": "Observation",
        "status": {"final": "final", "corrected": "corrected", "preliminary": "preliminary"}[
            p.status
        ],
        "category": [
            {
                "coding": [
                    {
                        "system": OBSERVATION_CATEGORY,
                        "code": "laboratory" if p.kind == "lab" else "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": LOINC_OF_ITEM[p.itemid]}]},
        "subject": _patient_ref(event),
        "encounter": _encounter_ref(event.hadm_id),
        "effectiveDateTime": _time(p.charttime),
        "issued": _time(event.event_time),
        "valueQuantity": {"value": p.value, "unit": unit, "system": UCUM, "code": unit},
    }
    if p.result_id:
        resource["identifier"] = [{"value": p.result_id}]
    return [resource]


def _note(event) -> list[dict]:
    p = event.payload
    data = base64.b64encode(p.text.encode()).decode()
    if p.note_type == "radiology":
        return [
            {
                "resourceType": "DiagnosticReport",
                "identifier": [{"value": p.note_id}],
                "status": "final",
                "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
                "code": {"coding": [{"system": LOINC, "code": "18748-4"}]},
                "subject": _patient_ref(event),
                "encounter": _encounter_ref(event.hadm_id),
                "effectiveDateTime": _time(p.charttime),
                "issued": _time(event.event_time),
                "presentedForm": [{"contentType": "text/plain", "data": data}],
            }
        ]
    return [
        {
            "resourceType": "DocumentReference",
            "masterIdentifier": {"value": p.note_id},
            "status": "current",
            "type": {"coding": [{"system": LOINC, "code": DISCHARGE_SUMMARY}]},
            "subject": _patient_ref(event),
            "date": _time(event.event_time),
            "content": [{"attachment": {"contentType": "text/plain", "data": data}}],
            "context": {
                "encounter": [_encounter_ref(event.hadm_id)],
                "period": {"start": _time(p.charttime)},
                "related": [_encounter_ref(p.from_hadm_id)],
            },
        }
    ]


def _cxr(event) -> list[dict]:
    p = event.payload
    instance = {
        "uid": p.dicom_id,
        "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1"},
    }
    if p.view_position:
        instance["title"] = p.view_position
    return [
        {
            "resourceType": "ImagingStudy",
            "identifier": [{"value": str(p.study_id)}],
            "status": "available",
            "contained": [
                {
                    "resourceType": "Endpoint",
                    "id": "image",
                    "status": "active",
                    "connectionType": {
                        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                        "code": "direct-project",
                    },
                    "payloadType": [{"text": "DICOM or JPEG file"}],
                    "address": p.uri,
                }
            ],
            "subject": _patient_ref(event),
            "encounter": _encounter_ref(event.hadm_id),
            "started": _time(p.studytime),
            "endpoint": [{"reference": "#image"}],
            "series": [
                {
                    "uid": p.dicom_id,
                    "modality": {
                        "system": "http://dicom.nema.org/resources/ontology/DCM",
                        "code": "CR",
                    },
                    "instance": [instance],
                }
            ],
        }
    ]


def _transfer(event, admitted: datetime) -> list[dict]:
    p = event.payload
    location = {"location": {"display": p.careunit}, "period": {"start": _time(p.intime)}}
    period = {"start": _time(admitted)}
    return [_encounter(event, "in-progress", period, location=[location])]


def _time(moment: datetime) -> str:
    """A FHIR dateTime in UTC (the contract's naive times are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()
