"""Per-admission feature state: the one pure update function and the one transform.

Both paths use this module and nothing else to compute features:

* the online store loads an admission's state from Redis, folds new events in with
  ``AdmissionState.apply`` and commits it back (``features.online``);
* the offline builder folds an admission's history with the same ``apply`` up to each
  cutoff (``features.offline``).

Both then serialise the state with ``to_blob`` and turn a batch of blobs into model inputs
with ``assemble``, so offline rows go through byte-for-byte the same decoding and
arithmetic as online reads.

Every update is constant work and order-independent: counts, sums, minima and maxima
commute, and "latest" is the maximum of (charttime, tie-breaker), not the last event
applied. So a late event lands by its event time, and replaying events in any order gives
the same state (sums may differ in the last bits with the order).

Windowed aggregates: measurements fall into time buckets of ``fd.BUCKET_HOURS`` (bucket
``floor(charttime / BUCKET_HOURS)``). Per item the state keeps the newest bucket ``J``
any measurement fell into and, for ``r < N_BUCKETS``, the count, sum, min and max of the
measurements in buckets ``J - r .. J`` (prefixes, newest first). A measurement in bucket
``k`` first moves ``J`` up to ``k`` if it is newer (shifting the prefixes by ``k - J``,
the oldest falling off), then joins every prefix that reaches back to ``k``: at most
N_BUCKETS steps, and the result is a function of the set of measurements, not of their
order. A measurement N_BUCKETS or more buckets older than ``J`` joins none: it lies
outside every window ending at or after ``J``. So a read is exact whenever the scoring
time is at or after every measurement in the state: always offline (a snapshot folds only
the events up to its cutoff, and a measurement's charttime is never after its event time)
and online at the default scoring time (the latest event). A window of ``n`` buckets
ending with the scoring time's bucket ``q`` is then one prefix, ``r = n - 1 - (q - J)``
(empty when negative), so a read picks one entry per item and window: a gather,
vectorised over the batch, whatever the number of windows. (Were the scoring time's
bucket before ``J``, online with an explicit earlier ``as_of``, the window read is the one
ending with ``J``.)

Three serialisations:

* the *blob* (what ``assemble`` reads, as of any time): the features fixed at write time
  (``NUMERIC_FEATURES[:N_STATIC]``, float32, NaN = missing), the time anchors the
  scoring-time features are measured from (float64 epoch hours), the windows' prefixes
  (float32 count, sum, min, max; ``J`` is not stored, it is the bucket of the item's
  latest measurement, an anchor), then the *tail*: the two token sequences (uint16) and
  the latest chest X-ray's URI (utf-8, variable length);
* the *serving blob* (what a scoring read fetches): ``assemble``'s output as of the latest
  applied event, computed when the state is written: that time (float64), the normalised
  numeric features as the model takes them (float32, 0 where missing), which of them were
  observed (bits), the two token sequences and the URI in a fixed-width field: a
  fixed-size record, so a batch of them decodes with one numpy call. A URI longer than
  the field (``URI_INLINE`` bytes) follows the record instead. Decoding it is the whole
  read; scoring as of another time goes through the blob;
* the *aggregates* and *notes* (write side): running counts/sums/extrema and the note
  bookkeeping needed to apply later events. The blob is a function of the aggregates and
  the tail, so the online store keeps those and the serving blob only.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from array import array
from datetime import datetime, timezone

import numpy as np

from features import definitions as fd
from features import model_inputs as mi
from features.vocab import Vocabulary

# Header slots of the aggregates.
H_ADMIT, H_AGE, H_MALE, H_ADMTYPE, H_LAST_EVENT, H_DISCHARGED = range(6)
HEADER = 6
# Per-item aggregate slots.
S_COUNT, S_SUM, S_MIN, S_MAX, S_LAST_TIME, S_LAST_VALUE = range(6)
STATS = 6
N_ITEMS = len(fd.MEASURED)
# The windows follow the per-item slots: each item's newest bucket, then per item
# N_BUCKETS prefixes of these fields (contiguous, so a read gathers whole prefixes).
NEWEST = HEADER + N_ITEMS * STATS
PREFIXES = NEWEST + N_ITEMS
P_COUNT, P_SUM, P_MIN, P_MAX = range(4)  # a read turns the sum into the mean: fd.WINDOW_STATS
assert fd.WINDOW_STATS == ("count", "mean", "min", "max")
PREFIX = 4
ITEM_PREFIXES = fd.N_BUCKETS * PREFIX
NAN, INF = float("nan"), float("inf")
_EMPTY_PREFIX = [0.0, 0.0, INF, -INF]

_EMPTY_AGGREGATES = (
    [NAN, NAN, NAN, NAN, -INF, 0.0]
    + [0.0, 0.0, INF, -INF, -INF, NAN] * N_ITEMS
    + [NAN] * N_ITEMS
    + _EMPTY_PREFIX * (fd.N_BUCKETS * N_ITEMS)
)
# Anchors: admit time, latest event time (the default scoring time), then per item the
# time of its latest measurement.
A_ADMIT, A_LAST_EVENT, A_ITEMS = 0, 1, 2
N_ANCHORS = 2 + N_ITEMS
# The blob's numeric part; the note tail follows.
NUMERIC_BYTES = fd.N_STATIC * 4 + N_ANCHORS * 8 + N_ITEMS * ITEM_PREFIXES * 4
N_WINDOWED = len(fd.WINDOW_HOURS) * N_ITEMS * len(fd.WINDOW_STATS)
assert fd.N_NUMERIC - fd.N_STATIC == 1 + N_ITEMS * len(fd.ITEM_TIMES) + N_WINDOWED


def hours(t: datetime) -> float:
    """Epoch hours; MIMIC's naive local times are read as UTC, as ingest.events does."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp() / 3600.0


