"""Reads a MIMIC-IV folder, in the real layout, into each admission's time-ordered events.

Layout (each table ``.csv.gz`` or plain ``.csv``; a table or modality that is absent is
simply absent from the output)::

    hosp/patients  hosp/admissions  hosp/labevents  hosp/d_labitems  hosp/transfers
    icu/icustays   icu/chartevents  icu/d_items
    note/radiology note/discharge                      (MIMIC-IV-Note)
    mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv[.gz] + files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    mimic-cxr/files/pXX/pSUBJECT/sSTUDY/DICOM.dcm     (MIMIC-CXR DICOM, used without JPGs)

(``cxr-jpg/``, ``cxr-dicom/`` or the root itself are also searched for the CXR trees.)

Large tables are read in chunks and only the rows the model uses are kept, as compact
columns; events are built per admission when iterated. Every row read is accounted for in
``stats``: used, dead-lettered (a reason and a position go to the dead-letter sink) or
skipped for a counted reason. Rules worth knowing:

- Age at admission is ``anchor_age + (admit year - anchor_year)``.
- Observations are kept for ``ingest.itemids`` only; other known items are skipped
  (``itemid_not_used``), items missing from the dictionary are dead letters.
- An event is placed at the time the hospital's systems knew it (its *availability
  time*), so the offline builder, the replay and the stream see a row no earlier than a
  clinician could. Per table, the event time is::

      hosp/labevents    storetime (result reported)   else charttime (specimen drawn)
      icu/chartevents   storetime (value validated)   else charttime
      note/radiology    storetime (report signed)     else charttime
      note/discharge    the next admission's admittime, if stored (else charted) by then
      admissions        admittime / dischtime
      hosp/transfers    intime (a ``transfer`` into ``careunit``; not before the admit time)
      MIMIC-CXR         the study time (StudyDate + StudyTime): the image is there at once;
                        its report's text is the radiology note, available at its storetime

  "Else charttime" applies where the storetime is empty or earlier than the charttime;
  such kept rows are counted in the table's ``fallbacks`` (``storetime_missing``,
  ``storetime_before_charttime``). An unparseable non-empty storetime is a dead letter.
  The payload keeps ``charttime`` as the clinical time (the features order values by it).
- No event is placed before its admission: a lab drawn in the emergency department
  before admission keeps its charttime in the payload, but its event time is at least the
  admit time, so an admission's stream opens with the ``admission`` event. Rows that
  became available after discharge are skipped (``after_discharge``): a result reported
  after discharge was never visible during the stay, even if drawn before it.
- The discharge summary of an admission is emitted into the patient's *next* admission
  at its admit time (``from_hadm_id`` names the admission that wrote it), and only if it
  was stored by then (``written_after_next_admission``); the summary of the current
  stay would leak its outcome.
- A chest X-ray study belongs to the admission of that patient whose
  ``[admittime, dischtime]`` contains the study time; outside any, it is skipped.

Known limit: the kept rows of the big tables (used itemids only) and the note texts are
held in memory until the scan ends; for the full MIMIC-IV that is a few GB. And pandas'
chunked parser does not report a line with *extra* fields when it is the file's very last
line (it drops the extras); anywhere else such a line is dead-lettered.
"""

from __future__ import annotations

import gzip
import re
import warnings
import zlib
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import ValidationError

from ingest import itemids
from ingest.accounting import DeadLetter, DeadLetterSink, IngestStats, TableStats
from ingest.events import (
    MAX_NOTE_CHARS,
    AdmissionEvent,
    CxrEvent,
    DischargeEvent,
    NoteEvent,
    ObservationEvent,
    TransferEvent,
    event_id,
    sort_key,
)

CXR_METADATA = "mimic-cxr-2.0.0-metadata"
_LOW = pd.Series({i: item.low for i, item in itemids.ITEMS.items()})
_HIGH = pd.Series({i: item.high for i, item in itemids.ITEMS.items()})
CXR_JPG_DIRS = ("mimic-cxr-jpg", "cxr-jpg", "cxr", ".")
CXR_DICOM_DIRS = ("mimic-cxr", "cxr-dicom", "cxr", ".")
DICOM_TABLE = "cxr/dicom"


class MimicLayoutError(ValueError):
    """The folder is not a MIMIC-IV layout the reader can use (raised before any row)."""


