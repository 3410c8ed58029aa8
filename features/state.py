"""Per-admission feature state and its one update rule, ``AdmissionState.apply``.

Both paths fold events with ``apply`` and nothing else:

* the online store loads an admission's state from Redis, folds new events in and
  commits it back (``features.online``);
* the offline builder folds an admission's history up to each cutoff
  (``features.offline``).

Both then serialise the state with ``to_blob`` (laid out as ``features.layout`` says)
and turn a batch of blobs into model inputs with ``features.transform.assemble``.

Every update is constant work and order-independent: counts, sums, minima and maxima
commute, and "latest" is the maximum of (charttime, tie-breaker), not the last event
applied. So a late event lands by its event time, and replaying events in any order gives
the same state (sums may differ in the last bits with the order). An event is folded once
it is available (its ``event_time``: the storetime, see ``ingest.mimic``), so "latest" is
the latest drawn among the values known: a result reported late never displaces a newer
draw that was reported first, and no value is visible before its event time.

The admission's life commutes too, kept as event times: the admission event with
the latest ``event_time`` gives the demographics (an HL7 A08 resends it); a ``cancel``
undoes the admission or discharge dated at or before it, so an admission is discharged
while its latest discharge is later than its latest cancelled discharge, and cancelled
while its latest cancel is at or after its latest admission event (a later admission event
re-admits it). The ward is the careunit of the latest transfer by ``intime``; a cancelled
transfer (A12) removes the latest one dated at or before the cancel, so the patient is
back where the transfer moved them from (``Transfers``).

Corrections: every measurement of a feature item is also kept in a compact log
(``LOG_RECORD``). Min, max and sums cannot be subtracted, so once an admission has seen a
result id or a correction (``H_KEYED``) its measurement aggregates are refolded from the
log's *effective* measurements (``effective``) whenever they are read: per result id the
latest (by event time, then status) counts; a correction without a result id of its own
replaces the earlier measurements of its item at its charttime. The refold is a function
of the set of measurements, so it too is order-independent.

Windowed aggregates: measurements fall into time buckets of ``fd.BUCKET_HOURS`` (bucket
``floor(charttime / BUCKET_HOURS)``). Per item the state keeps the newest bucket ``J``
any measurement fell into and, for ``r < N_BUCKETS``, the count, sum, min and max of the
measurements in buckets ``J - r .. J`` (prefixes, newest first). A measurement in bucket
``k`` first moves ``J`` up to ``k`` if it is newer (shifting the prefixes by ``k - J``,
the oldest falling off), then joins every prefix that reaches back to ``k``: at most
N_BUCKETS steps, and the result is a function of the set of measurements, not of their
order. A measurement N_BUCKETS or more buckets older than ``J`` joins none: it lies
outside every window ending at or after ``J``. ``features.transform`` reads each window
as one of these prefixes.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import math
import struct
from array import array
from collections import defaultdict
from datetime import UTC, datetime

from features import definitions as fd
from features import model_inputs as mi
from features.layout import (
    EMPTY_AGGREGATES,
    EMPTY_PREFIX,
    H_ADMIT,
    H_ADMIT_EVENT,
    H_ADMTYPE,
    H_AGE,
    H_CANCEL_ADMIT,
    H_CANCEL_DISCHARGE,
    H_DISCHARGED,
    H_KEYED,
    H_LAST_EVENT,
    H_MALE,
    HEADER,
    INF,
    ITEM_PREFIXES,
    N_ITEMS,
    NAN,
    NEWEST,
    P_COUNT,
    P_MAX,
    P_MIN,
    P_SUM,
    PREFIX,
    PREFIXES,
    S_COUNT,
    S_LAST_TIME,
    S_LAST_VALUE,
    S_MAX,
    S_MIN,
    S_SUM,
    STATS,
)
from features.vocab import Vocabulary

# One measurement in the log: item index, status rank, padding, charttime, value, event time
# (epoch hours) and the first 8 bytes of a blake2b of its result id (zeros: none).
LOG_RECORD = struct.Struct("<HB5xddd8s")
NO_KEY = bytes(8)
STATUS_RANK = {"preliminary": 0, "final": 1, "corrected": 2}
CORRECTED = STATUS_RANK["corrected"]
# An admission's status, for the ranking: open, discharged, or its admission cancelled.
OPEN, DISCHARGED, CANCELLED = "open", "discharged", "cancelled"


def hours(t: datetime) -> float:
    """Epoch hours; MIMIC's naive local times are read as UTC, as ingest.events does."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp() / 3600.0