def _tail_fields(note_tokens: int) -> list:
    """The fixed-size start of the tail both blobs end with: the two token sequences."""
    return [("radiology", "<u2", (note_tokens,)), ("discharge", "<u2", (note_tokens,))]


@functools.lru_cache(maxsize=4)
def blob_dtype(note_tokens: int = mi.NOTE_TOKENS) -> np.dtype:
    """The fixed-size prefix of a blob; the URI follows it."""
    return np.dtype(
        [
            ("static", "<f4", (fd.N_STATIC,)),
            ("anchors", "<f8", (N_ANCHORS,)),
            ("prefixes", "<f4", (N_ITEMS, fd.N_BUCKETS, PREFIX)),
            *_tail_fields(note_tokens),
        ]
    )


assert blob_dtype().fields["radiology"][1] == NUMERIC_BYTES
# The serving blob's part before the tail.
SERVING_HEAD = np.dtype(
    [
        ("as_of", "<f8"),
        ("numeric", "<f4", (fd.N_NUMERIC,)),
        ("observed", "u1", ((fd.N_NUMERIC + 7) // 8,)),  # numpy.packbits of the numeric mask
    ]
)
SERVING_BYTES = SERVING_HEAD.itemsize
# Bytes of the URI the serving record holds: a fixed-size record lets a batch read skip
# per-row slicing (which halved p99 of 1,024-admission reads). A MIMIC-CXR file URI is
# about 80 bytes plus its root; a longer URI follows the record, read at the old cost.
URI_INLINE = 160


@functools.lru_cache(maxsize=4)
def serving_dtype(note_tokens: int = mi.NOTE_TOKENS) -> np.dtype:
    """The serving record; a URI longer than ``URI_INLINE`` bytes follows it."""
    return np.dtype(SERVING_HEAD.descr + _tail_fields(note_tokens) + [("cxr_uri", f"S{URI_INLINE}")])


def serving_tail(serving: bytes, note_tokens: int = mi.NOTE_TOKENS) -> bytes:
    """The blob tail (``Notes.blob_tail``) a serving blob carries: tokens, then the URI."""
    size = serving_dtype(note_tokens).itemsize
    tokens = serving[SERVING_BYTES : size - URI_INLINE]
    return tokens + (serving[size:] or serving[size - URI_INLINE : size].rstrip(b"\0"))


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
        return _ids_bytes(self.radiology_tail(), n) + _ids_bytes(self.dis_ids, n) + self.cxr_uri.encode()

    def encode(self) -> bytes:
        data = {"rad": self.rad_notes, "dis": self.dis_key, "dis_ids": self.dis_ids,
                "cxr": self.cxr_key, "uri": self.cxr_uri}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, note_tokens: int) -> "Notes":
        data, notes = json.loads(raw), cls(note_tokens)
        notes.rad_notes = [(t, note_id, ids) for t, note_id, ids in data["rad"]]
        notes.dis_key, notes.dis_ids = tuple(data["dis"]), data["dis_ids"]
        notes.cxr_key, notes.cxr_uri = tuple(data["cxr"]), data["uri"]
        return notes


class AdmissionState:
    """Running aggregates of one admission, updated in place by ``apply``."""

    __slots__ = ("agg", "note_tokens", "_notes", "_notes_raw", "_tail", "notes_changed")

    def __init__(self, note_tokens: int = mi.NOTE_TOKENS):
        self.agg = list(_EMPTY_AGGREGATES)
        self.note_tokens = note_tokens
        self._notes: Notes | None = Notes(note_tokens)
        self._notes_raw: bytes | None = None  # as stored, until a note or image needs it decoded
        self._tail: bytes | None = None  # the blob tail, cached while the notes are unchanged
        self.notes_changed = False

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
                t = hours(p.charttime)
                self._observe(HEADER + index * STATS, t, p.value)
                self._window(index, t, p.value)
        elif kind == "admission":
            a[H_ADMIT] = hours(p.admittime)
            a[H_AGE] = p.age
            a[H_MALE] = 1.0 if p.gender == "M" else 0.0
            a[H_ADMTYPE] = _admission_type_index(p.admission_type)
        elif kind == "discharge":
            # The outcome is a label, never an input: only the fact of discharge is kept.
            a[H_DISCHARGED] = 1.0
        elif kind in ("note", "cxr"):
            notes = self.notes
            if kind == "cxr":
                notes.set_cxr(hours(p.studytime), p.dicom_id, p.uri)
            elif p.note_type == "radiology":
                notes.add_radiology(hours(p.charttime), p.note_id, vocab.encode(p.text))
            else:  # the previous admission's discharge summary
                notes.set_discharge(hours(p.charttime), p.note_id, vocab.encode(p.text))
            self._tail, self.notes_changed = None, True

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
            a[first : first + shift * PREFIX] = _EMPTY_PREFIX * shift
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
                out += (a[base + S_LAST_VALUE], a[base + S_SUM] / count, a[base + S_MIN], a[base + S_MAX], count)
            else:
                out += (NAN, NAN, NAN, NAN, 0.0)
        return out

    def anchors(self) -> list[float]:
        a = self.agg
        last_times = [
            a[base + S_LAST_TIME] if a[base + S_COUNT] else NAN
            for base in range(HEADER, HEADER + N_ITEMS * STATS, STATS)
        ]
        return [a[H_ADMIT], a[H_LAST_EVENT], *last_times]

    @property
    def discharged(self) -> bool:
        return self.agg[H_DISCHARGED] == 1.0

    # --- serialisation ------------------------------------------------------------------

    def to_blob(self) -> bytes:
        """All ``assemble`` needs, nothing more (native byte order = the little-endian
        ``blob_dtype`` on x86 and ARM)."""
        numeric = array("f", self.static_features()).tobytes() + array("d", self.anchors()).tobytes()
        return numeric + array("f", self.agg[PREFIXES:]).tobytes() + self.blob_tail()

    def blob_tail(self) -> bytes:
        if self._tail is None:
            self._tail = self.notes.blob_tail()
        return self._tail

    def to_aggregates(self) -> bytes:
        return array("d", self.agg).tobytes()

    def to_notes(self) -> bytes:
        if self._notes_raw is not None and not self.notes_changed:
            return self._notes_raw
        return self.notes.encode()

    @classmethod
    def from_stored(cls, aggregates: bytes | None, notes: bytes | None, tail: bytes | None,
                    note_tokens: int = mi.NOTE_TOKENS) -> "AdmissionState":
        """The state as the online store keeps it (all None: a new admission). ``tail``:
        the stored blob tail (``blob_tail``), which spares decoding the notes to write."""
        state = cls(note_tokens)
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


# --- the transform: a batch of blobs -> model inputs, vectorised ------------------------------


@functools.lru_cache(maxsize=4)
def _empty_prefix(note_tokens: int) -> bytes:
    return AdmissionState(note_tokens).to_blob()


@functools.lru_cache(maxsize=4)
def _empty_serving(note_tokens: int) -> bytes:
    """An unknown admission, as ``assemble`` has it: latest event -inf, nothing observed."""
    record = np.zeros(1, serving_dtype(note_tokens))
    record["as_of"] = -np.inf
    return record.tobytes()


def decode_blobs(blobs, note_tokens: int = mi.NOTE_TOKENS):
    """(present [B] bool, records [B] of ``blob_dtype``, uris [B] object) for a batch."""
    return _split_records(blobs, blob_dtype(note_tokens), _empty_prefix(note_tokens))


def _split_records(blobs, dtype: np.dtype, empty: bytes):
    """(present, records of ``dtype``, the text after each record): a blob that is None, or
    too short for a record (never written so), reads as unknown (``empty``)."""
    size = dtype.itemsize
    # The only per-row Python: which rows were found, slicing off and decoding the URIs.
    found, heads, tails = [], [], []
    for blob in blobs:
        if blob is not None and len(blob) >= size:
            found.append(True)
            heads.append(blob[:size])
            tails.append(blob[size:].decode())
        else:
            found.append(False)
            heads.append(empty)
            tails.append("")
    records = np.frombuffer(b"".join(heads), dtype=dtype)
    return np.array(found, dtype=bool), records, np.array(tails, dtype=object)


def raw_numeric(records: np.ndarray, as_of: np.ndarray) -> np.ndarray:
    """Unnormalised ``NUMERIC_FEATURES`` [B, F] float64, NaN where missing."""
    raw = np.empty((len(records), fd.N_NUMERIC))
    static, since = fd.N_STATIC, fd.N_STATIC + 1 + N_ITEMS
    raw[:, :static] = records["static"]
    # Hours since admission, then hours since each item's latest measurement.
    anchors = records["anchors"]
    np.subtract(as_of, anchors[:, A_ADMIT], out=raw[:, static])
    np.subtract(as_of[:, None], anchors[:, A_ITEMS:], out=raw[:, static + 1 : since])
    windowed(records, as_of, out=raw[:, since:])
    return raw


def windowed(records: np.ndarray, as_of: np.ndarray, windows: tuple[int, ...] = fd.WINDOW_BUCKETS,
             out: np.ndarray | None = None) -> np.ndarray:
    """Per window (in buckets, at most N_BUCKETS), item and ``fd.WINDOW_STATS``, as of
    ``as_of``: [B, N_WINDOWED] float64, NaN where missing (a count is never missing).
    Windows end with ``as_of``'s bucket."""
    rows = len(records)
    width = N_ITEMS * PREFIX
    out = np.empty((rows, len(windows) * width)) if out is None else out
    # Every prefix of the batch, one per row, then a row for an empty window. A window
    # that reaches the item's newest bucket has at least that measurement in it.
    prefixes = np.empty((rows * N_ITEMS * fd.N_BUCKETS + 1, PREFIX), np.float32)
    prefixes[:-1].reshape(records["prefixes"].shape)[...] = records["prefixes"]
    prefixes[-1] = (0.0, np.nan, np.nan, np.nan)
    empty = len(prefixes) - 1
    # Each item's newest bucket, from its latest measurement's time (NaN: never measured).
    newest = np.floor(records["anchors"][:, A_ITEMS:] / fd.BUCKET_HOURS).ravel()
    behind = np.maximum(np.repeat(np.floor(as_of / fd.BUCKET_HOURS), N_ITEMS) - newest, 0.0)  # buckets
    first = np.arange(rows * N_ITEMS) * fd.N_BUCKETS  # each item's prefix 0
    for w, n in enumerate(windows):
        reach = n - 1 - behind  # the prefix this window is; NaN or negative: empty
        picked = np.take(prefixes, np.where(reach >= 0, first + reach, empty).astype(np.intp), axis=0)
        block = out[:, w * width : (w + 1) * width]
        block[...] = picked.reshape(rows, width)  # [B, items * (count, sum, min, max)]
        block[:, P_SUM::PREFIX] /= np.maximum(block[:, P_COUNT::PREFIX], 1.0)  # the mean; NaN stays NaN
    return out


def scoring_time(records: np.ndarray, as_of=None) -> np.ndarray:
    """Scoring time per row (epoch hours): given, or each admission's latest event time."""
    if as_of is None:
        return records["anchors"][:, A_LAST_EVENT].copy()
    return np.broadcast_to(np.asarray(as_of, dtype=np.float64), (len(records),)).copy()


def assemble(blobs, as_of, mean: np.ndarray, std: np.ndarray, note_tokens: int = mi.NOTE_TOKENS):
    """Model inputs for a batch of state blobs, as of ``as_of`` (epoch hours, per row or one).

    ``as_of=None`` scores each admission at its latest applied event time. Unknown
    admissions (``None``) get all-missing rows and ``present`` False.
    """
    present, records, uris = decode_blobs(blobs, note_tokens)
    when = scoring_time(records, as_of)
    raw = raw_numeric(records, when)
    if not present.all():
        raw[~present] = np.nan  # an unknown admission has no counts either
    missing = np.isnan(raw)
    numeric = np.subtract(raw, mean)
    np.divide(numeric, std, out=numeric)
    np.putmask(numeric, missing, 0.0)
    return {
        mi.NUMERIC: numeric.astype(np.float32),
        mi.NUMERIC_MASK: (~missing).astype(np.float32),
        **_text_inputs(records, uris),
        "numeric_raw": raw,
        "as_of": when,
        "present": present,
    }


def _text_inputs(records: np.ndarray, uris: np.ndarray) -> dict[str, np.ndarray]:
    rad = records["radiology"].astype(np.int64)
    dis = records["discharge"].astype(np.int64)
    modality = np.column_stack([rad[:, 0] != fd.PAD, dis[:, 0] != fd.PAD, uris != ""])
    return {mi.NOTES_RADIOLOGY: rad, mi.NOTES_DISCHARGE: dis, mi.MODALITY_MASK: modality.astype(np.float32),
            "cxr_uri": uris}


def serving_blobs(inputs: dict[str, np.ndarray]) -> list[bytes]:
    """The serving blob of each row of ``assemble``'s output."""
    records = np.zeros(len(inputs["as_of"]), serving_dtype(inputs[mi.NOTES_RADIOLOGY].shape[1]))
    records["as_of"] = inputs["as_of"]
    records["numeric"] = inputs[mi.NUMERIC]
    records["observed"] = np.packbits(inputs[mi.NUMERIC_MASK] > 0, axis=1)
    records["radiology"] = inputs[mi.NOTES_RADIOLOGY]
    records["discharge"] = inputs[mi.NOTES_DISCHARGE]
    uris = [uri.encode() for uri in inputs["cxr_uri"]]
    # One that does not fit, or whose trailing NULs the field would drop, follows the record.
    inline = [len(uri) <= URI_INLINE and not uri.endswith(b"\0") for uri in uris]
    records["cxr_uri"] = [uri if fits else b"" for uri, fits in zip(uris, inline)]
    raw, size = records.tobytes(), records.itemsize
    return [raw[i * size : (i + 1) * size] + (b"" if fits else uri) for i, (uri, fits) in enumerate(zip(uris, inline))]


def serving_inputs(blobs, note_tokens: int = mi.NOTE_TOKENS) -> dict[str, np.ndarray]:
    """``assemble``'s output at each admission's latest event (less ``numeric_raw``),
    decoded from serving blobs; unknown admissions (``None``) as ``assemble`` has them."""
    dtype, empty = serving_dtype(note_tokens), _empty_serving(note_tokens)
    rows = [empty if blob is None else blob for blob in blobs]
    if set(map(len, rows)) <= {dtype.itemsize}:  # the usual batch: one array, no per-row slicing
        present = np.array([blob is not None for blob in blobs], dtype=bool)
        records, long_uris = np.frombuffer(b"".join(rows), dtype), None
    else:
        present, records, long_uris = _split_records(blobs, dtype, empty)
    uris = np.array([uri.decode() for uri in records["cxr_uri"].tolist()], dtype=object)
    if long_uris is not None:
        uris = np.where(long_uris != "", long_uris, uris)
    observed = np.unpackbits(records["observed"], axis=1, count=fd.N_NUMERIC)
    return {
        mi.NUMERIC: np.ascontiguousarray(records["numeric"]),
        mi.NUMERIC_MASK: observed.astype(np.float32),
        **_text_inputs(records, uris),
        "as_of": records["as_of"].copy(),
        "present": present,
    }

