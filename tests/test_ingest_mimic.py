"""The MIMIC-IV reader on the real demo, on a synthetic cohort, and on broken input."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features import definitions as fd
from features import model_inputs as mi
from features import offline
from features.fitted import FittedFeatures
from features.state import hours
from features.vocab import Vocabulary
from ingest import itemids
from ingest.accounting import JsonLinesDeadLetters
from ingest.events import sort_key
from ingest.mimic import MimicLayoutError, MimicReader
from ingest.replay import first_hours, in_event_time_order
from ingest.synth import generate
from m3t.settings import Settings

DEMO = Settings().data_dir / "mimic-iv-demo-2.2"


@pytest.fixture(scope="module")
def demo():
    reader = MimicReader(DEMO)
    admissions = list(reader.admissions())
    return reader, admissions


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, 30, seed=7)
    return out


def _csv(name: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(DEMO / f"{name}.csv.gz", **kwargs)


# --------------------------------------------------------------------------- the real demo


def test_demo_tables_read_as_pandas_reads_them(demo):
    reader, admissions = demo
    tables = reader.stats.tables
    for name in (
        "hosp/patients",
        "hosp/admissions",
        "hosp/labevents",
        "icu/icustays",
        "hosp/d_labitems",
        "hosp/transfers",
    ):
        assert tables[name].read == len(_csv(name)), name
    adm = _csv("hosp/admissions")
    assert len(admissions) == len(adm) == 275
    assert {events[0].hadm_id for events in admissions} == set(adm.hadm_id)
    assert reader.stats.events["admission"] == reader.stats.events["discharge"] == 275
    # The demo has no chartevents, notes or images: those sources are simply absent.
    assert "icu/chartevents" not in tables and "note/radiology" not in tables
    assert set(reader.stats.events) == {"admission", "observation", "discharge", "transfer"}
    # every admission has a ward: the transfers table's rows with a careunit
    transfers = _csv("hosp/transfers")
    moves = transfers.careunit.notna() & transfers.hadm_id.notna()
    assert reader.stats.events["transfer"] == tables["hosp/transfers"].used == moves.sum()


def test_demo_every_row_is_accounted_for(demo):
    reader, _ = demo
    for name, table in reader.stats.tables.items():
        assert table.balanced, (name, table.as_dict())
    labs = reader.stats.tables["hosp/labevents"]
    outpatient = _csv("hosp/labevents").hadm_id.isna()
    used_items = _csv("hosp/labevents").itemid.isin(itemids.LAB_IDS)
    assert labs.skipped["no_hadm_id"] == (outpatient & used_items).sum()
    assert labs.skipped["itemid_not_used"] == (~used_items).sum()
    assert labs.skipped["no_numeric_value"] > 0  # text-only results of used items


def test_demo_observations_equal_the_pandas_selection_timed_by_storetime(demo):
    reader, admissions = demo
    labs = _csv("hosp/labevents", parse_dates=["charttime", "storetime"])
    adm = _csv("hosp/admissions", parse_dates=["admittime", "dischtime"])
    labs = labs.merge(adm[["hadm_id", "admittime", "dischtime"]], on="hadm_id")
    # Available when stored (charted where the storetime is empty), never before admission.
    labs["available"] = labs.storetime.fillna(labs.charttime)
    expected = labs[
        labs.itemid.isin(itemids.LAB_IDS)
        & labs.valuenum.notna()
        & (labs.available <= labs.dischtime)
    ]
    got = Counter(
        (e.hadm_id, e.payload.itemid, e.payload.charttime, e.event_time, e.payload.value)
        for events in admissions
        for e in events
        if e.type == "observation"
    )
    event_time = expected[["available", "admittime"]].max(axis=1).dt.tz_localize("UTC")
    want = Counter(
        zip(
            expected.hadm_id.astype(int),
            expected.itemid,
            expected.charttime.dt.to_pydatetime(),
            event_time.dt.to_pydatetime(),
            expected.valuenum,
        )
    )
    assert got == want
    stats = reader.stats.tables["hosp/labevents"]
    assert stats.fallbacks["storetime_missing"] == expected.storetime.isna().sum()
    assert (
        stats.skipped["after_discharge"]
        == (
            labs.itemid.isin(itemids.LAB_IDS)
            & labs.valuenum.notna()
            & (labs.available > labs.dischtime)
        ).sum()
    )


def test_demo_admissions_carry_age_and_outcome(demo):
    _, admissions = demo
    adm = _csv("hosp/admissions", parse_dates=["admittime", "dischtime"]).set_index("hadm_id")
    patients = _csv("hosp/patients").set_index("subject_id")
    for events in admissions:
        opened, closed = events[0], events[-1]
        row = adm.loc[opened.hadm_id]
        patient = patients.loc[row.subject_id]
        assert opened.type == "admission" and closed.type == "discharge"
        assert opened.payload.age == patient.anchor_age + row.admittime.year - patient.anchor_year
        assert closed.payload.los_days == pytest.approx(
            (row.dischtime - row.admittime).total_seconds() / 86400
        )
        assert closed.payload.hospital_expire_flag == bool(row.hospital_expire_flag)


def test_demo_events_per_admission_in_time_order_and_no_outcome_in_features(demo):
    _, admissions = demo
    for events in admissions:
        assert events == sorted(events, key=sort_key)
        assert len({e.hadm_id for e in events}) == 1
        for event in events[:-1]:
            fields = set(event.payload.model_dump())
            assert not fields & {"los_days", "hospital_expire_flag", "dischtime", "deathtime"}
            assert event.event_time >= events[0].event_time


# --------------------------------------------------------------------------- synthetic cohort


def test_synthetic_cohort_reads_back_with_every_modality(cohort):
    reader = MimicReader(cohort)
    admissions = list(reader.admissions())
    assert len(admissions) == 30
    assert reader.stats.balanced and not reader.stats.dead_letters
    assert set(reader.stats.events) == {
        "admission",
        "observation",
        "note",
        "cxr",
        "discharge",
        "transfer",
    }
    notes = Counter(
        e.payload.note_type for events in admissions for e in events if e.type == "note"
    )
    assert notes["radiology"] > 0 and notes["discharge"] > 0
    kinds = Counter(
        e.payload.kind for events in admissions for e in events if e.type == "observation"
    )
    assert kinds["lab"] > 0 and kinds["vital"] > 0
    for events in admissions:
        assert events == sorted(events, key=sort_key)
        for e in events:
            if e.type == "note" and e.payload.note_type == "discharge":
                # A prior stay's summary, arriving when this admission opens.
                assert e.payload.from_hadm_id != e.hadm_id and e.event_time == events[0].event_time
            if e.type == "cxr":
                assert Path(e.payload.uri.removeprefix("file://")).is_file()


def test_synthetic_cxr_from_the_dicom_tree_matches_the_jpg_tree(cohort):
    def studies(mode):
        reader = MimicReader(cohort, cxr=mode)
        found = {
            (e.hadm_id, e.payload.study_id, e.payload.studytime, e.payload.view_position)
            for e in reader.events()
            if e.type == "cxr"
        }
        return found, reader.stats

    jpg, jpg_stats = studies("jpg")
    dcm, dcm_stats = studies("dicom")
    assert jpg == dcm and len(jpg) > 0
    assert "cxr/dicom" in dcm_stats.tables and dcm_stats.balanced
    none, _ = studies("none")
    assert none == set()


# --------------------------------------------------------------------------- bad input


def _write(path: Path, text: str, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.fixture
def broken(tmp_path) -> Path:
    """A tiny MIMIC folder (plain .csv) with one row per class of bad input."""
    root = tmp_path / "mimic"
    _write(
        root / "hosp/patients.csv",
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
        "1,F,50,2150,2011 - 2013,\n2,M,60,2150,2011 - 2013,\n3,X,40,2150,2011 - 2013,\n"
        "1e30,F,50,2150,2011 - 2013,\n",  # no int64
    )
    _write(
        root / "hosp/admissions.csv",
        "subject_id,hadm_id,admittime,dischtime,admission_type,admission_location,insurance,"
        "hospital_expire_flag\n"
        "1,101,2150-01-01 10:00:00,2150-01-05 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "1,102,2150-03-01 10:00:00,2150-03-02 10:00:00,URGENT,EMERGENCY ROOM,Medicare,1\n"
        "2,201,2150-02-01 10:00:00,2150-01-30 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "2,202,not a time,2150-04-01 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "9,901,2150-02-01 10:00:00,2150-02-03 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "1,inf,2150-05-01 10:00:00,2150-05-03 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n",
    )
    _write(
        root / "hosp/d_labitems.csv",
        "itemid,label,fluid,category\n50912,Creatinine,Blood,Chemistry\n"
        "50971,Potassium,Blood,Chemistry\n50902,Chloride,Blood,Chemistry\n",
    )
    _write(
        root / "hosp/labevents.csv",
        "subject_id,hadm_id,itemid,charttime,storetime,valuenum,valueuom\n"
        "1,101,50912,2150-01-01 12:00:00,2150-01-01 13:00:00,1.1,mg/dL\n"  # good
        "1,101,99999,2150-01-01 12:00:00,2150-01-01 13:00:00,1.0,mg/dL\n"  # unknown itemid
        "1,101,50971,2150-01-01 12:00:00,2150-01-01 13:00:00,-4.0,mEq/L\n"  # impossible K
        "1,101,50912,yesterday,2150-01-01 13:00:00,1.0,mg/dL\n"  # unparseable charttime
        "1,101,50912,2150-01-01 12:00:00,soon,1.0,mg/dL\n"  # unparseable storetime
        "1,101,50912,2150-01-01T12:00:00+05:00,,1.0,mg/dL\n"  # an offset MIMIC never has
        "1,101,50912,2150-01-01 12:00:00,,1.0,mg/dL,extra\n"  # malformed row
        "1,,50912,2149-12-01 12:00:00,2149-12-01 13:00:00,1.0,mg/dL\n"  # outpatient
        "1,101,50902,2150-01-01 12:00:00,,101,mEq/L\n"  # known item the model does not use
        "1,101,50912,2150-01-01 12:00:00,,,mg/dL\n"  # text-only result
        "1,555,50912,2150-01-01 12:00:00,,1.0,mg/dL\n"  # no such admission
        "2,201,50912,2150-02-01 12:00:00,,1.0,mg/dL\n"  # its admission was rejected
        "1,101,50912,2150-01-09 12:00:00,2150-01-09 13:00:00,1.0,mg/dL\n",
    )  # after discharge
    _write(root / "icu/d_items.csv", "itemid,label\n220045,Heart Rate\n")
    _write(
        root / "icu/chartevents.csv.gz",
        "subject_id,hadm_id,stay_id,itemid,charttime,storetime,valuenum,valueuom\n"
        "1,101,301,220045,2150-01-01 12:00:00,2150-01-01 12:05:00,88,bpm\n"
        "1,101,301,220045,2150-01-01 13:00:00,2150-01-01 13:05:00,-20,bpm\n",
        compress=True,
    )
    _write(
        root / "note/radiology.csv",
        "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n"
        "1-RR-1,1,101,RR,1,2150-01-02 10:00:00,,No acute process.\n"
        f"1-RR-2,1,101,RR,2,2150-01-03 10:00:00,,{'x' * 500}\n",
    )
    _write(
        root / "note/discharge.csv",
        "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n"
        "1-DS-1,1,101,DS,1,2150-01-05 10:00:00,,Discharged home.\n"
        "1-DS-2,1,102,DS,2,2150-03-02 10:00:00,,Patient expired.\n",
    )
    # A truncated gzip: the reader keeps what it could read and dead-letters the rest.
    icu = gzip.compress(
        b"subject_id,hadm_id,stay_id,intime,outtime\n" + b"1,101,301,2150-01-01 11:00:00,x\n" * 500
    )
    (root / "icu/icustays.csv.gz").write_bytes(icu[: len(icu) // 2])
    cxr = root / "mimic-cxr-jpg"
    _write(
        cxr / "mimic-cxr-2.0.0-metadata.csv",
        "dicom_id,subject_id,study_id,ViewPosition,StudyDate,StudyTime\n"
        "d1,1,11,PA,21500102,93000.5\n"  # image file missing
        "d2,1,12,PA,21500102,999999\n"  # impossible time
        "d3,1,13,PA,21500801,120000\n",
    )  # outside any admission
    return root


def test_each_bad_input_class_is_dead_lettered_with_its_reason(broken, tmp_path):
    letters_path = tmp_path / "dead.jsonl"
    with JsonLinesDeadLetters(letters_path) as sink:
        reader = MimicReader(broken, max_note_chars=100, dead_letters=sink)
        admissions = list(reader.admissions())
    tables = reader.stats.tables
    assert tables["hosp/patients"].dead == {"invalid_value": 1, "malformed_row": 1}
    assert tables["hosp/admissions"].dead == {
        "discharge_before_admission": 1,
        "unparseable_time": 1,
        "unknown_patient": 1,
        "malformed_row": 1,  # hadm_id inf
    }
    assert tables["hosp/labevents"].dead == {
        "unknown_itemid": 1,
        "out_of_range": 1,
        "unparseable_time": 3,
        "malformed_row": 1,
        "unknown_admission": 1,
    }
    assert tables["hosp/labevents"].skipped == {
        "no_hadm_id": 1,
        "itemid_not_used": 1,
        "no_numeric_value": 1,
        "admission_rejected": 1,
        "after_discharge": 1,
    }
    # The good lab and both notes were stored; the kept rows without a storetime are counted.
    assert tables["hosp/labevents"].fallbacks == {}
    assert tables["note/radiology"].fallbacks == {"storetime_missing": 1}
    assert tables["note/discharge"].fallbacks == {"storetime_missing": 1}
    assert tables["icu/chartevents"].dead == {"out_of_range": 1}
    assert tables["note/radiology"].dead == {"note_too_long": 1}
    assert tables["note/discharge"].skipped == {"no_later_admission": 1}
    assert tables["icu/icustays"].dead["corrupt_file"] == 1
    assert tables["mimic-cxr-jpg/mimic-cxr-2.0.0-metadata"].dead == {
        "unparseable_time": 1,
        "image_missing": 1,
    }
    assert tables["mimic-cxr-jpg/mimic-cxr-2.0.0-metadata"].skipped == {"outside_admission": 1}
    assert reader.stats.balanced

    # The valid rows all came through.
    assert [events[0].hadm_id for events in admissions] == [101, 102]
    first = Counter(e.type for e in admissions[0])
    assert first == {"admission": 1, "observation": 2, "note": 1, "discharge": 1}
    assert [e.payload.note_type for e in admissions[1] if e.type == "note"] == ["discharge"]

    letters = [json.loads(line) for line in letters_path.read_text().splitlines()]
    assert len(letters) == sum(reader.stats.dead_letters.values())
    assert all(set(letter) == {"reason", "source", "position", "detail"} for letter in letters)
    text = letters_path.read_text()
    for value in ("-4.0", "yesterday", "soon", "99999", "-20", "xxxxx", "not a time"):
        assert value not in text  # reasons and positions only, never the values


def test_a_folder_without_admissions_is_refused(tmp_path):
    with pytest.raises(MimicLayoutError, match="hosp/admissions"):
        MimicReader(tmp_path)


def test_a_table_without_its_columns_is_refused(broken):
    _write(broken / "hosp/labevents.csv", "subject_id,hadm_id\n1,101\n")
    with pytest.raises(MimicLayoutError, match="itemid"):
        list(MimicReader(broken).admissions())


# --------------------------------------------------------------------------- availability time

ADMIT = datetime(2150, 1, 1, 10, tzinfo=UTC)


@pytest.fixture
def stored_late(tmp_path) -> Path:
    """One patient, three admissions; results charted before a cutoff and stored after it."""
    root = tmp_path / "mimic"
    _write(
        root / "hosp/patients.csv",
        "subject_id,gender,anchor_age,anchor_year\n1,F,50,2150\n",
    )
    _write(
        root / "hosp/admissions.csv",
        "subject_id,hadm_id,admittime,dischtime,admission_type,admission_location,insurance,"
        "hospital_expire_flag\n"
        "1,101,2150-01-01 10:00:00,2150-01-03 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "1,102,2150-02-01 10:00:00,2150-02-02 10:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n"
        "1,103,2150-02-02 12:00:00,2150-02-03 12:00:00,URGENT,EMERGENCY ROOM,Medicare,0\n",
    )
    _write(
        root / "hosp/d_labitems.csv",
        "itemid,label\n50912,Creatinine\n50971,Potassium\n",
    )
    _write(
        root / "hosp/labevents.csv",
        "subject_id,hadm_id,itemid,charttime,storetime,valuenum,valueuom\n"
        "1,101,50912,2150-01-01 11:00:00,2150-01-01 13:00:00,2.0,mg/dL\n"  # reported 2 h later
        "1,101,50912,2150-01-01 12:00:00,,1.5,mg/dL\n"  # no storetime: timed by charttime
        "1,101,50971,2150-01-01 08:00:00,2150-01-01 09:00:00,4.0,mEq/L\n"  # before admission
        "1,101,50971,2150-01-03 09:00:00,2150-01-03 11:00:00,4.5,mEq/L\n"  # reported after disch.
        "1,101,50971,2150-01-01 14:00:00,2150-01-01 13:59:00,4.1,mEq/L\n",  # stored before drawn
    )
    _write(root / "icu/d_items.csv", "itemid,label\n220045,Heart Rate\n")
    _write(
        root / "icu/chartevents.csv",
        "subject_id,hadm_id,stay_id,itemid,charttime,storetime,valuenum,valueuom\n"
        "1,101,301,220045,2150-01-01 11:00:00,2150-01-01 11:30:00,90,bpm\n",
    )
    _write(
        root / "note/radiology.csv",
        "note_id,subject_id,hadm_id,charttime,storetime,text\n"
        "1-RR-1,1,101,2150-01-01 11:00:00,2150-01-01 18:00:00,No acute process.\n",
    )
    _write(
        root / "note/discharge.csv",
        "note_id,subject_id,hadm_id,charttime,storetime,text\n"
        "1-DS-1,1,101,2150-01-03 10:00:00,2150-01-04 09:00:00,Discharged home.\n"
        # Charted before admission 103 opened, stored after: not known when it opened.
        "1-DS-2,1,102,2150-02-02 10:00:00,2150-02-02 14:00:00,Discharged again.\n",
    )
    return root


def _at(hours: float) -> datetime:
    return ADMIT + timedelta(hours=hours)


def _charted(hours: float) -> datetime:
    """A payload's clinical time: MIMIC's naive local time."""
    return _at(hours).replace(tzinfo=None)


def test_events_are_timed_by_when_they_were_stored(stored_late):
    reader = MimicReader(stored_late)
    admissions = list(reader.admissions())
    first = admissions[0]
    timed = {
        (e.payload.itemid, e.payload.value): (e.event_time, e.payload.charttime)
        for e in first
        if e.type == "observation"
    }
    assert timed == {
        (50912, 2.0): (_at(3), _charted(1)),  # storetime; the payload keeps charttime
        (50912, 1.5): (_at(2), _charted(2)),  # empty storetime: charttime
        (50971, 4.0): (_at(0), _charted(-2)),  # never before the admission
        (50971, 4.1): (_at(4), _charted(4)),  # never before its charttime
        (220045, 90.0): (_at(1.5), _charted(1)),
    }
    (note,) = [e for e in first if e.type == "note"]
    assert note.event_time == _at(8) and note.payload.charttime == _charted(1)
    # The first stay's summary, stored before admission 102, arrives as it opens; the
    # second's, stored after 103 opened, is not emitted at all.
    summaries = [(e.hadm_id, e.event_time) for a in admissions for e in a if e.type == "note"]
    assert summaries[1:] == [(102, admissions[1][0].event_time)]

    tables = reader.stats.tables
    assert tables["hosp/labevents"].skipped == {"after_discharge": 1}
    assert tables["hosp/labevents"].fallbacks == {
        "storetime_missing": 1,
        "storetime_before_charttime": 1,
    }
    assert tables["note/discharge"].skipped == {"written_after_next_admission": 1}
    assert reader.stats.balanced and not reader.stats.dead_letters


def test_a_result_stored_after_a_cutoff_is_not_in_the_builders_snapshot(stored_late):
    first = next(MimicReader(stored_late).admissions())
    vocab = Vocabulary.fit([e.payload.text for e in first if e.type == "note"])
    fitted = FittedFeatures.unnormalised(vocab)
    cutoffs = [hours(_at(h)) for h in (2.5, 4, 9)]  # 12:30, 14:00, 19:00
    raw = fitted.assemble(offline.snapshots(first, cutoffs, vocab), np.array(cutoffs))
    column = fd.NUMERIC_FEATURES.index
    # The 11:00 creatinine, stored at 13:00, is not known at 12:30; the 12:00 one is.
    assert raw["numeric_raw"][:, column("creatinine.count")].tolist() == [1, 2, 2]
    # "Latest" is the latest drawn among those known: the 12:00 draw, also once the 11:00
    # one has arrived.
    assert raw["numeric_raw"][:, column("creatinine.last")].tolist() == [1.5, 1.5, 1.5]
    # The radiology report, signed at 18:00, is there at 19:00 only.
    radiology = raw[mi.MODALITY_MASK][:, mi.MODALITIES.index("radiology")]
    assert radiology.tolist() == [0, 0, 1]


def test_the_replay_sends_a_result_when_it_was_stored(stored_late):
    """The replay's order and its --first-hours cut both follow the same event time."""
    admissions = list(MimicReader(stored_late).admissions())
    sent = [
        (e.payload.value, e.event_time)
        for e in in_event_time_order(first_hours(admissions, 2.5))
        if e.type == "observation" and e.payload.itemid == 50912
    ]
    assert sent == [(1.5, _at(2))]  # the 11:00 draw, stored at 13:00, is not sent yet
    order = [
        e.payload.value
        for e in in_event_time_order(admissions)
        if e.type == "observation" and e.payload.itemid == 50912
    ]
    assert order == [1.5, 2.0]  # by availability, not by draw time