class Notes:
    """The text and image side of an admission: what the note token streams and the CXR
    reference are built from. Separate from the aggregates because it changes rarely and
    costs more to (de)serialise: the online store decodes it only for a note or image."""

    __slots__ = ("rad_notes", "dis_key", "dis_ids", "cxr_key", "cxr_uri", "note_tokens")

    def __init__(self, note_tokens: int):
        # Radiology notes sorted by (charttime, note_id), each its last note_tokens ids,
        # pruned to those whose text can still reach the kept tail.
        self.rad_notes: list[tuple[float, str, list[int]]] = []
        self.dis_key: tuple[float, str] = (-INF, "")
        self.dis_ids: list[int] = []
        self.cxr_key: tuple[float, str] = (-INF, "")
        self.cxr_uri = ""
        self.note_tokens = note_tokens

    def add_radiology(self, t: float, note_id: str, ids: list[int]) -> None:
        if not ids:  # an empty text adds nothing to the tail, and would never be pruned
            return
        notes = self.rad_notes
        entry = (t, note_id, ids[-self.note_tokens :])
        position = bisect.bisect_left(notes, entry[:2], key=lambda n: n[:2])
        if position < len(notes) and notes[position][:2] == entry[:2]:
            return  # the same note under another event id
        notes.insert(position, entry)
        # Drop the oldest notes once the later ones alone fill the tail: nothing earlier,
        # however late it arrives, can reach the kept text any more.
        while len(notes) > 1 and sum(len(n[2]) for n in notes[1:]) >= self.note_tokens:
            notes.pop(0)

    def set_discharge(self, t: float, note_id: str, ids: list[int]) -> None:
        if (t, note_id) > self.dis_key:
            self.dis_key, self.dis_ids = (t, note_id), ids[-self.note_tokens :]

    def set_cxr(self, t: float, dicom_id: str, uri: str) -> None:
        if (t, dicom_id) > self.cxr_key:
            self.cxr_key, self.cxr_uri = (t, dicom_id), uri

    def radiology_tail(self) -> list[int]:
        ids = [i for note in self.rad_notes for i in note[2]]
        return ids[-self.note_tokens :]

    def blob_tail(self) -> bytes:
        """The blob after its numeric part: both token sequences, then the URI."""
        n = self.note_tokens
        return (
            _ids_bytes(self.radiology_tail(), n)
            + _ids_bytes(self.dis_ids, n)
            + self.cxr_uri.encode()
        )

    def encode(self) -> bytes:
        data = {
            "rad": self.rad_notes,
            "dis": self.dis_key,
            "dis_ids": self.dis_ids,
            "cxr": self.cxr_key,
            "uri": self.cxr_uri,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, note_tokens: int) -> Notes:
        data, notes = json.loads(raw), cls(note_tokens)
        notes.rad_notes = [(t, note_id, ids) for t, note_id, ids in data["rad"]]
        notes.dis_key, notes.dis_ids = tuple(data["dis"]), data["dis_ids"]
        notes.cxr_key, notes.cxr_uri = tuple(data["cxr"]), data["uri"]
        return notes


class _Latest:
    """A transfer ordered latest first, for ``heapq``'s min-heap."""

    __slots__ = ("move",)

    def __init__(self, move: tuple[float, str]):
        self.move = move

    def __lt__(self, other: _Latest) -> bool:
        return self.move > other.move


class Transfers:
    """Where the admission is: its transfers (``intime``, ``careunit``, each with the earliest
    event time it was sent at) and the event times of its cancelled transfers. The ward is a
    function of these sets, whatever order they arrived in."""

    __slots__ = ("moves", "cancels")

    def __init__(self):
        self.moves: dict[tuple[float, str], float] = {}
        self.cancels: set[float] = set()

    def add(self, intime: float, careunit: str, event_time: float) -> None:
        key = (intime, careunit)
        self.moves[key] = min(self.moves.get(key, INF), event_time)

    def cancel(self, event_time: float) -> None:
        self.cancels.add(event_time)

    def ward(self) -> str:
        """The careunit of the latest transfer by intime that no cancel took back; each cancel
        takes back the latest transfer (by intime) sent at or before it and not yet taken.
        Cancels in time order, each popping the latest of the transfers sent by then: a heap,
        so a stay with many transfers and cancels costs (M + C) log M, not M x C."""
        by_sent = sorted(self.moves, key=self.moves.__getitem__)
        sent: list[_Latest] = []  # transfers sent by the current cancel, not taken back
        taken, i = set(), 0
        for cancelled in sorted(self.cancels):
            while i < len(by_sent) and self.moves[by_sent[i]] <= cancelled:
                heapq.heappush(sent, _Latest(by_sent[i]))
                i += 1
            if sent:
                taken.add(heapq.heappop(sent).move)
        live = [move for move in self.moves if move not in taken]
        return max(live)[1] if live else ""

    def encode(self) -> bytes:
        if not self.moves and not self.cancels:
            return b""
        moves = sorted([t, unit, sent] for (t, unit), sent in self.moves.items())
        data = {"m": moves, "c": sorted(self.cancels)}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Transfers:
        transfers = cls()
        if raw:
            data = json.loads(raw)
            transfers.moves = {(t, unit): sent for t, unit, sent in data["m"]}
            transfers.cancels = set(data["c"])
        return transfers


