"""HL7 v2 into the event contract, and the MLLP listener against the real Kafka, driven by
python-hl7's own MLLP client (not the listener's code)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from hl7.client import MLLPClient

from ingest import itemids
from ingest.cli import msa_code, split_messages
from ingest.hl7 import Refused, to_events
from ingest.mllp import MllpListener
from m3t.services.process import free_ports, port_open, wait_until
from m3t.settings import IngestSettings, Settings
from tests.conftest import consume

MSH = "MSH|^~\\&|ADT1|HOSP|M3T|M3T|20240301120000||{type}|{control}|P|2.5"
PID = "PID|1||1001^^^HOSP^MR||Doe^Jane||19600215|F"
# PV1-2 class, PV1-4 admission type, PV1-19 visit, PV1-36 disposition, PV1-44/45 admit/discharge
PV1 = "PV1|1|I||E|" + "|" * 14 + "2001|" + "|" * 16 + "{disposition}|" + "|" * 7 + "{admit}|{disch}"
ADMIT_TIME, DISCH_TIME = "20240301080000", "20240305200000"


def message(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def admit(control: str = "C1", trigger: str = "A01") -> str:
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="")
    return message(MSH.format(type=f"ADT^{trigger}", control=control), PID, pv1)


def discharge(control: str = "C3", disposition: str = "01") -> str:
    pv1 = PV1.format(disposition=disposition, admit=ADMIT_TIME, disch=DISCH_TIME)
    return message(MSH.format(type="ADT^A03", control=control), PID, pv1)


def result(control: str = "C2", *obx: str) -> str:
    obx = obx or (
        "OBX|1|NM|14682-9^Creatinine^LN||106|umol/L|||||F|||20240301090000|||||20240301093000",
        "OBX|2|NM|8867-4^Heart rate^LN||88|/min|||||F|||20240301091500",
        "OBX|3|ST|8251-1^Comment^LN||looks fine||||||F",
    )
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="")
    obr = "OBR|1|||24323-8^Panel^LN|||20240301085000" + "|" * 15 + "20240301094500"
    return message(MSH.format(type="ORU^R01", control=control), PID, pv1, obr, *obx)


# --------------------------------------------------------------------------- mapping


def test_an_admit_becomes_an_admission_event():
    [event] = to_events(admit()).events
    assert (event.type, event.hadm_id, event.subject_id) == ("admission", 2001, 1001)
    p = event.payload
    assert p.admittime.isoformat() == "2024-03-01T08:00:00" and p.gender == "F" and p.age == 64
    assert p.admission_type == "EW EMER." and event.source == "hl7/ADT^A01"
    assert to_events(admit(trigger="A04")).events[0].type == "admission"


def test_a_discharge_carries_the_stay_and_death_from_the_disposition():
    [event] = to_events(discharge()).events
    assert event.type == "discharge" and event.payload.los_days == pytest.approx(4.5)
    assert event.payload.hospital_expire_flag is False
    assert to_events(discharge(disposition="20")).events[0].payload.hospital_expire_flag
    died = discharge().replace(PID, PID + "|" * 22 + "Y")
    assert to_events(died).events[0].payload.hospital_expire_flag


def test_numeric_results_become_observations_in_the_items_units():
    creatinine, heart_rate = to_events(result()).events  # the text result is passed over
    assert creatinine.payload.itemid == 50912 and creatinine.payload.unit == "mg/dL"
    assert creatinine.payload.value == pytest.approx(106 / 88.42)
    # available at OBX-19, charted at OBX-14
    assert creatinine.event_time.isoformat() == "2024-03-01T09:30:00+00:00"
    assert creatinine.payload.charttime.isoformat() == "2024-03-01T09:00:00"
    assert heart_rate.payload.itemid == 220045 and heart_rate.payload.kind == "vital"
    # no OBX-19: OBR-22 (reported) times it
    assert heart_rate.event_time.isoformat() == "2024-03-01T09:45:00+00:00"
    assert itemids.ITEMS[heart_rate.payload.itemid].unit == heart_rate.payload.unit


def test_a_resent_message_gives_identical_events_and_another_control_id_new_ones():
    first, again = to_events(result()), to_events(result())
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]
    other = to_events(result(control="C9"))
    assert not {e.event_id for e in first.events} & {e.event_id for e in other.events}


def adt(trigger: str, control: str, unit: str = "", evn: str = "") -> str:
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="").replace(
        "PV1|1|I||", f"PV1|1|I|{unit}|"
    )
    segments = [MSH.format(type=f"ADT^{trigger}", control=control)]
    if evn:
        segments.append(f"EVN|{trigger}|{evn}")
    return message(*segments, PID, pv1)


def test_transfers_updates_and_cancels_become_their_events():
    admission, moved = to_events(adt("A01", "C1", unit="MICU^12^1")).events
    assert (moved.type, moved.payload.careunit) == ("transfer", "MICU")
    assert moved.payload.intime == admission.payload.admittime
    [transfer] = to_events(adt("A02", "C4", unit="Medicine^3", evn="20240302101500")).events
    assert transfer.payload.careunit == "Medicine" and transfer.event_time.hour == 10
    [update] = to_events(adt("A08", "C5", evn="20240302120000")).events
    assert update.type == "admission" and update.event_time.isoformat().startswith("2024-03-02T12")
    for trigger, cancels in (("A11", "admission"), ("A12", "transfer"), ("A13", "discharge")):
        [cancel] = to_events(adt(trigger, f"X{trigger}", evn="20240303080000")).events
        assert (cancel.type, cancel.payload.cancels) == ("cancel", cancels)
    # without EVN the message time (MSH-7) dates it
    assert to_events(adt("A13", "C9")).events[0].event_time.isoformat().startswith("2024-03-01T12")
    with pytest.raises(Refused) as refused:
        to_events(adt("A02", "C6"))
    assert refused.value.reason == "missing_field" and refused.value.detail == "PV1-3"


def test_results_carry_their_id_and_status():
    obr = "OBR|1||F123|24323-8^Panel^LN|||20240301085000"
    obx = "OBX|1|NM|14682-9^Creatinine^LN|2|106|umol/L|||||{status}|||20240301090000"
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="")
    for status, want in (("C", "corrected"), ("P", "preliminary"), ("F", "final"), ("", "final")):
        raw = message(
            MSH.format(type="ORU^R01", control="R1"), PID, pv1, obr, obx.format(status=status)
        )
        [event] = to_events(raw).events
        assert event.payload.status == want and event.payload.result_id == "F123^14682-9^2"
    assert to_events(result()).events[0].payload.result_id is None  # no filler order number


def test_a_temperature_in_celsius_is_converted_to_the_items_fahrenheit():
    obx = "OBX|1|NM|8310-5^Body temperature^LN||37|Cel|||||F|||20240301090000"
    [event] = to_events(result("T1", obx)).events
    assert event.payload.unit == itemids.ITEMS[event.payload.itemid].unit
    assert event.payload.value == pytest.approx(98.6)


PREVIOUS_STAY = "|" * 5 + "1999"  # PV1-46 to PV1-50 (alternate visit id)


def document(kind: str, control: str = "D1", *text: str) -> str:
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="") + PREVIOUS_STAY
    txa = f"TXA|1|{kind}||20240302090000" + "|" * 8 + "N123"
    obx = [f"OBX|{n}|TX|||{line}" for n, line in enumerate(text or ("Lungs \\T\\ heart", "ok"), 1)]
    msh = MSH.format(type="MDM^T02", control=control)
    return message(msh, "EVN|T02|20240302100000", PID, pv1, txa, *obx)


def test_documents_become_notes_and_a_discharge_summary_names_its_own_stay():
    [radiology] = to_events(document("RAD")).events
    p = radiology.payload
    assert (radiology.type, p.note_type, p.note_id, p.text) == (
        "note",
        "radiology",
        "N123",
        "Lungs & heart\nok",
    )
    assert p.charttime.isoformat() == "2024-03-02T09:00:00" and p.from_hadm_id == 2001
    assert radiology.event_time.isoformat().startswith("2024-03-02T10:00")  # EVN-2
    [summary] = to_events(document("DS", "D2")).events
    assert summary.payload.note_type == "discharge" and summary.payload.from_hadm_id == 1999
    assert summary.hadm_id == 2001  # sent into the admission that reads it
    for raw, reason in (
        (document("XYZ", "D3"), "unsupported_document"),
        (document("RAD", "D4").replace("\rOBX|1|TX|||Lungs \\T\\ heart\rOBX|2|TX|||ok", ""),
         "missing_field"),
    ):  # fmt: skip
        with pytest.raises(Refused) as refused:
            to_events(raw)
        assert refused.value.reason == reason


def report(service: str, *obx: str) -> str:
    pv1 = PV1.format(disposition="", admit=ADMIT_TIME, disch="") + PREVIOUS_STAY
    obr = f"OBR|1||777|{service}|||20240301085000" + "|" * 15 + "20240301094500"
    return message(MSH.format(type="ORU^R01", control="P1"), PID, pv1, obr, *obx)


def test_a_report_sent_as_a_result_becomes_a_note_by_its_service_code_or_words():
    text = "OBX|1|TX|18748-4||No acute findings"
    [note] = to_events(report("18748-4^Radiology report^LN", text)).events
    assert (note.payload.note_type, note.payload.note_id, note.payload.text) == (
        "radiology",
        "777",
        "No acute findings",
    )
    assert note.event_time.isoformat().startswith("2024-03-01T09:45")  # OBR-22
    [summary] = to_events(report("X1^Hospital discharge summary^L", text)).events
    assert summary.payload.note_type == "discharge" and summary.payload.from_hadm_id == 1999
    assert to_events(report("24323-8^Panel^LN", text)).events == []  # a text result, no report


def test_an_image_reference_must_lie_under_the_image_roots(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.dcm").write_bytes(b"")

    def study(uri: str) -> str:
        return report("36643-5^XR Chest^LN", f"OBX|1|RP||9001|{uri}^DICOM")

    [cxr] = to_events(study(f"file://{root}/a.dcm"), image_roots=(root,)).events
    assert (cxr.type, cxr.payload.study_id, cxr.payload.dicom_id) == ("cxr", 777, "9001")
    assert cxr.payload.uri == f"file://{root}/a.dcm"
    assert cxr.event_time.isoformat().startswith("2024-03-01T08:50")  # OBR-7, the study time
    for outside in ("/etc/passwd", f"{root}/../secret.dcm", "http://elsewhere/a.dcm"):
        with pytest.raises(Refused) as refused:
            to_events(study(outside), image_roots=(root,))
        assert refused.value.reason == "image_refused" and outside not in str(refused.value)


def test_time_zones_are_converted_to_utc():
    zoned = admit().replace(ADMIT_TIME, "202403010800-0500")
    assert to_events(zoned).events[0].payload.admittime.isoformat() == "2024-03-01T13:00:00"


@pytest.mark.parametrize(
    ("raw", "reason", "code"),
    [
        (b"MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X|P|2.5\r\xff\xfe", "invalid_utf8", "AR"),
        (admit().replace("MSH|^~\\&|", "MSH|^~\\#|"), "wrong_encoding_characters", "AR"),
        (admit().replace("\rPID|", "\rP!D|"), "malformed_segment", "AR"),
        ("PID|1||1001\r", "malformed_message", "AR"),
        (admit(trigger="A99"), "unsupported_message", "AR"),
        (admit().replace("|C1|", "||"), "missing_field", "AE"),
        (admit().replace("2001|", "|"), "missing_field", "AE"),
        (admit().replace("|19600215|", "|1960-02-15|"), "invalid_field", "AE"),
        (admit().replace("|F\r", "|U\r"), "invalid_field", "AE"),
        (
            result("C2", "OBX|1|NM|9999-9^X^LN||1|mg/dL|||||F|||20240301090000"),
            "unknown_loinc",
            "AE",
        ),
        (result("C2", "OBX|1|NM|2160-0^Cr^LN||1|g/L|||||F|||20240301090000"), "unknown_unit", "AE"),
        (result("C2", "OBX|1|NM|2160-0^Cr^LN||1|mg/dL|||||X"), "unsupported_result_status", "AE"),
        (result("C2", "OBX|1|NM|2160-0^Cr^LN||high|mg/dL|||||F"), "invalid_field", "AE"),
        (result("C2", "OBX|1|NM|2160-0^Cr^LN||NaN|mg/dL|||||F"), "invalid_field", "AE"),
        (result("C2", "OBX|1|NM|8310-5^T^LN||inf|Cel|||||F"), "invalid_field", "AE"),
        # a value outside the item's plausible range breaks the contract
        (
            result("C2", "OBX|1|NM|2160-0^Cr^LN||400|mg/dL|||||F|||20240301090000"),
            "invalid_event",
            "AE",
        ),
    ],
)
def test_what_cannot_be_taken_is_refused_with_a_reason_and_no_values(raw, reason, code):
    with pytest.raises(Refused) as refused:
        to_events(raw)
    assert refused.value.reason == reason and refused.value.ack_code == code
    for value in ("1001", "2001", "Jane", "19600215", "400", "high"):
        assert value not in refused.value.detail


HOSTILE = [
    (admit().replace("ADT^A01", "ADT"), "unsupported_message", "AR"),  # MSH-9 without a trigger
    (admit().replace("ADT^A01", "ADT^A01\\F\\x"), "unsupported_message", "AR"),
    (admit().replace("|1001^^^HOSP^MR|", "|\u00b2|"), "invalid_field", "AE"),  # a superscript two
    (admit().replace("|1001^^^HOSP^MR|", "|\u0661\u0662|"), "invalid_field", "AE"),  # Arabic-Indic
    (admit().replace(ADMIT_TIME, "202403010800+9999"), "invalid_field", "AE"),
    (admit().replace("|F\r", "|\\X4\\\r"), "invalid_field", "AE"),  # odd hex
    (admit().replace("|F\r", "|\\XFF\\\r"), "invalid_field", "AE"),  # hex, not UTF-8
    (admit() + discharge(), "unsupported_message", "AR"),  # two messages in one frame
    (admit().replace("\rPV1|", "\r" + PID + "\rPV1|"), "unsupported_message", "AR"),
    (report("36643-5^XR Chest^LN", "OBX|1|RP||9001|file://[/x^DICOM"), "image_refused", "AE"),
    (report("36643-5^XR Chest^LN", "OBX|1|RP||9001|/tmp/%00x^DICOM"), "image_refused", "AE"),
]


@pytest.mark.parametrize(("raw", "reason", "code"), HOSTILE)
def test_hostile_messages_are_refused_with_a_reason_never_an_exception(raw, reason, code):
    with pytest.raises(Refused) as refused:
        to_events(raw, image_roots=("/nowhere",))
    assert refused.value.reason == reason and refused.value.ack_code == code
    assert "1001" not in str(refused.value) and "Jane" not in str(refused.value)


def test_a_message_the_rules_did_not_foresee_is_refused_not_raised(monkeypatch):
    from ingest import hl7 as hl7_map

    def broken(*args, **kwargs):
        raise KeyError("1001")  # a library's lookup, carrying a value

    monkeypatch.setattr(hl7_map, "_admission", broken)
    with pytest.raises(Refused) as refused:
        to_events(admit())
    assert (refused.value.reason, refused.value.detail) == ("malformed_message", "KeyError")


def test_escapes_are_read_without_logging_and_formatting_is_capped(caplog):
    caplog.set_level("DEBUG")
    text = (
        "a\\.sp400000000\\b",  # python-hl7 would build 400 MB of line breaks
        "C:\\path\\Jane Doe",  # a raw backslash: an unknown sequence stays as sent
        "x\\Zsecret-JaneDoe\\y\\H\\bold\\N\\ \\X48656C6C6F\\ \\.br\\z",
    )
    [note] = to_events(document("RAD", "D9", *text)).events
    lines = note.payload.text.split("\n")
    assert lines[0] == "a" and lines[10] == "b" and len(lines) == 14  # ten line breaks at most
    assert lines[11] == "C:\\path\\Jane Doe"
    assert lines[12:] == ["xybold Hello ", "z"]
    assert "Jane" not in caplog.text and "secret" not in caplog.text


def test_results_under_each_obr_take_that_obrs_order_and_text():
    panel = "OBR|1||F1|24323-8^Panel^LN|||20240301085000"
    later = "OBR|2||F2|24323-8^Panel^LN|||20240301185000"
    rad = "OBR|3||R1|18748-4^Radiology report^LN|||20240301190000" + "|" * 15 + "20240301200000"
    heart = "OBX|{}|NM|8867-4^Heart rate^LN||{}|/min|||||F"
    raw = result(
        "M1",
        heart.format(1, 88),
        "OBX|2|TX|||lab comment",
        later,
        heart.format(3, 95),
        rad,
        "OBX|4|TX|||No acute findings",
    ).replace("OBR|1|||24323-8^Panel^LN|||20240301085000" + "|" * 15 + "20240301094500", panel)
    first, second, note = to_events(raw).events
    assert (first.payload.charttime.hour, second.payload.charttime.hour) == (8, 18)
    assert first.payload.result_id.startswith("F1^") and second.payload.result_id.startswith("F2^")
    assert (note.payload.note_id, note.payload.text) == ("R1", "No acute findings")


def test_the_ack_copies_the_control_id_as_sent():
    from ingest.mllp import acknowledgement

    for control in ("C1\\F\\AA\\.br\\ERR", "C\\T\\1"):
        mapped = to_events(admit(control=control))
        ack = acknowledgement(mapped.header, "AA").decode()
        segments = ack.strip("\r").split("\r")
        assert [s[:3] for s in segments] == ["MSH", "MSA"]
        assert segments[1].split("|")[2] == control


def test_send_hl7_splits_a_file_on_msh_whatever_the_line_endings():
    text = admit().replace("\r", "\n") + "\n" + result().replace("\r", "\r\n")
    assert split_messages(text) == [admit(), result()]


# --------------------------------------------------------------------------- listener


@pytest.fixture
def listener(isolated_settings):
    """A listener on a free port in its own event loop thread, with short limits."""
    limits = IngestSettings(
        mllp_max_frame_bytes=8192, mllp_idle_timeout_s=1.5, mllp_kafka_timeout_s=10
    )
    settings = isolated_settings.model_copy(update={"ingest": limits})
    running = _Running(MllpListener(settings))
    yield running
    running.stop()


class _Running:
    def __init__(self, listener: MllpListener):
        self.listener = listener
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = asyncio.run_coroutine_threadsafe(listener.start("127.0.0.1", 0), self.loop)
        self.host, self.port = start.result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.services
def test_a_stay_is_acked_only_with_its_events_on_the_topic_and_a_resend_changes_no_id(
    listener, isolated_settings
):
    sequence = [admit(), result(), discharge()]
    expected = [e.event_id for m in sequence for e in to_events(m).events]
    with MLLPClient(listener.host, listener.port) as client:
        assert [msa_code(client.send_message(m)) for m in sequence] == ["AA", "AA", "AA"]
        assert msa_code(client.send_message(admit())) == "AA"  # resent
    records = consume(isolated_settings, isolated_settings.kafka.topic_events, 5)
    got = [json.loads(r.value) for r in records]
    assert sorted(e["event_id"] for e in got) == sorted(expected + expected[:1])
    assert {r.key for r in records} == {b"2001"}
    assert sorted(e["type"] for e in got) == [
        "admission",
        "admission",
        "discharge",
        "observation",
        "observation",
    ]
    assert listener.listener.counts["accepted"] == 4


@pytest.mark.services
def test_a_refused_message_gets_its_code_reason_and_a_dead_letter(listener, isolated_settings):
    bad = result("C7", "OBX|1|NM|9999-9^X^LN||1|mg/dL|||||F|||20240301090000")
    with MLLPClient(listener.host, listener.port) as client:
        ack = client.send_message(bad)
        assert msa_code(ack) == "AE" and b"MSA|AE|C7|unknown_loinc" in ack and b"\rERR|" in ack
        assert msa_code(client.send_message(admit(trigger="A99"))) == "AR"
        assert msa_code(client.send_message(admit())) == "AA"  # the connection still serves
    topic = isolated_settings.kafka.topic_dead_letter
    letters = [json.loads(r.value) for r in consume(isolated_settings, topic, 2, role="admin")]
    assert [(x["reason"], x["source"]) for x in letters] == [
        ("unknown_loinc", "hl7/mllp"),
        ("unsupported_message", "hl7/mllp"),
    ]
    assert letters[0]["position"].startswith("control id C7 from 127.0.0.1:")
    assert "1001" not in json.dumps(letters)


def _raw_connection(listener) -> socket.socket:
    return socket.create_connection((listener.host, listener.port), timeout=10)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@pytest.mark.services
def test_oversized_and_unfinished_frames_are_closed_while_another_connection_is_served(
    listener, isolated_settings
):
    oversized, unfinished = _raw_connection(listener), _raw_connection(listener)
    unfinished.sendall(b"\x0b" + admit().encode())  # no end block, ever
    oversized.sendall(b"\x0b" + b"X" * 20_000 + b"\x1c\r")
    assert _closed(oversized)
    with MLLPClient(listener.host, listener.port) as client:  # served meanwhile
        assert msa_code(client.send_message(admit())) == "AA"
    truncated = _raw_connection(listener)
    truncated.sendall(b"\x0b" + admit().encode())
    truncated.shutdown(socket.SHUT_WR)  # the sender gives up mid-frame
    assert _closed(truncated) and _closed(unfinished)
    topic = isolated_settings.kafka.topic_dead_letter
    letters = [json.loads(r.value) for r in consume(isolated_settings, topic, 3, role="admin")]
    assert sorted(x["reason"] for x in letters) == [
        "oversized_frame",
        "truncated_frame",
        "unfinished_frame",
    ]
    for sock in (oversized, unfinished, truncated):
        sock.close()


@pytest.mark.services
def test_a_silent_connection_times_out_with_a_dead_letter(listener, isolated_settings):
    silent = _raw_connection(listener)
    started = time.monotonic()
    assert _closed(silent)
    assert 1.0 < time.monotonic() - started < 8
    # One that sent a frame and then went quiet is closed as routine, with no dead letter.
    with MLLPClient(listener.host, listener.port) as client:
        assert msa_code(client.send_message(admit())) == "AA"
        time.sleep(2.5)
    assert listener.listener.counts["idle_timeout"] == 2
    topic = isolated_settings.kafka.topic_dead_letter
    (letter,) = [json.loads(r.value) for r in consume(isolated_settings, topic, 1, role="admin")]
    assert letter["reason"] == "silent_connection" and letter["source"] == "hl7/mllp"
    assert letter["position"].startswith("frame 1 from 127.0.0.1:")
    silent.close()


def test_a_peer_that_leaves_its_acks_unread_is_closed_after_the_idle_timeout():
    """The kernel buffers megabytes of ACKs before a real peer's neglect shows, so the
    listener's side of the connection is driven directly: its ACK never drains."""

    class Delivered:  # Kafka took every record
        async def deliver(self, records) -> None:
            pass

    class Unread:
        closed = False

        def get_extra_info(self, name):
            return ("127.0.0.1", 9)

        def write(self, data: bytes) -> None:
            self.acks = getattr(self, "acks", 0) + 1

        async def drain(self) -> None:
            await asyncio.sleep(3600)

        def close(self) -> None:
            self.closed = True

        async def wait_closed(self) -> None:
            pass

    settings = Settings().model_copy(update={"ingest": IngestSettings(mllp_idle_timeout_s=0.2)})
    listener = MllpListener(settings, producer=Delivered())

    async def serve() -> Unread:
        reader, writer = asyncio.StreamReader(), Unread()
        reader.feed_data(b"\x0b" + admit().encode() + b"\x1c\r")
        await asyncio.wait_for(listener._serve(reader, writer), 5)
        return writer

    writer = asyncio.run(serve())
    assert writer.acks == 1 and writer.closed
    assert listener.counts["ack_unread"] == 1 and listener.counts["accepted"] == 1


