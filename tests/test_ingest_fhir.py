"""FHIR R4 into the event contract, and POST /fhir against the real Kafka, driven by httpx
(not the project's code): tokens, exactly the events on the topic, refusals with an
OperationOutcome and a dead letter, Subscription notifications; and the synthetic cohort
posted as Bundles gives the stream worker the features ``ingest replay`` gives it."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.browser import serving
from ingest import fhir, fhir_writer
from ingest.mimic import MimicReader
from ingest.synth import generate
from stream.api_tokens import TokenStore
from tests.conftest import consume, replay_all

ENC = {"system": fhir_writer.ENCOUNTER_SYSTEM, "value": "2001"}
PAT = {"system": fhir_writer.PATIENT_SYSTEM, "value": "1001"}
NAMES = ("1001", "2001", "Jane", "1960", "400", "106")


def patient(**extra) -> dict:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [PAT],
        "name": [{"given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1960-02-15",
        **extra,
    }


def encounter(status="in-progress", **extra) -> dict:
    return {
        "resourceType": "Encounter",
        "id": "e1",
        "identifier": [ENC],
        "status": status,
        "class": {"system": fhir_writer.ACT_CODE, "code": "EMER"},
        "subject": {"reference": "urn:uuid:patient"},
        "period": {"start": "2024-03-01T08:00:00-05:00"},
        **extra,
    }


def observation(code="14682-9", value=106, unit="umol/L", status="final", **extra) -> dict:
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": status,
        "code": {"coding": [{"system": fhir.LOINC, "code": code}]},
        "subject": {"reference": "urn:uuid:patient"},
        "encounter": {"reference": "urn:uuid:encounter"},
        "effectiveDateTime": "2024-03-01T14:00:00Z",
        "issued": "2024-03-01T14:30:00Z",
        "valueQuantity": {"value": value, "system": fhir_writer.UCUM, "code": unit},
        **extra,
    }


def bundle(*resources: dict, kind="transaction") -> dict:
    urls = {"Patient": "urn:uuid:patient", "Encounter": "urn:uuid:encounter"}
    entries = []
    for r in resources:
        entry = {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
        if r["resourceType"] in urls:
            entry["fullUrl"] = urls[r["resourceType"]]
        entries.append(entry)
    return {"resourceType": "Bundle", "id": "b1", "type": kind, "entry": entries}


def text(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def mapped(*resources: dict, **kw) -> list:
    return fhir.to_events(bundle(*resources), **kw).events


# --------------------------------------------------------------------------- mapping


def test_an_encounter_in_progress_with_its_patient_is_an_admission_in_utc():
    [event] = mapped(patient(), encounter())
    assert (event.type, event.hadm_id, event.subject_id) == ("admission", 2001, 1001)
    p = event.payload
    assert p.admittime.isoformat() == "2024-03-01T13:00:00" and p.gender == "F" and p.age == 64
    assert p.admission_type == "EW EMER." and event.source == "fhir/Encounter"
    typed = encounter(
        type=[
            {
                "coding": [
                    {"system": fhir.MIMIC_ADMISSION_TYPE, "code": "SURGICAL SAME DAY ADMISSION"}
                ]
            }
        ]
    )
    assert mapped(patient(), typed)[0].payload.admission_type == "SURGICAL SAME DAY ADMISSION"
    urgent = encounter(priority={"coding": [{"code": "UR"}]})
    assert mapped(patient(), urgent)[0].payload.admission_type == "URGENT"


def test_a_finished_encounter_is_a_discharge_and_expired_or_deceased_means_died():
    period = {"start": "2024-03-01T08:00:00Z", "end": "2024-03-05T20:00:00Z"}
    home = {"dischargeDisposition": {"coding": [{"code": "home"}]}}
    died = {"dischargeDisposition": {"coding": [{"code": "exp"}]}}
    admission, discharge = mapped(
        patient(), encounter("finished", period=period, hospitalization=home)
    )
    assert admission.type == "admission" and discharge.type == "discharge"
    assert discharge.payload.los_days == pytest.approx(4.5)
    assert discharge.payload.hospital_expire_flag is False
    alone = mapped(
        encounter("finished", period=period, hospitalization=died, subject={"identifier": PAT})
    )
    assert [e.type for e in alone] == ["discharge"] and alone[0].payload.hospital_expire_flag
    deceased = mapped(patient(deceasedBoolean=True), encounter("finished", period=period))
    assert deceased[1].payload.hospital_expire_flag


def test_locations_are_transfers_and_a_cancelled_encounter_cancels_the_admission():
    stays = [
        {"location": {"display": "MICU"}, "period": {"start": "2024-03-02T10:00:00Z"}},
        {
            "location": {"display": "Ward 7"},
            "status": "planned",
            "period": {"start": "2024-03-09T10:00:00Z"},
        },
    ]
    admission, transfer = mapped(patient(), encounter(location=stays))
    assert transfer.type == "transfer" and transfer.payload.careunit == "MICU"
    assert transfer.payload.intime.isoformat() == "2024-03-02T10:00:00"
    [cancel] = mapped(
        encounter(
            "entered-in-error",
            subject={"identifier": PAT},
            meta={"lastUpdated": "2024-03-01T09:00:00Z"},
        )
    )
    assert cancel.type == "cancel" and cancel.payload.cancels == "admission"
    assert cancel.event_time.isoformat() == "2024-03-01T09:00:00+00:00"


def test_an_encounter_in_progress_again_cancels_the_discharge_sent_before():
    from features.state import AdmissionState
    from features.vocab import Vocabulary

    period = {"start": "2024-03-01T08:00:00Z", "end": "2024-03-05T20:00:00Z"}
    admitted, discharged = mapped(patient(), encounter("finished", period=period))
    again = {"lastUpdated": "2024-03-06T07:00:00Z"}
    [_, reopened] = mapped(patient(), encounter("in-progress", meta=again))
    assert reopened.type == "cancel" and reopened.payload.cancels == "discharge"
    assert reopened.event_time.isoformat() == "2024-03-06T07:00:00+00:00"
    # without an update time, or updated when it started, it says nothing of a discharge
    assert [e.type for e in mapped(patient(), encounter())] == ["admission"]
    state, vocab = AdmissionState(), Vocabulary.fit([])
    for event in (admitted, discharged):
        state.apply(event, vocab)
    assert state.discharged
    state.apply(reopened, vocab)
    assert not state.discharged


def test_an_observation_is_converted_with_its_status_and_result_id():
    [obs] = mapped(patient(), encounter(), observation())[1:]
    assert obs.payload.itemid == 50912 and obs.payload.unit == "mg/dL"
    assert obs.payload.value == pytest.approx(106 / 88.42) and obs.payload.status == "final"
    assert obs.payload.result_id == "Observation/o1"
    assert obs.payload.charttime.isoformat() == "2024-03-01T14:00:00"
    assert obs.event_time.isoformat() == "2024-03-01T14:30:00+00:00"
    corrected = observation(
        value=120, status="amended", identifier=[{"system": "urn:lab", "value": "R9"}]
    )
    [fix] = mapped(patient(), encounter(), corrected)[1:]
    assert fix.payload.status == "corrected" and fix.payload.result_id == "urn:lab|R9"
    assert fix.event_id != obs.event_id
    text_result = observation()
    del text_result["valueQuantity"]
    text_result["valueString"] = "looks fine"
    assert mapped(patient(), encounter(), text_result)[1:] == []  # not a feature


def test_reports_documents_and_imaging_studies_become_notes_and_xrays(tmp_path):
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"value": "RR-1"}],
        "status": "final",
        "category": [{"coding": [{"code": "RAD"}]}],
        "code": {"text": "CXR"},
        "encounter": {"reference": "urn:uuid:encounter"},
        "effectiveDateTime": "2024-03-01T15:00:00Z",
        "issued": "2024-03-01T16:00:00Z",
        "presentedForm": [{"contentType": "text/plain", "data": text("No effusion.\n")}],
    }
    summary = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"value": "DS-1"},
        "status": "current",
        "type": {"coding": [{"system": fhir.LOINC, "code": "18842-5"}]},
        "date": "2024-03-01T13:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain", "data": text("Prior stay.")}}],
        "context": {
            "encounter": [{"reference": "urn:uuid:encounter"}],
            "related": [{"identifier": {"value": "1999"}}],
        },
    }
    image = tmp_path / "cxr.jpg"
    study = {
        "resourceType": "ImagingStudy",
        "identifier": [{"value": "555"}],
        "status": "available",
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "img",
                "status": "active",
                "connectionType": {"code": "direct-project"},
                "payloadType": [{"text": "file"}],
                "address": image.as_uri(),
            }
        ],
        "subject": {"reference": "urn:uuid:patient"},
        "encounter": {"reference": "urn:uuid:encounter"},
        "started": "2024-03-01T17:00:00Z",
        "endpoint": [{"reference": "#img"}],
        "series": [
            {
                "uid": "s1",
                "modality": {"code": "CR"},
                "instance": [{"uid": "d-1", "sopClass": {"code": "x"}, "title": "PA"}],
            }
        ],
    }
    events = mapped(patient(), encounter(), report, summary, study, roots=[tmp_path])[1:]
    radiology, discharge, cxr = events
    assert radiology.payload.note_type == "radiology" and radiology.payload.text == "No effusion.\n"
    assert radiology.payload.note_id == "RR-1" and radiology.payload.from_hadm_id == 2001
    assert radiology.event_time.isoformat() == "2024-03-01T16:00:00+00:00"
    assert discharge.payload.note_type == "discharge" and discharge.payload.from_hadm_id == 1999
    assert cxr.type == "cxr" and cxr.payload.study_id == 555 and cxr.payload.dicom_id == "d-1"
    assert cxr.payload.uri == image.as_uri() and cxr.payload.view_position == "PA"
    with pytest.raises(fhir.Refused) as outside:  # an image outside the roots
        mapped(patient(), encounter(), study, roots=[tmp_path / "elsewhere"])
    assert outside.value.issues[0].reason == "outside_image_roots"
    study["contained"][0]["address"] = f"file://{tmp_path}/%00cxr.jpg"  # a NUL names no file
    with pytest.raises(fhir.Refused) as nul:
        mapped(patient(), encounter(), study, roots=[tmp_path])
    assert nul.value.issues[0].reason == "outside_image_roots"


def test_references_resolve_by_bundle_identifier_or_an_id_seen_before():
    directory = fhir.Directory()
    first = fhir.to_events(bundle(patient(), encounter()), directory=directory)
    directory.learn(first)
    later = observation(
        encounter={"reference": "Encounter/e1"}, subject={"reference": "Patient/p1"}
    )
    [obs] = fhir.to_events(bundle(later), directory=directory).events
    assert (obs.hadm_id, obs.subject_id) == (2001, 1001)
    by_identifier = observation(encounter={"identifier": ENC}, subject={"identifier": PAT})
    assert fhir.to_events(bundle(by_identifier)).events[0].hadm_id == 2001
    with pytest.raises(fhir.Refused) as unknown:
        fhir.to_events(bundle(later))  # a new process has not seen e1
    assert unknown.value.issues[0].reason == "unresolved_reference"


def test_a_resent_bundle_gives_the_same_event_ids():
    one = mapped(patient(), encounter(), observation())
    again = mapped(patient(), encounter(), observation())
    assert [e.event_id for e in one] == [e.event_id for e in again]


def radiology_document(content: list) -> dict:
    return {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"value": "RR-2"},
        "status": "current",
        "type": {"coding": [{"system": fhir.LOINC, "code": "18748-4"}]},
        "date": "2024-03-01T13:00:00Z",
        "content": content,
        "context": {"encounter": [{"reference": "urn:uuid:encounter"}]},
    }


def test_an_error_no_rule_foresaw_refuses_its_entry_not_the_server(monkeypatch):
    def broken(self, n, observation):
        raise KeyError("Jane")  # a lookup's error, carrying a value

    monkeypatch.setattr(fhir._Bundle, "_observation", broken)
    [issue] = _refused(bundle(patient(), encounter(), observation())).issues
    assert (issue.reason, issue.entry, issue.where) == (
        "invalid_resource",
        2,
        "Observation: KeyError",
    )


def _refused(raw, **kw) -> fhir.Refused:
    with pytest.raises(fhir.Refused) as refused:
        fhir.to_events(raw, **kw)
    return refused.value


@pytest.mark.parametrize(
    ("resources", "reason", "where"),
    [
        ((patient(), encounter(), observation(code="9999-9")), "unknown_loinc", "Observation.code"),
        (
            (patient(), encounter(), observation(unit="g/L")),
            "unknown_unit",
            "Observation.valueQuantity.code",
        ),
        (
            (patient(), encounter(), observation(status="registered")),
            "unsupported_result_status",
            "Observation.status",
        ),
        ((patient(), observation()), "unresolved_reference", "Observation.encounter"),
        (
            (patient(), encounter(), observation(value=400, unit="mg/dL", code="2160-0")),
            "invalid_event",
            "",
        ),
        ((patient(gender="unknown"), encounter()), "invalid_field", "Patient.gender"),
        (
            (patient(), encounter(identifier=[{"value": "Jane"}])),
            "missing_field",
            "Encounter.identifier",
        ),
        (
            (patient(), {"resourceType": "Practitioner", "id": "x"}),
            "unsupported_resource",
            "resourceType",
        ),
        ((patient(), encounter(status="bogus")), "invalid_field", "Encounter.status"),
        (
            (patient(), {**observation(), "effectiveDateTime": "2024-03-01T14:00:00"}),
            "invalid_resource",
            "Observation.effectiveDateTime",
        ),
        (  # "> 300" is a bound, not a value
            (
                patient(),
                encounter(),
                observation(code="8867-4", value=300, unit="/min")
                | {"valueQuantity": {"value": 300, "comparator": ">", "code": "/min"}},
            ),
            "invalid_field",
            "Observation.valueQuantity.comparator",
        ),
        (  # east of UTC on the first day there is: before year 1 in UTC
            (patient(), encounter(period={"start": "0001-01-01T00:00:00+14:00"})),
            "invalid_field",
            "dateTime out of range",
        ),
        ((patient(), encounter(), radiology_document([])), "missing_field", "content"),
        (  # fhir.resources would decode "!!!" leniently into an empty text
            (patient(), encounter(), radiology_document([{"attachment": {"data": "!!!"}}])),
            "invalid_field",
            "DocumentReference.content.attachment.data",
        ),
    ],
)
def test_what_cannot_be_taken_is_an_issue_naming_the_entry_and_field_never_a_value(
    resources, reason, where
):
    refused = _refused(bundle(*resources))
    [issue] = refused.issues
    assert issue.reason == reason and issue.entry == len(resources) - 1
    assert where in issue.diagnostics and issue.code == fhir.REASONS[reason][0]
    assert not any(value in issue.diagnostics for value in NAMES)


def test_what_is_not_a_bundle_or_too_big_is_refused_whole():
    assert _refused(b"{not json").reason == "malformed_json"
    assert _refused(json.dumps(patient())).reason == "not_a_bundle"
    assert _refused(b"\xff\xfe").reason == "invalid_utf8"
    assert _refused(json.dumps(bundle(patient(), kind="searchset"))).reason == (
        "unsupported_bundle_type"
    )
    assert _refused({"resourceType": "Bundle", "type": {}}).reason == "unsupported_bundle_type"
    no_list = {"resourceType": "Bundle", "type": "collection", "entry": {}}
    assert _refused(no_list).reason == "invalid_resource"
    big = json.dumps(bundle(patient(), encounter()))
    refused = _refused(big, max_bytes=100)
    assert refused.reason == "oversized_bundle" and refused.status == 413
    # every bad entry is named, not only the first
    two = _refused(bundle(patient(), encounter(), observation(code="1-1"), observation(unit="x")))
    assert [(i.entry, i.reason) for i in two.issues] == [(2, "unknown_loinc"), (3, "unknown_unit")]


def test_the_synthetic_cohort_as_bundles_maps_back_to_replays_events(tmp_path):
    generate(tmp_path / "cohort", 4, seed=5, image_size=32, dicom=False)
    admissions = list(MimicReader(tmp_path / "cohort").admissions())
    written = fhir_writer.write_bundles(admissions, tmp_path / "fhir")
    directory, got = fhir.Directory(), []
    for line in written.path.read_text().splitlines():
        result = fhir.to_events(line, roots=[tmp_path], directory=directory)
        directory.learn(result)
        got += result.events
    assert written.events == len(got) == sum(len(a) for a in admissions) and not written.skipped
    assert _contents(got) == _contents(e for events in admissions for e in events)


def test_synth_format_fhir_writes_the_cohort_as_bundles(tmp_path):
    from typer.testing import CliRunner

    from ingest.cli import app

    args = ["synth", "--admissions", "2", "--seed", "3", "--image-size", "32", "--no-dicom"]
    run = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--format", "fhir", "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    lines = Path(summary["fhir_file"]).read_text().splitlines()
    assert len(lines) == summary["fhir_bundles"] > 0
    assert all(json.loads(line)["type"] == "transaction" for line in lines)
    wrong = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--format", "csv"])
    assert wrong.exit_code != 0


def _contents(events) -> list:
    """What each event says, but what FHIR has no place for (insurance, MIMIC's unit)."""
    kept = []
    for e in events:
        p = e.payload.model_dump(exclude={"unit", "insurance", "admission_location", "result_id"})
        kept.append((e.type, e.hadm_id, e.subject_id, e.event_time, json.dumps(p, default=str)))
    return sorted(kept)


# --------------------------------------------------------------------------- the API


def fhir_post(client: httpx.Client, path: str, body, token: str) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    return client.post(path, content=raw, headers=headers)


@pytest.fixture
def api(isolated_settings):
    """The API on this test's topics, with tokens of each role (names of this test's own)."""
    ingest = isolated_settings.ingest.model_copy(update={"fhir_max_bundle_bytes": 64 * 1024})
    limits = isolated_settings.api.model_copy(
        update={"rate_limit_per_minute": 4, "ingest_rate_limit_per_minute": 100_000}
    )
    cfg = isolated_settings.model_copy(update={"ingest": ingest, "api": limits})
    store, tag = TokenStore(cfg), uuid.uuid4().hex[:8]
    tokens = {role: store.add(f"{role}-{tag}", role) for role in ("reader", "ingest")}
    tokens["subscription"] = store.add(f"subscription-{tag}", "ingest")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield cfg, client, tokens
    for name in (f"reader-{tag}", f"ingest-{tag}", f"subscription-{tag}"):
        store.revoke(name)


@pytest.mark.services
def test_post_fhir_takes_a_bundle_once_kafka_has_its_events(api):
    cfg, client, tokens = api
    stay = bundle(patient(), encounter(), observation())
    expected = [e.event_id for e in fhir.to_events(stay).events]
    assert fhir_post(client, "/fhir", stay, "no-such-token").status_code == 401
    assert fhir_post(client, "/fhir", stay, tokens["reader"]).status_code == 403
    reading = client.get("/risk/top", headers={"Authorization": f"Bearer {tokens['ingest']}"})
    assert reading.status_code == 403  # a feed reads nothing
    answer = fhir_post(client, "/fhir", stay, tokens["ingest"])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    body = answer.json()
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == [
        "200 OK",
        "201 Created",
        "201 Created",
    ]
    assert fhir_post(client, "/fhir", stay, tokens["ingest"]).status_code == 200  # resent
    records = consume(cfg, cfg.kafka.topic_events, 5, wait_ms=5_000)
    got = [json.loads(r.value) for r in records]
    assert sorted(e["event_id"] for e in got) == sorted(expected * 2)  # same ids: applied once
    assert {r.key for r in records} == {b"2001"}


@pytest.mark.services
def test_a_collection_bundle_without_requests_is_taken_as_a_batch(api):
    cfg, client, tokens = api
    stay = bundle(patient(), encounter(), observation(), kind="collection")
    for entry in stay["entry"]:
        del entry["request"]  # a collection carries resources, not requests
    expected = sorted(e.event_id for e in fhir.to_events(stay).events)
    answer = fhir_post(client, "/fhir", stay, tokens["ingest"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["type"] == "batch-response" and len(answer.json()["entry"]) == 3
    records = consume(cfg, cfg.kafka.topic_events, len(expected) + 1, wait_ms=5_000)
    assert sorted(json.loads(r.value)["event_id"] for r in records) == expected


@pytest.mark.single_node  # a broker away at the single node's port
@pytest.mark.services
def test_without_kafka_a_bundle_is_503_and_its_resend_is_taken_once(api):
    from m3t.services.process import free_ports

    cfg, client, tokens = api
    (nowhere,) = free_ports(1)
    down = cfg.model_copy(
        update={
            "kafka": cfg.kafka.model_copy(update={"port": nowhere}),
            "ingest": cfg.ingest.model_copy(update={"fhir_kafka_timeout_s": 2}),
        }
    )
    stay = bundle(patient(), encounter(), observation())
    with serving(down) as url, httpx.Client(base_url=url, timeout=30) as unreachable:
        refused = fhir_post(unreachable, "/fhir", stay, tokens["ingest"])
    assert refused.status_code == 503
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "transient"
    assert fhir_post(client, "/fhir", stay, tokens["ingest"]).status_code == 200  # the resend
    expected = sorted(e.event_id for e in fhir.to_events(stay).events)
    records = consume(cfg, cfg.kafka.topic_events, len(expected) + 1, wait_ms=5_000)
    assert sorted(json.loads(r.value)["event_id"] for r in records) == expected


@pytest.mark.services
def test_a_feed_has_its_own_rate_limit_beside_the_readers(api):
    _, client, tokens = api
    stay = bundle(patient(), encounter(), observation())
    posted = [fhir_post(client, "/fhir", stay, tokens["ingest"]).status_code for _ in range(8)]
    assert posted == [200] * 8
    auth = {"Authorization": f"Bearer {tokens['reader']}"}
    read = [client.get("/risk/top", headers=auth).status_code for _ in range(5)]
    assert read == [200] * 4 + [429]


@pytest.mark.services
def test_post_fhir_refusals_are_operation_outcomes_and_dead_letters(api):
    cfg, client, tokens = api
    token = tokens["ingest"]
    bad = fhir_post(
        client, "/fhir", bundle(patient(), encounter(), observation(code="9999-9")), token
    )
    assert bad.status_code == 422
    outcome = bad.json()
    assert outcome["resourceType"] == "OperationOutcome"
    [issue] = outcome["issue"]
    assert issue["severity"] == "error" and issue["code"] == "code-invalid"
    assert issue["diagnostics"] == "entry 2: Observation.code: unknown_loinc"
    wrong = fhir_post(client, "/fhir", patient(), token)
    assert wrong.status_code == 400 and wrong.json()["issue"][0]["code"] == "structure"
    big = bundle(patient(), encounter(), observation(note=[{"text": "x" * 70_000}]))
    assert fhir_post(client, "/fhir", big, token).status_code == 413
    plain = client.post(
        "/fhir",
        content=b"{}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"},
    )
    assert plain.status_code == 415
    letters = consume(cfg, cfg.kafka.topic_dead_letter, 3, role="admin", wait_ms=5_000)
    got = [json.loads(r.value) for r in letters]
    assert [(x["reason"], x["source"]) for x in got] == [
        ("unknown_loinc", "fhir/api"),
        ("not_a_bundle", "fhir/api"),
        ("oversized_bundle", "fhir/api"),
    ]
    assert got[0]["position"].startswith("entry 2 from token ingest-")
    assert not any(value in json.dumps(got) for value in NAMES)
    assert consume(cfg, cfg.kafka.topic_events, 1, wait_ms=2_000) == []  # nothing taken


def notification(kind: str, *resources: dict) -> dict:
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "type", "valueCode": kind},
        ],
    }
    entries = [{"resource": status}] + [
        {
            "fullUrl": f"urn:uuid:{r['resourceType'].lower()}",
            "resource": r,
            "request": {"method": "PUT", "url": r["resourceType"]},
        }
        for r in resources
    ]
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


