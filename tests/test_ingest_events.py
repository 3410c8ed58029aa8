"""The event contract at the door: every hostile input is an ``InvalidEvent`` with a stable
reason and a detail without the value; valid events decode as before. Pure, no services."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import event as label
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest import events as ev
from ingest import itemids
from ingest.mimic import MimicReader
from ingest.synth import generate
from m3t.settings import StreamSettings

T0 = datetime(2150, 3, 1, 12, 30)
HADM, SUBJECT = 20_000_001, 10_000_032
PROPERTY = settings(max_examples=400, deadline=None, database=None)


def envelope(kind: str, n: int = 0) -> dict:
    return dict(
        event_id=ev.event_id(f"test/{kind}", n),
        hadm_id=HADM,
        subject_id=SUBJECT,
        event_time=T0 + timedelta(hours=n),
        source=f"test/{kind}",
    )


def valid_events() -> dict[str, ev.BaseModel]:
    """One event of each type (two kinds of observation and of note), every field set."""
    return {
        "admission": ev.AdmissionEvent(
            **envelope("admission"),
            payload=ev.AdmissionPayload(
                admittime=T0,
                admission_type="URGENT",
                admission_location="EMERGENCY ROOM",
                insurance="Medicare",
                gender="F",
                age=71,
            ),
        ),
        "lab": ev.ObservationEvent(
            **envelope("lab", 1),
            payload=ev.ObservationPayload(
                itemid=50912, value=1.3, unit="mg/dL", charttime=T0, kind="lab"
            ),
        ),
        "vital": ev.ObservationEvent(
            **envelope("vital", 2),
            payload=ev.ObservationPayload(
                itemid=220045, value=88, unit="bpm", charttime=T0 + timedelta(hours=2), kind="vital"
            ),
        ),
        "radiology": ev.NoteEvent(
            **envelope("radiology", 3),
            payload=ev.NotePayload(
                note_type="radiology",
                text="No acute process.\nÉpanchement minime ✓ 😀",
                charttime=T0 + timedelta(hours=3),
                note_id="10000032-RR-14",
                from_hadm_id=HADM,
            ),
        ),
        "prior_summary": ev.NoteEvent(
            **envelope("discharge_note"),
            payload=ev.NotePayload(
                note_type="discharge",
                text="Brief hospital course: ...",
                charttime=T0 - timedelta(days=30),
                note_id="10000032-DS-21",
                from_hadm_id=HADM - 1,
            ),
        ),
        "cxr": ev.CxrEvent(
            **envelope("cxr", 4),
            payload=ev.CxrPayload(
                study_id=50414267,
                dicom_id="02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
                view_position="PA",
                uri="file:///data/cxr/files/p10/p10000032/s50414267/02aa804e.jpg",
                studytime=T0 + timedelta(hours=4),
            ),
        ),
        "discharge": ev.DischargeEvent(
            **envelope("discharge", 120),
            payload=ev.DischargePayload(
                dischtime=T0 + timedelta(days=5), los_days=5.0, hospital_expire_flag=False
            ),
        ),
        "transfer": ev.TransferEvent(
            **envelope("transfer", 5),
            payload=ev.TransferPayload(careunit="Medical ICU", intime=T0 + timedelta(hours=5)),
        ),
        "cancel": ev.CancelEvent(
            **envelope("cancel", 121), payload=ev.CancelPayload(cancels="discharge")
        ),
    }


VALID = valid_events()


def obj(name: str) -> dict:
    """The valid event ``name`` as a JSON object, to be broken."""
    return json.loads(ev.encode(VALID[name]))


def dumps(data) -> bytes:
    # json.dumps writes NaN/Infinity literals and lone surrogates as \\udXXX escapes.
    return json.dumps(data).encode()


def with_field(name: str, path: tuple[str, ...], value) -> dict:
    data = obj(name)
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


def refused(raw, **kwargs) -> ev.InvalidEvent:
    """The InvalidEvent ``decode`` raises; ``validate_json`` (the producing side) agrees."""
    with pytest.raises(ev.InvalidEvent) as decoded:
        ev.decode(raw, **kwargs)
    if not isinstance(raw, dict):
        with pytest.raises(ev.InvalidEvent) as validated:
            ev.validate_json(raw, **kwargs)
        assert (validated.value.reason, validated.value.detail) == (
            decoded.value.reason,
            decoded.value.detail,
        )
    assert decoded.value.reason in ev.REASONS
    return decoded.value


# --------------------------------------------------------------------------- valid events


@pytest.mark.parametrize("name", list(VALID))
def test_a_valid_event_of_every_type_decodes_to_itself(name):
    event = VALID[name]
    raw = ev.encode(event)
    assert ev.decode(raw) == event
    assert ev.decode(raw.decode()) == event
    assert ev.decode(bytearray(raw)) == event
    assert ev.validate_json(raw) == event
    assert ev.validate(event) == event
    assert ev.decode(json.loads(raw)) == event


def test_naive_times_are_read_as_utc_on_the_envelope_and_kept_in_the_payload():
    data = obj("lab")
    data["event_time"], data["payload"]["charttime"] = "2150-03-01T12:30:00", "2150-03-01T12:30:00"
    event = ev.decode(dumps(data))
    assert event.event_time == datetime(2150, 3, 1, 12, 30, tzinfo=UTC)
    assert event.payload.charttime == datetime(2150, 3, 1, 12, 30)


def test_a_missing_schema_version_is_the_current_one():
    data = obj("lab")
    del data["schema_version"]
    assert ev.decode(dumps(data)) == VALID["lab"]


@pytest.fixture(scope="module")
def reader_events(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, 20, seed=11, image_size=32, dicom=False)
    return list(MimicReader(out).events())


def test_events_the_reader_builds_decode_to_themselves(reader_events):
    assert {e.type for e in reader_events} == {
        "admission",
        "observation",
        "note",
        "cxr",
        "discharge",
        "transfer",
    }
    for event in reader_events:
        raw = ev.encode(event)
        assert ev.decode(raw) == event
        assert ev.validate_json(raw) == event
        assert ev.decode(raw).model_dump(mode="json") == event.model_dump(mode="json")
        assert ev.content_digest(ev.decode(raw)) == ev.content_digest(event)


# --------------------------------------------------------------------------- content digest


def respelled(event) -> bytes:
    """``event`` as another client writes it: its keys in reverse order, spaces, non-ASCII
    escaped, whole numbers without a fraction, UTC as "+00:00", no schema version, and
    produced later."""

    def rewrite(value):
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in reversed(value.items())}
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.endswith("Z") and value[:4].isdigit():
            return value[:-1] + "+00:00"
        return value

    data = rewrite(json.loads(ev.encode(event)))
    del data["schema_version"]
    data["ingest_time"] = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    return json.dumps(data, indent=2, ensure_ascii=True).encode()


@pytest.mark.parametrize("name", list(VALID))
def test_a_resent_event_has_the_same_digest_however_a_client_spells_it(name):
    event = VALID[name]
    raw = respelled(event)
    assert raw != ev.encode(event) and b"+00:00" in raw and b"  " in raw
    again = ev.decode(raw)
    assert again.ingest_time != event.ingest_time
    assert len(ev.content_digest(event)) == 16
    assert ev.content_digest(again) == ev.content_digest(event)


def test_the_digest_covers_every_field_but_the_transport():
    lab = VALID["lab"]
    changed = {
        ("hadm_id",): HADM + 1,
        ("subject_id",): SUBJECT + 1,
        ("event_time",): "2150-03-01T14:30:00Z",
        ("source",): "test/elsewhere",
        ("payload", "itemid"): 1,  # an item the features ignore
        ("payload", "value"): 1.4,
        ("payload", "unit"): "mmol/L",
        ("payload", "charttime"): "2150-03-01T12:31:00",
        ("payload", "kind"): "vital",
        ("payload", "result_id"): "order-7/2345-7",
        ("payload", "status"): "corrected",
    }
    assert set(changed) == set(leaf_paths(obj("lab"))) - {
        (name,) for name in ev.TRANSPORT_FIELDS
    } - {("type",)}  # the type goes with the payload's fields
    digests = {ev.content_digest(ev.decode(with_field("lab", p, v))) for p, v in changed.items()}
    assert len(digests) == len(changed) and ev.content_digest(lab) not in digests
    transport = {"event_id": "another id", "ingest_time": "2199-01-01T00:00:00Z"}
    for name, value in transport.items():
        again = ev.decode(with_field("lab", (name,), value))
        assert again != lab and ev.content_digest(again) == ev.content_digest(lab), name


def test_the_published_schema_carries_the_limits():
    schema = ev.json_schema()["$defs"]
    assert schema["ObservationEvent"]["properties"]["hadm_id"]["maximum"] == 2**63 - 1
    assert schema["ObservationEvent"]["properties"]["event_id"]["maxLength"] == 128
    assert schema["NotePayload"]["properties"]["text"]["maxLength"] == ev.MAX_NOTE_CHARS


# --------------------------------------------------------------------------- size and depth


def test_tombstones_are_refused():
    for raw in (None, b"", "", bytearray()):
        assert refused(raw).reason == "tombstone"


def test_an_event_over_the_size_limit_is_refused_before_it_is_parsed():
    assert ev.MAX_EVENT_BYTES == 512 * 1024 == StreamSettings().max_event_bytes
    raw = ev.encode(VALID["lab"])
    assert ev.decode(raw, max_bytes=len(raw)) == VALID["lab"]
    assert refused(raw, max_bytes=len(raw) - 1).reason == "oversized_event"
    assert refused(raw.decode(), max_bytes=len(raw) - 1).reason == "oversized_event"
    # Not even JSON: nothing is parsed.
    assert refused(b"\xff" * (ev.MAX_EVENT_BYTES + 1)).reason == "oversized_event"


def test_a_900_kb_event_id_is_oversized_and_over_its_length_limit_anyway():
    raw = dumps(with_field("lab", ("event_id",), "x" * 900_000))
    assert refused(raw).reason == "oversized_event"
    error = refused(raw, max_bytes=2**21)
    assert (error.reason, error.detail) == (
        "schema_violation",
        "observation.event_id: string_too_long",
    )


def test_an_array_nested_2000_deep_is_too_deep():
    error = refused(b"[" * 2000 + b"]" * 2000)
    assert error.reason == "too_deep" and str(ev.MAX_JSON_DEPTH) in error.detail
    assert refused(b'{"a":' * 2000 + b"1" + b"}" * 2000).reason == "too_deep"
    assert refused(b"[" * 100_000).reason == "too_deep"  # never closed


def test_deep_nesting_inside_a_valid_envelope_is_too_deep():
    raw = dumps(with_field("lab", ("payload", "unit"), "DEEP"))
    raw = raw.replace(b'"DEEP"', b"[" * 3000 + b"]" * 3000)
    assert refused(raw).reason == "too_deep"
    shallow = dumps(with_field("lab", ("payload", "unit"), [[[1]]]))
    assert refused(shallow).reason == "schema_violation"


def test_pydantics_own_parser_survives_any_depth():
    # The fast path parses before any depth scan: it must fail cleanly, not recurse.
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(ValidationError) as info:
            ev._EVENT.validate_json(raw)
        assert info.value.errors()[0]["type"] == "json_invalid"


def test_json_depth_skips_string_contents():
    assert ev.json_depth(b"1") == 0
    assert ev.json_depth(b'{"a": [1, {"b": "[[[{{"}]}') == 3
    assert ev.json_depth(b'["\\"[[[", [2]]') == 2  # an escaped quote does not end a string
    assert ev.json_depth(b'["\\\\", [[2]]]') == 3  # an escaped backslash does not escape
    assert ev.json_depth(b'["abc[[[[') == 1  # an unterminated string runs to the end
    assert ev.json_depth(b'["abc\\') == 1


@pytest.mark.timeout(60)
def test_json_depth_is_linear_on_pathological_strings():
    half = ev.MAX_EVENT_BYTES // 2
    assert ev.json_depth(b'"' + b'\\"' * half) == 0
    assert ev.json_depth(b'"' * (2 * half)) == 0
    assert ev.json_depth(b"[]" * half) == 1
    assert ev.json_depth(b'["' + b"\\" * (2 * half)) == 1


# --------------------------------------------------------------------------- text


def test_a_lone_surrogate_is_invalid_utf8_wherever_it_is():
    for name, path in [
        ("lab", ("event_id",)),
        ("lab", ("source",)),
        ("radiology", ("payload", "text")),
        ("cxr", ("payload", "uri")),
    ]:
        raw = dumps(with_field(name, path, "abc\ud800"))
        assert b"\\ud800" in raw
        assert refused(raw).reason == "invalid_utf8", path
    raw = ev.encode(VALID["lab"]).replace(b'{"schema_version"', b'{"\\udc00":1,"schema_version"')
    assert refused(raw).reason == "invalid_utf8"
    # Reversed pair: two lone surrogates.
    assert refused(dumps(with_field("lab", ("event_id",), "\ude00\ud83d"))).reason == "invalid_utf8"
    # A text (not bytes) with a lone surrogate in it, and a Python-built event or dict.
    assert refused(ev.encode(VALID["lab"]).decode().replace("test/lab", "\ud800")).reason == (
        "invalid_utf8"
    )
    assert refused(with_field("lab", ("event_id",), "\ud800")).reason == "invalid_utf8"
    with pytest.raises(ValidationError) as info:
        ev.ObservationEvent(**{**VALID["lab"].model_dump(), "event_id": "\ud800"})
    assert info.value.errors()[0]["type"] == "string_unicode"


def test_a_surrogate_pair_is_a_character():
    event = ev.decode(dumps(with_field("radiology", ("payload", "text"), "ok \U0001f600")))
    assert event.payload.text == "ok \U0001f600"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "\xff"}',  # not UTF-8 at all
        b'{"event_id": "\xc0\xaf"}',  # an overlong encoding
        b'{"event_id": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        ev.encode(VALID["lab"]).replace(b"test/lab", b"test/\xe9"),  # Latin-1
        ev.encode(VALID["lab"]).decode().encode("utf-16"),
    ],
)
def test_bytes_that_are_not_utf8_are_refused(raw):
    assert refused(raw).reason == "invalid_utf8"


LENGTHS = [
    ("lab", ("event_id",), 128),
    ("lab", ("source",), 256),
    ("admission", ("payload", "admission_type"), 128),
    ("admission", ("payload", "admission_location"), 128),
    ("admission", ("payload", "insurance"), 128),
    ("lab", ("payload", "unit"), 64),
    ("radiology", ("payload", "note_id"), 128),
    ("radiology", ("payload", "text"), ev.MAX_NOTE_CHARS),
    ("cxr", ("payload", "dicom_id"), 128),
    ("cxr", ("payload", "view_position"), 64),
    ("cxr", ("payload", "uri"), 4096),
]


@pytest.mark.parametrize("name, path, limit", LENGTHS)
def test_every_string_field_has_a_length_limit(name, path, limit):
    # Limits count characters, not bytes; raw UTF-8 keeps a longest note under the size limit.
    def utf8(data: dict) -> bytes:
        return json.dumps(data, ensure_ascii=False).encode()

    assert ev.decode(utf8(with_field(name, path, "é" * limit)))
    error = refused(utf8(with_field(name, path, "é" * (limit + 1))))
    kind = VALID[name].type
    assert (error.reason, error.detail) == (
        "schema_violation",
        f"{kind}.{'.'.join(path)}: string_too_long",
    )


def test_ids_and_sources_cannot_be_empty():
    for path in [("event_id",), ("source",)]:
        assert refused(dumps(with_field("lab", path, ""))).reason == "schema_violation"
    assert refused(dumps(with_field("cxr", ("payload", "uri"), ""))).reason == "schema_violation"


# --------------------------------------------------------------------------- numbers


IDS = [
    ("admission", ("hadm_id",)),
    ("admission", ("subject_id",)),
    ("lab", ("payload", "itemid")),
    ("radiology", ("payload", "from_hadm_id")),
    ("cxr", ("payload", "study_id")),
]


@pytest.mark.parametrize("name, path", IDS)
def test_ids_are_non_negative_int64(name, path):
    where = f"{VALID[name].type}.{'.'.join(path)}"
    biggest = 2**63 - 1
    event = ev.decode(dumps(with_field(name, path, biggest)))
    assert ev.decode(ev.encode(event)) == event
    assert ev.decode(dumps(with_field(name, path, 0)))  # simulations number from 0
    for value, rule in [
        (2**63, "less_than_equal"),
        (10**30, "less_than_equal"),
        (-1, "greater_than_equal"),
        (-(2**63), "greater_than_equal"),
    ]:
        error = refused(dumps(with_field(name, path, value)))
        assert (error.reason, error.detail) == ("schema_violation", f"{where}: {rule}")


FLOATS = [
    ("lab", ("payload", "value")),
    ("admission", ("payload", "age")),
    ("discharge", ("payload", "los_days")),
]


@pytest.mark.parametrize("name, path", FLOATS)
@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN", b"1e999", b"-1e999"])
def test_non_finite_numbers_are_refused(name, path, literal):
    raw = dumps(with_field(name, path, "NUMBER")).replace(b'"NUMBER"', literal)
    error = refused(raw)
    assert (error.reason, error.detail) == (
        "non_finite",
        f"{VALID[name].type}.{'.'.join(path)}: finite_number",
    )


def test_non_finite_numbers_are_refused_when_events_are_built_too():
    with pytest.raises(ValidationError):
        ev.ObservationPayload(itemid=99999, value=math.inf, charttime=T0, kind="lab")
    with pytest.raises(ValidationError):
        ev.DischargePayload(dischtime=T0, los_days=math.nan, hospital_expire_flag=True)
    assert refused(with_field("lab", ("payload", "value"), math.nan)).reason == "non_finite"


@pytest.mark.parametrize("item", list(itemids.ITEMS.values()), ids=lambda item: item.name)
def test_a_known_item_outside_its_plausible_range_is_implausible(item):
    def observation(value):
        data = with_field("lab", ("payload", "itemid"), item.itemid)
        data["payload"].update(value=value, kind=item.kind)
        return dumps(data)

    for value in (item.low, item.high):  # inclusive, as the MIMIC reader's out_of_range
        assert ev.decode(observation(value)).payload.value == value
    for value in (item.low - 1, item.high + 1, -1e300, 1e300):
        error = refused(observation(value))
        assert (error.reason, error.detail) == (
            "implausible_value",
            f"observation.payload.value: implausible_value (itemid {item.itemid})",
        )


@pytest.mark.parametrize("name", ["lab", "vital", "radiology", "prior_summary"])
def test_a_result_or_note_charted_after_its_event_time_is_refused(name):
    # Known at event_time, charted later: a value from the future at every cutoff between.
    event = VALID[name]
    at_once = event.event_time.isoformat()
    assert ev.decode(dumps(with_field(name, ("payload", "charttime"), at_once)))
    later = (event.event_time + timedelta(seconds=1)).isoformat()
    error = refused(dumps(with_field(name, ("payload", "charttime"), later)))
    assert error.reason == "charted_after_event_time" and later not in error.detail
    zoned = (event.event_time + timedelta(hours=1)).astimezone(timezone(timedelta(hours=5)))
    error = refused(dumps(with_field(name, ("payload", "charttime"), zoned.isoformat())))
    assert error.reason == "charted_after_event_time"  # compared in UTC, whatever the offset


def test_an_unknown_item_keeps_any_finite_value():
    # The features ignore itemids they do not know; the contract only asks for a number.
    for value in (-1e300, 0.0, 1e300):
        data = with_field("lab", ("payload", "itemid"), 99_999)
        data["payload"]["value"] = value
        assert ev.decode(dumps(data)).payload.value == value


def test_a_known_item_outside_its_range_is_refused_at_the_door_not_when_built():
    # In-process builders (simulations, the MIMIC reader, which drops such rows itself as
    # out_of_range) may build one; decode, validate_json and validate refuse it.
    spo2 = ev.ObservationEvent(
        **envelope("spo2"),
        payload=ev.ObservationPayload(itemid=220277, value=101, charttime=T0, kind="vital"),
    )
    assert refused(ev.encode(spo2)).reason == "implausible_value"
    with pytest.raises(ev.InvalidEvent) as info:
        ev.validate(spo2)
    assert info.value.reason == "implausible_value"


# --------------------------------------------------------------------------- times


TIMES = [
    ("lab", ("event_time",)),
    ("lab", ("ingest_time",)),
    ("admission", ("payload", "admittime")),
    ("lab", ("payload", "charttime")),
    ("radiology", ("payload", "charttime")),
    ("cxr", ("payload", "studytime")),
    ("discharge", ("payload", "dischtime")),
]


@pytest.mark.parametrize("name, path", TIMES)
def test_times_must_fall_in_the_plausible_years(name, path):
    where = f"{VALID[name].type}.{'.'.join(path)}"
    for value in ("1900-01-01T00:00:00", "2399-12-31T23:59:59", "2214-06-30T08:00:00+05:00"):
        data = with_field(name, path, value)
        if path in (("event_time",), ("payload", "charttime")) and "charttime" in data["payload"]:
            data["event_time"] = data["payload"]["charttime"] = value  # charted by event time
        assert ev.decode(dumps(data))
    for value, rule in [
        ("9999-01-01T00:00:00", "less_than"),
        ("9999-12-31T23:59:59Z", "less_than"),
        ("2400-01-01T00:00:00", "less_than"),
        ("1899-12-31T23:59:59", "greater_than_equal"),
        ("0001-01-01T00:00:00+01:00", "greater_than_equal"),  # would overflow in UTC
    ]:
        error = refused(dumps(with_field(name, path, value)))
        assert (error.reason, error.detail) == ("schema_violation", f"{where}: {rule}")


def test_an_event_dated_9999_cannot_be_built():
    with pytest.raises(ValidationError):
        ev.ObservationEvent(**{**VALID["lab"].model_dump(), "event_time": datetime(9999, 1, 1)})


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    "version, shown", [(2, "2"), (0, "0"), ("1", "str"), (1.5, "float"), (None, "NoneType")]
)
def test_an_unknown_schema_version_is_unsupported(version, shown):
    error = refused(dumps(with_field("lab", ("schema_version",), version)))
    assert (error.reason, error.detail) == ("unsupported_schema_version", f"schema_version {shown}")
    error = refused(with_field("lab", ("schema_version",), version))
    assert error.reason == "unsupported_schema_version"


@pytest.mark.parametrize(
    "raw",
    [b"\x00", b"{", b"[1, 2]", b'"an event"', b"null", b"12", b'{"a": 1} {"b": 2}', b"{'a': 1}"],
)
def test_what_is_not_a_json_object_is_malformed(raw):
    assert refused(raw).reason == "malformed_json"


def test_a_number_too_long_to_convert_is_malformed():
    raw = ev.encode(VALID["lab"]).replace(str(HADM).encode(), b"9" * 5000)
    assert refused(raw).reason == "malformed_json"


def test_the_detail_never_carries_the_value():
    secret = "Jane Doe MRN 4411"
    cases = [
        with_field("lab", ("event_id",), secret * 20),
        with_field("lab", ("payload", "kind"), secret),
        with_field("lab", ("schema_version",), secret),
        with_field("lab", ("type",), secret),
        with_field("lab", ("payload", secret), 1),  # an unknown field, named by the producer
        with_field("lab", (secret,), 1),
        with_field("lab", ("payload", "charttime"), secret),
        with_field("lab", ("payload", "value"), secret),
    ]
    for data in cases:
        for raw in (dumps(data), data):
            error = refused(raw)
            assert "Jane" not in str(error) and "4411" not in str(error), error
    error = refused(ev.encode(VALID["lab"]).replace(b"test/lab", b"\xffJane Doe"))
    assert "Jane" not in str(error)


# --------------------------------------------------------------------------- properties


def assert_sane(event) -> None:
    """What the stream relies on in every event decode returns."""
    pending = [event.model_dump()]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, bool | str):
            if isinstance(value, str):
                value.encode()
        elif isinstance(value, int):
            assert 0 <= value < 2**63
        elif isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, datetime):
            assert ev.MIN_YEAR <= value.year <= ev.MAX_YEAR


def decodes_or_refuses(raw) -> None:
    """decode gives an event that re-encodes to itself, or an InvalidEvent; nothing else."""
    try:
        event = ev.decode(raw)
    except ev.InvalidEvent as exc:
        assert exc.reason in ev.REASONS
        label(exc.reason)  # seen with --hypothesis-show-statistics
        if not isinstance(raw, dict):
            with pytest.raises(ev.InvalidEvent) as again:
                ev.validate_json(raw)
            assert again.value.reason == exc.reason
        return
    label("valid")
    assert_sane(event)
    assert ev.decode(ev.encode(event)) == event


@PROPERTY
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_refused(raw):
    decodes_or_refuses(raw)


@PROPERTY
@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=512))
def test_arbitrary_text_decodes_or_is_refused(raw):
    decodes_or_refuses(raw)


TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=30,
)


@PROPERTY
@given(JSON_VALUES)
def test_arbitrary_json_values_decode_or_are_refused(value):
    decodes_or_refuses(dumps(value))
    if isinstance(value, dict):
        decodes_or_refuses(value)


def leaf_paths(data: dict, prefix=()) -> list[tuple]:
    paths = []
    for name, value in data.items():
        if isinstance(value, dict):
            paths.extend(leaf_paths(value, prefix + (name,)))
        else:
            paths.append(prefix + (name,))
    return paths


PLAUSIBLE_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=10**9),
    st.floats(min_value=0, max_value=100),
    st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(2300, 1, 1)).map(
        datetime.isoformat
    ),
    st.booleans(),
)
HOSTILE_VALUES = st.one_of(
    TEXT,
    st.sampled_from([127, 128, 129, 4097, ev.MAX_NOTE_CHARS + 1]).map(lambda n: "y" * n),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64]),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324]),
    st.none(),
    st.booleans(),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
        datetime.isoformat
    ),
    st.integers(min_value=1, max_value=5000).map(lambda n: f"__deep_{n}__"),
    JSON_VALUES,
)


def spliced(data: dict) -> bytes:
    """JSON of ``data`` with each ``"__deep_N__"`` string replaced by arrays N deep."""
    raw = dumps(data)
    while b'"__deep_' in raw:
        start = raw.index(b'"__deep_')
        end = raw.index(b'__"', start + 8)
        n = int(raw[start + 8 : end])
        raw = raw[:start] + b"[" * n + b"]" * n + raw[end + 3 :]
    return raw


@PROPERTY
@given(st.data())
def test_valid_envelopes_with_hostile_fields_decode_or_are_refused(data):
    event = obj(data.draw(st.sampled_from(list(VALID))))
    for path in data.draw(st.lists(st.sampled_from(leaf_paths(event)), min_size=1, max_size=3)):
        target = event
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = data.draw(PLAUSIBLE_VALUES | HOSTILE_VALUES)
    if data.draw(st.booleans()):
        where = event["payload"] if data.draw(st.booleans()) else event
        where[data.draw(TEXT)] = data.draw(HOSTILE_VALUES)  # a field the contract lacks
    raw = spliced(event)
    decodes_or_refuses(raw)
    if len(raw) < 200_000:
        decodes_or_refuses(raw.decode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "name, path, value",
    [
        ("cancel", ("payload", "cancels"), "note"),
        ("transfer", ("payload", "careunit"), "x" * 129),
        ("lab", ("payload", "status"), "amended"),
        ("lab", ("payload", "result_id"), ""),
    ],
)
def test_feed_fields_are_checked(name, path, value):
    assert refused(dumps(with_field(name, path, value))).reason == "schema_violation"