@pytest.mark.services
def test_bad_messages_among_good_ones_cost_only_themselves(listener, isolated_settings):
    """Each bad message gets its AR/AE and a dead letter, bytes outside a frame close their
    connection with one; the good messages around them land on the topic, each once."""
    unit = "OBX|1|NM|2160-0^Cr^LN||1|g/L|||||F|||20240301090000"
    stream = [
        (admit("G1"), "AA"),
        (admit("B1").replace("MSH|^~\\&|", "MSH|^~\\#|"), "AR"),
        (result("G2"), "AA"),
        (admit("B2").replace("\rPID|", "\rP!D|"), "AR"),
        (result("B3", unit), "AE"),
        (admit("B4").replace("ADT^A01", "ADT"), "AR"),  # no trigger event
        (result("G4").replace("24323-8^Panel^LN", "24323-8"), "AA"),  # OBR-4 without a name
        (discharge("G3"), "AA"),
    ]
    with MLLPClient(listener.host, listener.port) as client:
        assert [msa_code(client.send_message(m)) for m, _ in stream] == [c for _, c in stream]
    stray = _raw_connection(listener)
    stray.sendall(b"MSH|no start block\x1c\r")
    assert _closed(stray)
    stray.close()
    good = [m for m, code in stream if code == "AA"]
    expected = sorted(e.event_id for m in good for e in to_events(m).events)
    events = consume(
        isolated_settings, isolated_settings.kafka.topic_events, len(expected) + 1, wait_ms=5000
    )
    assert sorted(json.loads(r.value)["event_id"] for r in events) == expected
    topic = isolated_settings.kafka.topic_dead_letter
    letters = consume(isolated_settings, topic, 6, role="admin", wait_ms=5000)
    letters = [json.loads(r.value) for r in letters]
    assert sorted(x["reason"] for x in letters) == [
        "malformed_segment",
        "missing_start_block",
        "unknown_unit",
        "unsupported_message",
        "wrong_encoding_characters",
    ]
    assert "1001" not in json.dumps(letters) and "Jane" not in json.dumps(letters)