def test_an_entry_that_deletes_or_patches_is_refused_not_passed_over():
    for method in ("DELETE", "PATCH", None):
        stay = bundle(patient(), encounter(), observation())
        stay["entry"][2]["request"]["method"] = method
        with pytest.raises(fhir.Refused) as refused:
            fhir.to_events(stay)
        [issue] = refused.value.issues
        assert (issue.reason, issue.entry, issue.where) == (
            "unsupported_method",
            2,
            "request.method",
        )
    put = bundle(patient(), encounter(), observation())
    put["entry"][2]["request"]["method"] = "PUT"
    assert [e.type for e in fhir.to_events(put).events] == ["admission", "observation"]


def test_an_r4b_subscription_status_says_whether_a_notification_carries_events():
    def r4b(kind: str, *resources: dict) -> dict:
        note = notification(kind, *resources)
        note["type"] = "subscription-notification"
        note["entry"][0]["resource"] = {
            "resourceType": "SubscriptionStatus",
            "status": "active",
            "type": kind,
            "subscription": {"reference": "Subscription/s1"},
        }
        return note

    events = fhir.to_events(r4b("event-notification", patient(), encounter()), notification=True)
    assert [e.type for e in events.events] == ["admission"]
    for quiet in ("heartbeat", "handshake"):
        assert fhir.to_events(r4b(quiet), notification=True).events == []
        assert fhir.to_events(notification(quiet), notification=True).events == []
    for bad in (
        {**r4b("heartbeat"), "entry": [{"resource": patient()}]},  # no status first
        {**r4b("event-notification"), "type": "transaction"},  # not a notification Bundle
    ):
        with pytest.raises(fhir.Refused):
            fhir.to_events(bad, notification=True)


