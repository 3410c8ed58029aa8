"""The byte layouts of an admission's feature state: what each serialisation holds, where.

Three serialisations:

* the *aggregates* and *notes* (write side, ``features.state``): running
  counts/sums/extrema (float64 slots, below) and the note bookkeeping needed to apply
  later events. The blob is a function of the aggregates and the tail, so the online store
  keeps those and the serving blob only;
* the *blob* (``blob_dtype``, what ``features.transform.assemble`` reads, as of any time):
  the features fixed at write time (``NUMERIC_FEATURES[:N_STATIC]``, float32, NaN =
  missing), the time anchors the scoring-time features are measured from (float64 epoch
  hours), the windows' prefixes (float32 count, sum, min, max), then the *tail*: the two
  token sequences (uint16) and the latest chest X-ray's URI (utf-8, variable length);
* the *serving blob* (``serving_dtype``, what a scoring read fetches): ``assemble``'s
  output as of the latest applied event, computed when the state is written: that time
  (float64), the normalised numeric features as the model takes them (float32, 0 where
  missing), which of them were observed (bits), the two token sequences and the URI in a
  fixed-width field. A fixed-size record lets a batch decode with one numpy call; a URI
  longer than the field (``URI_INLINE`` bytes) follows the record instead.

Windowed aggregates: per item the aggregates keep the newest time bucket ``J`` any
measurement fell into (``NEWEST``) and, for ``r < N_BUCKETS``, a *prefix*: the count,
sum, min and max of the measurements in buckets ``J - r .. J``, newest first. Each item's
prefixes are contiguous, so a read gathers whole prefixes. The blob copies the prefixes
but not ``J``: that is the bucket of the item's latest measurement, an anchor.
"""

from __future__ import annotations

import functools

import numpy as np

from features import definitions as fd
from features import model_inputs as mi

NAN, INF = float("nan"), float("inf")

# --- the aggregates ----------------------------------------------------------------------

# Header slots. The admission's life is kept as event times (epoch hours, -inf: none), so
# that cancels commute with what they cancel (``features.state``): the admission event whose
# demographics are held, the latest cancel of the admission, the latest discharge and the
# latest cancel of a discharge; ``H_KEYED``: 1 once a result id or a correction was seen.
H_ADMIT, H_AGE, H_MALE, H_ADMTYPE, H_LAST_EVENT, H_DISCHARGED = range(6)
H_ADMIT_EVENT, H_CANCEL_ADMIT, H_CANCEL_DISCHARGE, H_KEYED = range(6, 10)
HEADER = 10
# Per-item slots.
S_COUNT, S_SUM, S_MIN, S_MAX, S_LAST_TIME, S_LAST_VALUE = range(6)
STATS = 6
N_ITEMS = len(fd.MEASURED)
# The windows follow the per-item slots: each item's newest bucket, then per item
# N_BUCKETS prefixes of these fields.
NEWEST = HEADER + N_ITEMS * STATS
PREFIXES = NEWEST + N_ITEMS
P_COUNT, P_SUM, P_MIN, P_MAX = range(4)  # a read turns the sum into the mean: fd.WINDOW_STATS
assert fd.WINDOW_STATS == ("count", "mean", "min", "max")
PREFIX = 4
ITEM_PREFIXES = fd.N_BUCKETS * PREFIX
EMPTY_PREFIX = [0.0, 0.0, INF, -INF]

EMPTY_AGGREGATES = (
    [NAN, NAN, NAN, NAN, -INF, -INF, -INF, -INF, -INF, 0.0]
    + [0.0, 0.0, INF, -INF, -INF, NAN] * N_ITEMS
    + [NAN] * N_ITEMS
    + EMPTY_PREFIX * (fd.N_BUCKETS * N_ITEMS)
)

# --- the blob ----------------------------------------------------------------------------

# Anchors: admit time, latest event time (the default scoring time), then per item the
# time of its latest measurement.
A_ADMIT, A_LAST_EVENT, A_ITEMS = 0, 1, 2
N_ANCHORS = 2 + N_ITEMS
# The blob's numeric part; the note tail follows.
NUMERIC_BYTES = fd.N_STATIC * 4 + N_ANCHORS * 8 + N_ITEMS * ITEM_PREFIXES * 4
N_WINDOWED = len(fd.WINDOW_HOURS) * N_ITEMS * len(fd.WINDOW_STATS)
assert fd.N_NUMERIC - fd.N_STATIC == 1 + N_ITEMS * len(fd.ITEM_TIMES) + N_WINDOWED


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

# --- the serving blob --------------------------------------------------------------------

# The part before the tail.
SERVING_HEAD = np.dtype(
    [
        ("as_of", "<f8"),
        ("numeric", "<f4", (fd.N_NUMERIC,)),
        ("observed", "u1", ((fd.N_NUMERIC + 7) // 8,)),  # numpy.packbits of the numeric mask
    ]
)
SERVING_BYTES = SERVING_HEAD.itemsize
# Bytes of the URI the serving record holds inline, so a batch read needs no per-row
# slicing. A MIMIC-CXR file URI is about 80 bytes plus its root; a longer URI follows the
# record and takes the per-row path.
URI_INLINE = 160


@functools.lru_cache(maxsize=4)
def serving_dtype(note_tokens: int = mi.NOTE_TOKENS) -> np.dtype:
    """The serving record; a URI longer than ``URI_INLINE`` bytes follows it."""
    return np.dtype(
        SERVING_HEAD.descr + _tail_fields(note_tokens) + [("cxr_uri", f"S{URI_INLINE}")]
    )


def serving_tail(serving: bytes, note_tokens: int = mi.NOTE_TOKENS) -> bytes:
    """The blob tail (``Notes.blob_tail``) a serving blob carries: tokens, then the URI."""
    size = serving_dtype(note_tokens).itemsize
    tokens = serving[SERVING_BYTES : size - URI_INLINE]
    return tokens + (serving[size:] or serving[size - URI_INLINE : size].rstrip(b"\0"))