def find_table(root: Path, stem: str) -> Path | None:
    for suffix in (".csv.gz", ".csv"):
        path = Path(root) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def cxr_image_path(
    files_root: Path, subject_id: int, study_id: int, dicom_id: str, ext: str
) -> Path:
    """MIMIC-CXR's tree: files/p10/p10000032/s50414267/<dicom_id>.<ext>."""
    subject = str(subject_id)
    return (
        Path(files_root)
        / "files"
        / f"p{subject[:2]}"
        / f"p{subject}"
        / f"s{study_id}"
        / f"{dicom_id}.{ext}"
    )


# --------------------------------------------------------------------------- chunk I/O


class _CorruptFile(Exception):
    pass


_SKIPPED_LINE = re.compile(r"Skipping line (\d+)")
_READ_ERRORS = (
    EOFError,
    OSError,
    gzip.BadGzipFile,
    zlib.error,
    UnicodeDecodeError,
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
)


def _chunks(path: Path, columns: list[str], chunksize: int, on_bad_line) -> Iterator[pd.DataFrame]:
    """Chunks of the named columns, as strings; lines the parser rejects go to on_bad_line."""
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    except _READ_ERRORS as exc:
        raise _CorruptFile(type(exc).__name__) from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise MimicLayoutError(f"{path.name} lacks column(s) {', '.join(missing)}")
    # All columns are parsed: with ``usecols`` pandas silently accepts rows with extra fields.
    reader = pd.read_csv(
        path,
        dtype=str,
        chunksize=chunksize,
        on_bad_lines="warn",
        keep_default_na=False,
        na_values=[""],
        encoding="utf-8",
    )
    while True:
        # Rejected lines only surface as ParserWarnings naming the line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                chunk = next(reader)
            except StopIteration:
                return
            except _READ_ERRORS as exc:
                raise _CorruptFile(type(exc).__name__) from None
        for warning in caught:
            for line in _SKIPPED_LINE.findall(str(warning.message)):
                on_bad_line(int(line))
        yield chunk[columns]