def log_record(index: int, payload, event_time: float) -> bytes:
    """The log's record of one measurement of feature item ``index``."""
    key = NO_KEY
    if payload.result_id is not None:
        key = hashlib.blake2b(payload.result_id.encode(), digest_size=8).digest()
    rank = STATUS_RANK[payload.status]
    return LOG_RECORD.pack(index, rank, hours(payload.charttime), payload.value, event_time, key)


def effective(log: bytes) -> list[tuple[int, float, float]]:
    """The measurements that count, as (item index, charttime, value), in a fixed order.

    Per result id only the latest (by event time, then status: preliminary < final <
    corrected, then value) counts. A correction whose result id no other measurement carries,
    or that has none, replaces the measurements of its item at its charttime that came
    before it (in that order)."""
    records = list(LOG_RECORD.iter_unpack(log))

    def order(r):  # event time, status rank, value, charttime, item
        return (r[4], r[1], r[3], r[2], r[0])

    by_key = defaultdict(list)
    for r in records:
        if r[5] != NO_KEY:
            by_key[r[5]].append(r)
    kept = [r for r in records if r[5] == NO_KEY]
    kept += [max(group, key=order) for group in by_key.values()]
    corrections = [
        r for r in kept if r[1] == CORRECTED and (r[5] == NO_KEY or len(by_key[r[5]]) == 1)
    ]
    if corrections:
        latest: dict[tuple[int, float], tuple] = {}
        for c in corrections:
            where = (c[0], c[2])
            if where not in latest or order(c) > order(latest[where]):
                latest[where] = c
        kept = [r for r in kept if order(r) >= order(latest.get((r[0], r[2]), r))]
    return sorted((r[0], r[2], r[3]) for r in kept)