@pytest.mark.services
def test_subscription_notifications_are_taken_with_their_own_token(api):
    cfg, client, tokens = api
    token = tokens["subscription"]
    assert (
        fhir_post(client, "/fhir/subscription", notification("handshake"), token).status_code == 200
    )
    change = notification("event-notification", patient(), encounter())
    assert fhir_post(client, "/fhir/subscription", change, tokens["reader"]).status_code == 403
    answer = fhir_post(client, "/fhir/subscription", change, token)
    assert answer.status_code == 200, answer.text
    assert fhir_post(client, "/fhir/subscription", bundle(patient()), token).status_code == 422
    [record] = consume(cfg, cfg.kafka.topic_events, 1, wait_ms=5_000)
    assert json.loads(record.value)["type"] == "admission"


@pytest.mark.services
def test_corrections_and_cancels_posted_as_bundles_change_the_store_and_the_ranking(
    api, redis_client, scores_restored
):
    """A corrected Observation replaces the value it corrects, an Encounter in progress
    again reopens the admission on the ranking, one entered in error takes it off."""
    from features.fitted import FittedFeatures
    from features.online import OnlineStore
    from features.state import AdmissionState
    from features.vocab import Vocabulary
    from stream.scores import RANKING_KEY
    from tests.test_ingest_hl7_parity import apply_topic

    cfg, client, tokens = api
    hadm_id = 78_000_000 + uuid.uuid4().int % 100_000
    enc = {**ENC, "value": str(hadm_id)}
    period = {"start": "2024-03-01T08:00:00Z", "end": "2024-03-05T20:00:00Z"}
    stay = bundle(patient(), encounter("finished", identifier=[enc], period=period), observation())
    corrected = observation(value=200, status="corrected", issued="2024-03-06T06:00:00Z")
    start = {"start": period["start"]}
    again = encounter(
        "in-progress", identifier=[enc], period=start, meta={"lastUpdated": "2024-03-06T07:00:00Z"}
    )
    fixes = bundle(patient(), again, corrected)
    error = encounter(
        "entered-in-error",
        identifier=[enc],
        period=start,
        meta={"lastUpdated": "2024-03-06T09:00:00Z"},
    )
    withdrawn = bundle(patient(), error)

    fitted = FittedFeatures.unnormalised(Vocabulary.fit([]))
    store = OnlineStore(redis_client, fitted, scratch=f"fhir-fixes-{uuid.uuid4().hex[:6]}")
    try:
        want = AdmissionState()

        def post(body) -> None:
            answer = fhir_post(client, "/fhir", body, tokens["ingest"])
            assert answer.status_code == 200, answer.text
            events = fhir.to_events(body).events
            for event in events:
                want.apply(event, fitted.vocab)
            apply_topic(cfg, store, len(events))  # from the group's committed offsets on

        post(stay)
        first = store.read_blobs([hadm_id])[0]
        assert store.read_status([hadm_id])[0][0] == "discharged"
        assert redis_client.zscore(RANKING_KEY, hadm_id) is None
        post(fixes)
        got = store.read_blobs([hadm_id])[0]
        assert got != first  # the value changed
        np.testing.assert_array_equal(
            fitted.assemble([got])["numeric_raw"], fitted.assemble([want.to_blob()])["numeric_raw"]
        )
        assert store.read_status([hadm_id])[0][0] == "open"
        assert redis_client.zscore(RANKING_KEY, hadm_id) == 0.25  # back on it
        post(withdrawn)
        assert store.read_status([hadm_id])[0][0] == "cancelled"
        assert redis_client.zscore(RANKING_KEY, hadm_id) is None
    finally:
        store.drop()