def _numbers(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _ids(series: pd.Series) -> pd.Series:
    """Integer ids as float (NaN where missing, not an integer, or outside int64: inf and
    1e30 are floats equal to their floor)."""
    values = _numbers(series)
    return values.where((values == np.floor(values)) & (values >= 0) & (values < 2.0**63))


# A UTC offset or Z at the end of a time: MIMIC's times are local and naive.
_OFFSET = r"(?:[+-]\d\d:?\d\d|Z)$"


def _times(series: pd.Series) -> pd.Series:
    """Naive times; NaT where unparseable or carrying a UTC offset, which MIMIC's never do
    (pandas refuses a column mixing offsets outright, and an aware column breaks every
    comparison with the naive ones)."""
    try:
        parsed = pd.to_datetime(series, format="ISO8601", errors="coerce")
        if getattr(parsed.dt, "tz", None) is None:
            return parsed
    except (ValueError, TypeError):  # offsets mixed with naive times, or with each other
        pass
    text = series.astype("string")
    naive = text.where(~text.str.contains(_OFFSET, na=False))
    return pd.to_datetime(naive, format="ISO8601", errors="coerce")


class _Triage:
    """One chunk under triage: rows leave it as dead letters or counted skips."""

    def __init__(self, source: str, frame: pd.DataFrame, stats: TableStats, sink: DeadLetterSink):
        self.source, self.frame, self.stats, self.sink = source, frame, stats, sink
        self.alive = pd.Series(True, index=frame.index)
        stats.read += len(frame)

    def _hits(self, mask) -> pd.Series:
        mask = pd.Series(mask, index=self.frame.index) if not isinstance(mask, pd.Series) else mask
        return self.alive & mask.reindex(self.frame.index, fill_value=False).fillna(False).astype(
            bool
        )

    def dead(self, mask, reason: str, detail: str = "") -> None:
        hits = self._hits(mask)
        for index in hits.index[hits.to_numpy()]:
            self.sink(DeadLetter(reason, self.source, f"row {index + 1}", detail))
            self.stats.dead[reason] += 1
        self.alive &= ~hits

    def skip(self, mask, reason: str) -> None:
        hits = self._hits(mask)
        if hits.any():
            self.stats.skipped[reason] += int(hits.sum())
        self.alive &= ~hits

    def missing(self, values: pd.Series, column: str) -> None:
        self.dead(values.isna(), "malformed_row", column)

    @property
    def kept(self) -> pd.Index:
        return self.frame.index[self.alive.to_numpy()]


# --------------------------------------------------------------------------- the reader


class _Cursor:
    """Walks a table's kept rows in admission order, converting them to tuples in blocks."""

    def __init__(self, frame: pd.DataFrame, rank: dict[int, int], block: int = 20_000):
        self.frame = frame.assign(rank=frame.hadm_id.map(rank)).sort_values(
            ["rank", "row"], kind="stable"
        )
        self.block = block
        self._rows = self._iterate()
        self._next = next(self._rows, None)

    def _iterate(self):
        for start in range(0, len(self.frame), self.block):
            yield from self.frame.iloc[start : start + self.block].itertuples(index=False)

    def take(self, rank: int) -> list:
        """The rows of the admission with this rank (ranks are asked for in order)."""
        rows = []
        while self._next is not None and self._next.rank == rank:
            rows.append(self._next)
            self._next = next(self._rows, None)
        return rows


@dataclass
class _Admission:
    hadm_id: int
    subject_id: int
    admittime: datetime
    dischtime: datetime
    opened: AdmissionEvent
    closed: DischargeEvent


class MimicReader:
    """Each admission's validated events, in time order, from a MIMIC-IV folder.

    ``stats`` is complete once ``admissions()`` (or ``events()``) has been consumed; each
    call reads the folder afresh.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_note_chars: int = MAX_NOTE_CHARS,
        chunksize: int = 200_000,
        cxr: Literal["auto", "jpg", "dicom", "none"] = "auto",
        dead_letters: DeadLetterSink | None = None,
    ):
        self.root = Path(root)
        if find_table(self.root, "hosp/admissions") is None:
            raise MimicLayoutError(f"no hosp/admissions.csv[.gz] under {self.root}")
        self.max_note_chars = max_note_chars
        self.chunksize = chunksize
        self.cxr = cxr
        self._sink = dead_letters or (lambda letter: None)
        self.stats = IngestStats()

    # -- public

    def admissions(self) -> Iterator[list]:
        """One list of events per admission, sorted by ``events.sort_key``; by admit time."""
        self._scan()
        order = sorted(self._adm.values(), key=lambda a: (a.admittime, a.hadm_id))
        rank = {adm.hadm_id: i for i, adm in enumerate(order)}
        cursors = {name: _Cursor(frame, rank) for name, frame in self._kept.items()}
        for i, adm in enumerate(order):
            events = [adm.opened, adm.closed]
            for name, cursor in cursors.items():
                for row in cursor.take(i):
                    event = self._build(name, row, adm)
                    if event is not None:
                        events.append(event)
            events.sort(key=sort_key)
            self.stats.events.update(event.type for event in events)
            yield events

    @property
    def expected_events(self) -> int | None:
        """Events the scan found (before event validation); None until a scan has run."""
        if not hasattr(self, "_kept"):
            return None
        return 2 * len(self._adm) + sum(len(frame) for frame in self._kept.values())

    def events(self) -> Iterator:
        for events in self.admissions():
            yield from events

    # -- scanning

    def _scan(self) -> None:
        self.stats = IngestStats()
        self._kept: dict[str, pd.DataFrame] = {}
        self._patients = self._read_patients()
        self._adm: dict[int, _Admission] = {}
        self._rejected: set[int] = set()
        self._read_admissions()
        self._link_admissions()
        self._read_icustays()
        self._read_transfers()
        known_labs = self._read_dictionary("hosp/d_labitems", itemids.LAB_IDS)
        known_vitals = self._read_dictionary("icu/d_items", itemids.VITAL_IDS)
        self._read_observations("hosp/labevents", known_labs, itemids.LAB_IDS, "lab")
        self._read_observations("icu/chartevents", known_vitals, itemids.VITAL_IDS, "vital")
        self._read_notes("note/radiology")
        self._read_notes("note/discharge")
        self._read_cxr()

    def _rows(self, table: str, columns: list[str], path: Path | None = None) -> Iterator[_Triage]:
        """Triage objects over a table's chunks (nothing when the table is absent)."""
        path = path or find_table(self.root, table)
        if path is None:
            return
        stats = self.stats.table(table)

        def bad_line(line: int) -> None:
            stats.read += 1
            stats.dead["malformed_row"] += 1
            self._sink(DeadLetter("malformed_row", table, f"line {line}", "field count"))

        try:
            for chunk in _chunks(path, columns, self.chunksize, bad_line):
                yield _Triage(table, chunk, stats, self._sink)
        except _CorruptFile as exc:
            # The rest of the file is unreadable: one dead letter for it, then go on.
            stats.read += 1
            stats.dead["corrupt_file"] += 1
            self._sink(DeadLetter("corrupt_file", table, f"row {stats.read}", str(exc)))

    def _read_patients(self) -> pd.DataFrame:
        parts = []
        for rows in self._rows(
            "hosp/patients", ["subject_id", "gender", "anchor_age", "anchor_year"]
        ):
            f = rows.frame
            subject, age, year = _ids(f.subject_id), _numbers(f.anchor_age), _ids(f.anchor_year)
            rows.missing(subject, "subject_id")
            rows.missing(age, "anchor_age")
            rows.missing(year, "anchor_year")
            rows.dead(~f.gender.isin(["M", "F"]), "invalid_value", "gender")
            kept = rows.kept
            parts.append(
                pd.DataFrame(
                    {
                        "subject_id": subject[kept].astype("int64"),
                        "gender": f.gender[kept],
                        "anchor_age": age[kept],
                        "anchor_year": year[kept],
                    }
                )
            )
        patients = pd.concat(parts) if parts else pd.DataFrame(columns=["subject_id"])
        stats = self.stats.table("hosp/patients")
        duplicated = patients.subject_id.duplicated(keep="first")
        for index in patients.index[duplicated.to_numpy()]:
            stats.dead["duplicate_key"] += 1
            self._sink(
                DeadLetter("duplicate_key", "hosp/patients", f"row {index + 1}", "subject_id")
            )
        patients = patients[~duplicated]
        stats.used += len(patients)
        return patients.set_index("subject_id")

    def _read_admissions(self) -> None:
        table = "hosp/admissions"
        columns = [
            "subject_id",
            "hadm_id",
            "admittime",
            "dischtime",
            "admission_type",
            "admission_location",
            "insurance",
            "hospital_expire_flag",
        ]
        for rows in self._rows(table, columns):
            f = rows.frame
            subject, hadm = _ids(f.subject_id), _ids(f.hadm_id)
            admit, disch = _times(f.admittime), _times(f.dischtime)
            flag = f.hospital_expire_flag.map({"0": False, "1": True})
            rows.missing(subject, "subject_id")
            rows.missing(hadm, "hadm_id")
            rows.missing(f.admission_type, "admission_type")
            rows.missing(flag, "hospital_expire_flag")
            rows.dead(admit.isna(), "unparseable_time", "admittime")
            rows.dead(disch.isna(), "unparseable_time", "dischtime")
            rows.dead(disch < admit, "discharge_before_admission")
            rows.dead(~subject.isin(self._patients.index), "unknown_patient")
            rows.dead(hadm.duplicated() | hadm.isin(list(self._adm)), "duplicate_key", "hadm_id")
            for index in rows.kept:
                adm = self._admission(
                    index,
                    int(subject[index]),
                    int(hadm[index]),
                    admit[index],
                    disch[index],
                    f.loc[index],
                    bool(flag[index]),
                )
                if adm is None:
                    rows.stats.dead["schema_violation"] += 1
                    self._rejected.add(int(hadm[index]))
                else:
                    rows.stats.used += 1
                    self._adm[adm.hadm_id] = adm
            self._rejected.update(int(h) for h in hadm[~rows.alive].dropna())
        self._rejected -= set(self._adm)

    def _admission(self, index, subject, hadm, admit, disch, row, died) -> _Admission | None:
        source = "hosp/admissions"
        patient = self._patients.loc[subject]
        admittime, dischtime = admit.to_pydatetime(), disch.to_pydatetime()
        envelope = dict(hadm_id=hadm, subject_id=subject, source=source)
        try:
            opened = AdmissionEvent(
                event_id=event_id(source, f"{index}:admission"),
                event_time=admittime,
                **envelope,
                payload=dict(
                    admittime=admittime,
                    admission_type=row.admission_type,
                    admission_location=_text(row.admission_location),
                    insurance=_text(row.insurance),
                    gender=patient.gender,
                    age=patient.anchor_age + (admittime.year - patient.anchor_year),
                ),
            )
            closed = DischargeEvent(
                event_id=event_id(source, f"{index}:discharge"),
                event_time=dischtime,
                **envelope,
                payload=dict(
                    dischtime=dischtime,
                    los_days=(disch - admit) / pd.Timedelta(days=1),
                    hospital_expire_flag=died,
                ),
            )
        except ValidationError as exc:
            self._sink(DeadLetter("schema_violation", source, f"row {index + 1}", _where(exc)))
            return None
        return _Admission(hadm, subject, admittime, dischtime, opened, closed)

    def _link_admissions(self) -> None:
        """Lookups by hadm_id (vectorised joins for the big tables), and each admission's
        successor: the same patient's next admission by admit time."""
        by_subject: dict[int, list[_Admission]] = {}
        for adm in self._adm.values():
            by_subject.setdefault(adm.subject_id, []).append(adm)
        following = {}
        for stays in by_subject.values():
            stays.sort(key=lambda a: (a.admittime, a.hadm_id))
            following.update((a.hadm_id, b.hadm_id) for a, b in zip(stays, stays[1:]))
        self._by_subject = by_subject
        index = pd.Index(list(self._adm), dtype="int64")
        self._owner = pd.Series(
            [a.subject_id for a in self._adm.values()], index=index, dtype="float64"
        )
        self._admit = pd.Series(
            pd.to_datetime([a.admittime for a in self._adm.values()]), index=index
        )
        self._disch = pd.Series(
            pd.to_datetime([a.dischtime for a in self._adm.values()]), index=index
        )
        self._next = pd.Series(following, dtype="float64")

    def _bind(self, rows: _Triage, subject: pd.Series, hadm: pd.Series) -> None:
        """Rows must belong to a valid admission of the same patient."""
        rows.skip(hadm.isna(), "no_hadm_id")
        rows.skip(hadm.isin(list(self._rejected)), "admission_rejected")
        owner = hadm.map(self._owner)
        rows.dead(owner.isna(), "unknown_admission")
        rows.dead(owner != subject, "subject_mismatch")

    def _read_icustays(self) -> None:
        for rows in self._rows(
            "icu/icustays", ["subject_id", "hadm_id", "stay_id", "intime", "outtime"]
        ):
            f = rows.frame
            subject, hadm = _ids(f.subject_id), _ids(f.hadm_id)
            rows.missing(subject, "subject_id")
            rows.missing(_ids(f.stay_id), "stay_id")
            rows.dead(_times(f.intime).isna(), "unparseable_time", "intime")
            self._bind(rows, subject, hadm)
            rows.stats.used += len(rows.kept)

    def _read_transfers(self) -> None:
        """Moves into a ward or unit; the discharge rows (no careunit) say nothing new."""
        parts = []
        columns = ["subject_id", "hadm_id", "eventtype", "careunit", "intime"]
        for rows in self._rows("hosp/transfers", columns):
            f = rows.frame
            subject, hadm = _ids(f.subject_id), _ids(f.hadm_id)
            rows.missing(subject, "subject_id")
            rows.skip(f.eventtype.astype(str).str.lower() == "discharge", "discharge_row")
            rows.skip(f.careunit.isna() | (f.careunit.astype(str).str.strip() == ""), "no_careunit")
            self._bind(rows, subject, hadm)
            intime = _times(f.intime)
            rows.dead(intime.isna(), "unparseable_time", "intime")
            self._skip_after_discharge(rows, hadm, intime)
            kept = rows.kept
            parts.append(
                pd.DataFrame(
                    {
                        "row": kept,
                        "hadm_id": hadm[kept].astype("int64"),
                        "careunit": f.careunit[kept].astype(str),
                        "intime": intime[kept],
                    }
                )
            )
        if parts:
            self._kept["hosp/transfers"] = pd.concat(parts, ignore_index=True)

    def _read_dictionary(self, table: str, fallback: frozenset[int]) -> frozenset[int]:
        """Known itemids; without the dictionary file, the items the model uses."""
        known: set[int] = set()
        for rows in self._rows(table, ["itemid"]):
            ids = _ids(rows.frame.itemid)
            rows.missing(ids, "itemid")
            known.update(ids[rows.kept].astype("int64"))
            rows.stats.used += len(rows.kept)
        return frozenset(known) if table in self.stats.tables else fallback

    def _read_observations(
        self, table: str, known: frozenset[int], used: frozenset[int], kind: str
    ) -> None:
        parts = []
        columns = [
            "subject_id",
            "hadm_id",
            "itemid",
            "charttime",
            "storetime",
            "valuenum",
            "valueuom",
        ]
        for rows in self._rows(table, columns):
            f = rows.frame
            subject, hadm, item = _ids(f.subject_id), _ids(f.hadm_id), _ids(f.itemid)
            rows.missing(subject, "subject_id")
            rows.missing(item, "itemid")
            rows.dead(~item.isin(list(known)), "unknown_itemid")
            rows.skip(~item.isin(list(used)), "itemid_not_used")
            self._bind(rows, subject, hadm)
            charttime, storetime = _chart_and_store_times(rows, f)
            available = _available(charttime, storetime)
            value = _numbers(f.valuenum)
            rows.skip(value.isna(), "no_numeric_value")  # a text-only result ("NEG", "ART.")
            low, high = item.map(_LOW), item.map(_HIGH)
            rows.dead((value < low) | (value > high), "out_of_range", "valuenum")
            self._skip_after_discharge(rows, hadm, available)
            _count_fallbacks(rows, charttime, storetime)
            kept = rows.kept
            parts.append(
                pd.DataFrame(
                    {
                        "row": kept,
                        "hadm_id": hadm[kept].astype("int64"),
                        "itemid": item[kept].astype("int64"),
                        "charttime": charttime[kept],
                        "available": available[kept],
                        "value": value[kept],
                        "unit": f.valueuom[kept].astype("category"),
                    }
                )
            )
        if parts:
            self._kept[table] = pd.concat(parts, ignore_index=True).assign(kind=kind)

    def _skip_after_discharge(self, rows: _Triage, hadm: pd.Series, available: pd.Series) -> None:
        # By availability: a result reported after discharge was never visible during the stay.
        rows.skip(available > hadm.map(self._disch), "after_discharge")

    def _read_notes(self, table: str) -> None:
        parts = []
        columns = ["note_id", "subject_id", "hadm_id", "charttime", "storetime", "text"]
        for rows in self._rows(table, columns):
            f = rows.frame
            subject, hadm = _ids(f.subject_id), _ids(f.hadm_id)
            rows.missing(f.note_id, "note_id")
            rows.missing(subject, "subject_id")
            rows.missing(f.text, "text")
            self._bind(rows, subject, hadm)
            charttime, storetime = _chart_and_store_times(rows, f)
            available = _available(charttime, storetime)
            rows.dead(
                f.text.str.len() > self.max_note_chars,
                "note_too_long",
                f"over {self.max_note_chars} chars",
            )
            if table == "note/radiology":
                self._skip_after_discharge(rows, hadm, available)
                target = hadm
            else:
                # The summary travels to the patient's next admission, if stored by then.
                target = hadm.map(self._next)
                rows.skip(target.isna(), "no_later_admission")
                rows.skip(available > target.map(self._admit), "written_after_next_admission")
            _count_fallbacks(rows, charttime, storetime)
            kept = rows.kept
            parts.append(
                pd.DataFrame(
                    {
                        "row": kept,
                        "hadm_id": target[kept].astype("int64"),
                        "from_hadm_id": hadm[kept].astype("int64"),
                        "note_id": f.note_id[kept],
                        "charttime": charttime[kept],
                        "available": available[kept],
                        "text": f.text[kept],
                    }
                )
            )
        if parts:
            self._kept[table] = pd.concat(parts, ignore_index=True)

    # -- chest X-rays

    def _cxr_dirs(self) -> tuple[str, Path] | None:
        if self.cxr in ("auto", "jpg"):
            for name in CXR_JPG_DIRS:
                if find_table(self.root / name, CXR_METADATA):
                    return "jpg", (self.root / name).resolve()
        if self.cxr in ("auto", "dicom"):
            for name in CXR_DICOM_DIRS:
                if any((self.root / name / "files").glob("p*/p*/s*/*.dcm")):
                    return "dicom", (self.root / name).resolve()
        return None

    def _read_cxr(self) -> None:
        found = self._cxr_dirs()
        if found is None:
            return
        mode, base = found
        self._cxr_source = (
            DICOM_TABLE if mode == "dicom" else _relative(base / CXR_METADATA, self.root)
        )
        studies = self._cxr_jpg(base) if mode == "jpg" else self._cxr_dicom(base)
        parts = [part for part in studies if len(part)]
        if parts:
            self._kept["cxr"] = pd.concat(parts, ignore_index=True)

    def _cxr_jpg(self, base: Path) -> Iterator[pd.DataFrame]:
        table = self._cxr_source
        columns = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"]
        path = find_table(base, CXR_METADATA)
        for rows in self._rows(table, columns, path):
            f = rows.frame
            rows.missing(f.dicom_id, "dicom_id")
            subject, study, studytime, hadm = self._place_studies(rows)
            kept = rows.kept
            paths = [
                cxr_image_path(base, int(subject[i]), int(study[i]), f.dicom_id[i], "jpg")
                for i in kept
            ]
            exists = pd.Series([p.is_file() for p in paths], index=kept, dtype=bool)
            rows.dead(~exists, "image_missing")
            kept = rows.kept
            yield _studies(
                f, kept, hadm, study, studytime, [p.as_uri() for p, ok in zip(paths, exists) if ok]
            )

    def _cxr_dicom(self, base: Path) -> Iterator[pd.DataFrame]:
        from ingest.dicom import InvalidDicom, read_header

        table = DICOM_TABLE
        files = sorted((base / "files").glob("p*/p*/s*/*.dcm"))
        records = []
        stats = self.stats.table(table)
        for index, path in enumerate(files):
            try:
                header = read_header(path)
            except InvalidDicom as exc:
                stats.read += 1
                stats.dead["invalid_dicom"] += 1
                self._sink(DeadLetter("invalid_dicom", table, f"row {index + 1}", exc.reason))
                continue
            records.append(
                {
                    "index": index,
                    "dicom_id": path.stem,
                    "subject_id": path.parent.parent.name[1:],
                    "study_id": path.parent.name[1:],
                    "ViewPosition": header.view_position,
                    "StudyDate": header.study_date,
                    "StudyTime": header.study_time,
                    "uri": path.as_uri(),
                }
            )
        frame = pd.DataFrame.from_records(records, index="index") if records else pd.DataFrame()
        if frame.empty:
            return
        frame.index.name = None
        rows = _Triage(table, frame, stats, self._sink)
        _, study, studytime, hadm = self._place_studies(rows)
        kept = rows.kept
        yield _studies(frame, kept, hadm, study, studytime, frame.uri[kept])

    def _place_studies(self, rows: _Triage):
        """(subject, study, study time, hadm_id) of each CXR row (metadata table or DICOM
        headers alike), dead-lettering or skipping the rows that cannot be placed."""
        f = rows.frame
        subject, study = _ids(f.subject_id), _ids(f.study_id)
        rows.missing(subject, "subject_id")
        rows.missing(study, "study_id")
        studytime = _study_time(f.StudyDate, f.StudyTime)
        rows.dead(studytime.isna(), "unparseable_time", "StudyDate/StudyTime")
        hadm = self._admission_at(subject, studytime, rows.kept)
        rows.skip(hadm.isna(), "outside_admission")
        return subject, study, studytime, hadm

    def _admission_at(self, subject: pd.Series, when: pd.Series, index: pd.Index) -> pd.Series:
        """The hadm_id whose [admittime, dischtime] holds ``when`` for that patient, or NaN."""
        found = pd.Series(np.nan, index=subject.index)
        for i in index:
            stays = self._by_subject.get(int(subject[i]), [])
            t = when[i].to_pydatetime()
            k = bisect_right([a.admittime for a in stays], t) - 1
            if k >= 0 and t <= stays[k].dischtime:
                found[i] = stays[k].hadm_id
        return found

    # -- building events

    def _build(self, table: str, row, adm: _Admission):
        source = table if table != "cxr" else self._cxr_source
        stats = self.stats.table(source)
        envelope = dict(
            event_id=event_id(source, row.row),
            hadm_id=adm.hadm_id,
            subject_id=adm.subject_id,
            source=source,
        )
        try:
            event = _EVENT_BUILDERS[table](row, adm, envelope)
        except ValidationError as exc:
            stats.dead["schema_violation"] += 1
            self._sink(DeadLetter("schema_violation", source, f"row {row.row + 1}", _where(exc)))
            return None
        stats.used += 1
        return event


def _observation(row, adm: _Admission, envelope: dict) -> ObservationEvent:
    charttime = row.charttime.to_pydatetime()
    return ObservationEvent(
        **envelope,
        event_time=max(row.available.to_pydatetime(), adm.admittime),
        payload=dict(
            itemid=row.itemid,
            value=row.value,
            unit=_text(row.unit),
            charttime=charttime,
            kind=row.kind,
        ),
    )


def _transfer(row, adm: _Admission, envelope: dict) -> TransferEvent:
    intime = row.intime.to_pydatetime()
    return TransferEvent(
        **envelope,
        event_time=max(intime, adm.admittime),  # an ED stay before admission opens with it
        payload=dict(careunit=row.careunit, intime=intime),
    )


def _note(note_type: str):
    def build(row, adm: _Admission, envelope: dict) -> NoteEvent:
        charttime = row.charttime.to_pydatetime()
        return NoteEvent(
            **envelope,
            event_time=max(row.available.to_pydatetime(), adm.admittime),
            payload=dict(
                note_type=note_type,
                text=row.text,
                charttime=charttime,
                note_id=row.note_id,
                from_hadm_id=row.from_hadm_id,
            ),
        )

    return build


def _cxr(row, adm: _Admission, envelope: dict) -> CxrEvent:
    studytime = row.studytime.to_pydatetime()
    return CxrEvent(
        **envelope,
        event_time=studytime,
        payload=dict(
            study_id=row.study_id,
            dicom_id=row.dicom_id,
            view_position=_text(row.view),
            uri=row.uri,
            studytime=studytime,
        ),
    )


_EVENT_BUILDERS = {
    "hosp/labevents": _observation,
    "icu/chartevents": _observation,
    "note/radiology": _note("radiology"),
    "note/discharge": _note("discharge"),
    "cxr": _cxr,
    "hosp/transfers": _transfer,
}


def _studies(frame: pd.DataFrame, kept, hadm, study, studytime, uris) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": kept,
            "hadm_id": hadm[kept].astype("int64"),
            "study_id": study[kept].astype("int64"),
            "dicom_id": frame.dicom_id[kept],
            "view": frame.ViewPosition[kept],
            "studytime": studytime[kept],
            "uri": uris,
        }
    )