class AdmissionState:
    """Running aggregates of one admission, updated in place by ``apply``."""

    __slots__ = (
        "agg",
        "note_tokens",
        "_notes",
        "_notes_raw",
        "_tail",
        "notes_changed",
        "transfers",
        "log",
        "new_records",
        "_refold",
    )

    def __init__(self, note_tokens: int = mi.NOTE_TOKENS):
        self.agg = list(EMPTY_AGGREGATES)
        self.note_tokens = note_tokens
        self._notes: Notes | None = Notes(note_tokens)
        self._notes_raw: bytes | None = None  # as stored, until a note or image needs it decoded
        self._tail: bytes | None = None  # the blob tail, cached while the notes are unchanged
        self.notes_changed = False
        self.transfers = Transfers()
        # The measurement log (None: stored, not loaded) and the records this state added.
        self.log: bytearray | None = bytearray()
        self.new_records = bytearray()
        self._refold = False  # the measurement aggregates wait for a refold from the log

    @property
    def notes(self) -> Notes:
        if self._notes is None:
            self._notes = Notes.decode(self._notes_raw, self.note_tokens)
        return self._notes

    # --- the update -------------------------------------------------------------------

    def apply(self, event, vocab: Vocabulary) -> None:
        """Fold one event in. Constant work; the result does not depend on event order."""
        a = self.agg
        a[H_LAST_EVENT] = max(a[H_LAST_EVENT], hours(event.event_time))
        p = event.payload
        kind = event.type
        if kind == "observation":
            index = fd.ITEM_INDEX.get(p.itemid)
            if index is not None:
                self._measure(index, p, hours(event.event_time))
        elif kind == "admission":
            # The admission event sent last (A08 resends it) gives the demographics.
            sent = (hours(event.event_time), hours(p.admittime), p.age, float(p.gender == "M"))
            admission_type = _admission_type_index(p.admission_type)
            held = (a[H_ADMIT_EVENT], a[H_ADMIT], a[H_AGE], a[H_MALE], a[H_ADMTYPE])
            if a[H_ADMIT_EVENT] == -INF or (*sent, admission_type) > held:
                a[H_ADMIT_EVENT], a[H_ADMIT], a[H_AGE], a[H_MALE] = sent
                a[H_ADMTYPE] = admission_type
        elif kind == "discharge":
            # The outcome is a label, never an input: only when it was discharged is kept.
            a[H_DISCHARGED] = max(a[H_DISCHARGED], hours(event.event_time))
        elif kind == "transfer":
            self.transfers.add(hours(p.intime), p.careunit, hours(event.event_time))
        elif kind == "cancel":
            t = hours(event.event_time)
            if p.cancels == "admission":
                a[H_CANCEL_ADMIT] = max(a[H_CANCEL_ADMIT], t)
            elif p.cancels == "discharge":
                a[H_CANCEL_DISCHARGE] = max(a[H_CANCEL_DISCHARGE], t)
            else:
                self.transfers.cancel(t)
        elif kind in ("note", "cxr"):
            notes = self.notes
            if kind == "cxr":
                notes.set_cxr(hours(p.studytime), p.dicom_id, p.uri)
            elif p.note_type == "radiology":
                notes.add_radiology(hours(p.charttime), p.note_id, vocab.encode(p.text))
            else:  # the previous admission's discharge summary
                notes.set_discharge(hours(p.charttime), p.note_id, vocab.encode(p.text))
            self._tail, self.notes_changed = None, True

    def refusal(self, event, max_stay_h: float) -> str | None:
        """Why this admission cannot take ``event``, or None: dated before the admission, or
        more than ``max_stay_h`` after it. Before its admission event nothing is refused."""
        admit = self.agg[H_ADMIT]
        if admit != admit:  # not admitted yet (NaN)
            return None
        t = hours(event.event_time)
        if t < admit:
            return "before_admission"
        if t > admit + max_stay_h:
            return "after_max_stay"
        return None

    def _measure(self, index: int, payload, event_time: float) -> None:
        record = log_record(index, payload, event_time)
        self.new_records += record
        if self.log is not None:
            self.log += record
        a = self.agg
        if payload.result_id is not None or payload.status != "final":
            a[H_KEYED] = 1.0
        if a[H_KEYED]:
            if self.log is None:
                raise RuntimeError("a keyed admission's measurement needs its log loaded")
            self._refold = True
        else:
            t = hours(payload.charttime)
            self._observe(HEADER + index * STATS, t, payload.value)
            self._window(index, t, payload.value)

    @property
    def keyed(self) -> bool:
        return bool(self.agg[H_KEYED])

    def settle(self) -> None:
        """Refold the measurement aggregates from the log's effective measurements, if a
        measurement of a keyed admission came since the last refold."""
        if not self._refold:
            return
        self.agg[HEADER:] = EMPTY_AGGREGATES[HEADER:]
        for index, t, value in effective(self.log):
            self._observe(HEADER + index * STATS, t, value)
            self._window(index, t, value)
        self._refold = False

    def _observe(self, base: int, t: float, value: float) -> None:
        a = self.agg
        a[base + S_COUNT] += 1.0
        a[base + S_SUM] += value
        a[base + S_MIN] = min(a[base + S_MIN], value)
        a[base + S_MAX] = max(a[base + S_MAX], value)
        # Latest by charttime; equal charttimes keep the larger value so order never matters.
        last_t, last_v = a[base + S_LAST_TIME], a[base + S_LAST_VALUE]
        if t > last_t or (t == last_t and not value <= last_v):
            a[base + S_LAST_TIME], a[base + S_LAST_VALUE] = t, value

    def _window(self, index: int, t: float, value: float) -> None:
        a, n = self.agg, fd.N_BUCKETS
        k = float(math.floor(t / fd.BUCKET_HOURS))
        newest = a[NEWEST + index]
        first = PREFIXES + index * ITEM_PREFIXES
        if not newest >= k:  # never measured (NaN) or a newer bucket: prefix r becomes r + shift
            shift = n if newest != newest else min(int(k - newest), n)
            a[first + shift * PREFIX : first + n * PREFIX] = a[first : first + (n - shift) * PREFIX]
            a[first : first + shift * PREFIX] = EMPTY_PREFIX * shift
            a[NEWEST + index] = newest = k
        # Join every prefix reaching back to bucket k (none if it is N_BUCKETS or more old).
        for p in range(first + int(newest - k) * PREFIX, first + n * PREFIX, PREFIX):
            a[p + P_COUNT] += 1.0
            a[p + P_SUM] += value
            if value < a[p + P_MIN]:
                a[p + P_MIN] = value
            if value > a[p + P_MAX]:
                a[p + P_MAX] = value

    # --- what the state means -----------------------------------------------------------

    def static_features(self) -> list[float]:
        """``NUMERIC_FEATURES[:N_STATIC]``, NaN where missing (count is never missing)."""
        self.settle()
        a = self.agg
        if a[H_ADMIT] == a[H_ADMIT]:  # admitted (not NaN)
            onehot = [0.0] * (len(fd.ADMISSION_TYPES) + 1)
            onehot[int(a[H_ADMTYPE])] = 1.0
            out = [a[H_AGE], a[H_MALE], *onehot]
        else:
            out = [NAN] * fd.N_DEMOGRAPHIC
        for base in range(HEADER, HEADER + N_ITEMS * STATS, STATS):
            count = a[base + S_COUNT]
            if count:
                out += (
                    a[base + S_LAST_VALUE],
                    a[base + S_SUM] / count,
                    a[base + S_MIN],
                    a[base + S_MAX],
                    count,
                )
            else:
                out += (NAN, NAN, NAN, NAN, 0.0)
        return out

    def anchors(self) -> list[float]:
        self.settle()
        a = self.agg
        last_times = [
            a[base + S_LAST_TIME] if a[base + S_COUNT] else NAN
            for base in range(HEADER, HEADER + N_ITEMS * STATS, STATS)
        ]
        return [a[H_ADMIT], a[H_LAST_EVENT], *last_times]

    @property
    def discharged(self) -> bool:
        """Discharged, and that discharge not cancelled (a later discharge counts again)."""
        return self.agg[H_DISCHARGED] > self.agg[H_CANCEL_DISCHARGE]

    @property
    def cancelled(self) -> bool:
        """The admission was cancelled (A11) and not admitted again since."""
        a = self.agg
        return a[H_CANCEL_ADMIT] > -INF and a[H_CANCEL_ADMIT] >= a[H_ADMIT_EVENT]

    @property
    def status(self) -> str:
        return CANCELLED if self.cancelled else DISCHARGED if self.discharged else OPEN

    @property
    def ward(self) -> str:
        return self.transfers.ward()

    # --- serialisation ------------------------------------------------------------------

    def to_blob(self) -> bytes:
        """All ``assemble`` needs, nothing more (native byte order = the little-endian
        ``features.layout.blob_dtype`` on x86 and ARM)."""
        numeric = (
            array("f", self.static_features()).tobytes() + array("d", self.anchors()).tobytes()
        )
        self.settle()
        return numeric + array("f", self.agg[PREFIXES:]).tobytes() + self.blob_tail()

    def blob_tail(self) -> bytes:
        if self._tail is None:
            self._tail = self.notes.blob_tail()
        return self._tail

    def to_aggregates(self) -> bytes:
        self.settle()
        return array("d", self.agg).tobytes()

    def to_notes(self) -> bytes:
        if self._notes_raw is not None and not self.notes_changed:
            return self._notes_raw
        return self.notes.encode()

    @classmethod
    def from_stored(
        cls,
        aggregates: bytes | None,
        notes: bytes | None,
        tail: bytes | None,
        note_tokens: int = mi.NOTE_TOKENS,
        transfers: bytes | None = None,
        log: bytes | None = None,
    ) -> AdmissionState:
        """The state as the online store keeps it (all None: a new admission). ``tail``:
        the stored blob tail (``blob_tail``), which spares decoding the notes to write;
        ``log``: the measurement log, None where it was not loaded (then a keyed
        admission's measurement cannot be applied)."""
        state = cls(note_tokens)
        state.transfers = Transfers.decode(transfers)
        state.log = None if log is None else bytearray(log)
        if aggregates:
            agg = array("d")
            agg.frombytes(aggregates)
            state.agg = agg.tolist()
        if notes:
            state._notes, state._notes_raw = None, notes
        if tail is not None:
            state._tail = tail
        return state


def _admission_type_index(admission_type: str) -> float:
    try:
        return float(fd.ADMISSION_TYPES.index(admission_type))
    except ValueError:
        return float(len(fd.ADMISSION_TYPES))  # "other"


def _ids_bytes(ids: list[int], n: int) -> bytes:
    return array("H", ids + [fd.PAD] * (n - len(ids))).tobytes()