@pytest.mark.services
def test_the_listener_and_sender_commands_print_each_ack(isolated_settings, tmp_path):
    """``m3t ingest mllp`` in a process of its own, ``m3t ingest send-hl7`` to it."""
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from app.cli import app as cli
    from m3t.settings import get_settings
    from tests.conftest import settings_env

    (port,) = free_ports(1)
    env = settings_env(isolated_settings)
    listening = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import app; app()", "ingest", "mllp",
         "--host", "127.0.0.1", "--port", str(port)],
        env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or listening.poll() is not None, 60)
        assert listening.poll() is None, listening.stderr.read().decode()
        feed = tmp_path / "feed.hl7"
        feed.write_text("\n".join([admit("S1"), admit("S2", trigger="A99"), result("S3")]))
        get_settings.cache_clear()
        try:
            sent = CliRunner().invoke(
                cli, ["ingest", "send-hl7", str(feed), "--host", "127.0.0.1", "--port", str(port)],
                env=env,
            )  # fmt: skip
        finally:
            get_settings.cache_clear()
    finally:
        listening.terminate()
        listening.wait(30)
    assert sent.exit_code == 1, sent.output  # one message was refused
    assert sent.stdout.splitlines() == ["1\tAA\tS1", "2\tAR\tS2\tunsupported_message", "3\tAA\tS3"]
    expected = sorted(e.event_id for m in (admit("S1"), result("S3")) for e in to_events(m).events)
    events = consume(isolated_settings, isolated_settings.kafka.topic_events, len(expected))
    assert sorted(json.loads(r.value)["event_id"] for r in events) == expected


@pytest.mark.single_node
@pytest.mark.services
def test_without_kafka_no_ack_is_sent(isolated_settings):
    (nowhere,) = free_ports(1)
    down = isolated_settings.model_copy(
        update={
            "kafka": isolated_settings.kafka.model_copy(update={"port": nowhere}),
            "ingest": IngestSettings(mllp_kafka_timeout_s=2, mllp_idle_timeout_s=10),
        }
    )
    running = _Running(MllpListener(down))
    try:
        with MLLPClient(running.host, running.port) as client:
            client.socket.settimeout(15)
            assert msa_code(client.send_message(admit())) == "none"  # closed, no ACK
        assert running.listener.counts["kafka_unavailable"] == 1
    finally:
        running.stop()