def _chart_and_store_times(rows: _Triage, frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Parsed charttime (required) and storetime (may be empty: NaT)."""
    charttime, storetime = _times(frame.charttime), _times(frame.storetime)
    rows.dead(charttime.isna(), "unparseable_time", "charttime")
    rows.dead(frame.storetime.notna() & storetime.isna(), "unparseable_time", "storetime")
    return charttime, storetime


def _available(charttime: pd.Series, storetime: pd.Series) -> pd.Series:
    """When a row became known: its storetime, or its charttime where the storetime is empty
    or earlier (nothing is known before it is charted)."""
    return storetime.where(storetime >= charttime, charttime)


def _count_fallbacks(rows: _Triage, charttime: pd.Series, storetime: pd.Series) -> None:
    """Count the kept rows timed by their charttime instead of their storetime."""
    kept = rows.kept
    charttime, storetime = charttime[kept], storetime[kept]
    for reason, hits in (
        ("storetime_missing", storetime.isna()),
        ("storetime_before_charttime", storetime < charttime),
    ):
        if hits.any():
            rows.stats.fallbacks[reason] += int(hits.sum())


def _study_time(dates: pd.Series, times: pd.Series) -> pd.Series:
    """MIMIC-CXR's StudyDate (YYYYMMDD) and StudyTime (HHMMSS.fff, leading zeros often lost)."""
    day = pd.to_datetime(
        dates.astype(str).str.replace(r"\.0$", "", regex=True), format="%Y%m%d", errors="coerce"
    )
    hhmmss = _numbers(times)
    seconds = (hhmmss // 10000) * 3600 + (hhmmss // 100 % 100) * 60 + hhmmss % 100
    bad = (
        (hhmmss < 0) | (hhmmss // 10000 >= 24) | (hhmmss // 100 % 100 >= 60) | (hhmmss % 100 >= 60)
    )
    return (day + pd.to_timedelta(seconds, unit="s")).where(~bad)


def _text(value) -> str | None:
    return (
        None
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA
        else str(value)
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _where(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['type']}"