# --------------------------------------------------------------------------- parity


@pytest.mark.services
def test_the_cohort_posted_as_bundles_gives_the_features_replay_gives(
    settings, cohort, deployed, redis_client, scores_restored, tmp_path
):
    from features.cxr import CxrPreprocessor
    from features.online import OnlineStore
    from m3t.kafka import own_topics
    from stream.scores import ScoreStore
    from stream.scoring import CachedEncoderScorer, OnlineFeatures
    from stream.wiring import connect
    from stream.xrays import CxrInputs

    fitted, _ = deployed
    admissions = list(cohort.values())
    total = sum(len(a) for a in admissions)

    def stream(cfg, scratch: str) -> OnlineStore:
        store = OnlineStore(redis_client, fitted, scratch=scratch)
        scorer = CachedEncoderScorer(
            cfg, redis_client, cxr=CxrInputs(CxrPreprocessor(device="cpu"))
        )
        worker = connect(
            cfg,
            OnlineFeatures(store),
            scorer,
            ScoreStore(redis_client),
            max_batch=8,
            max_wait_ms=20,
            group_id=f"{cfg.kafka.consumer_group}-{scratch}",
        )
        worker.run(stop_after=total, idle_timeout_s=60)
        assert worker.stats.events == total and worker.stats.dead_letters == 0
        return store

    replayed_cfg = own_topics(settings)
    replay_all(replayed_cfg, admissions)
    replayed = stream(replayed_cfg, f"replay-{uuid.uuid4().hex[:6]}")

    posted_cfg = own_topics(settings)
    posted_cfg = posted_cfg.model_copy(
        update={"api": posted_cfg.api.model_copy(update={"rate_limit_per_minute": 1_000_000})}
    )
    written = fhir_writer.write_bundles(admissions, tmp_path / "fhir")
    assert written.events == total
    token = TokenStore(posted_cfg).add(f"parity-{uuid.uuid4().hex[:8]}", "ingest")
    with serving(posted_cfg) as url, httpx.Client(base_url=url, timeout=30) as client:
        for line in written.path.read_text().splitlines():
            answer = fhir_post(client, "/fhir", line.encode(), token)
            assert answer.status_code == 200, answer.text
    posted = stream(posted_cfg, f"fhir-{uuid.uuid4().hex[:6]}")

    hadm_ids = sorted(cohort)
    want, got = replayed.read_blobs(hadm_ids), posted.read_blobs(hadm_ids)
    assert all(blob is not None for blob in want)
    assert got == want
    replayed.drop()
    posted.drop()


# --------------------------------------------------------------------------- benchmark


@pytest.mark.services
def test_the_fhir_benchmark_measures_bundles_per_second_through_the_api(settings):
    from benchmarks.bench_fhir import fhir_rows

    step, post = fhir_rows(settings, bundles=60, connections=2, repeats=1, core=0)
    assert step["case"] == "fhir step" and step["items_per_s"] > 0
    assert post["case"] == "fhir post" and post["items_per_s"] > 0
    assert post["events_per_s"] > post["items_per_s"] and post["p99_ms"] >= post["p50_ms"] > 0
    print({"step": step["items_per_s"], "post": post["items_per_s"], "p50": post["p50_ms"]})
