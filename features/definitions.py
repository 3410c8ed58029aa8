"""The feature set, declared once.

Everything downstream (the state layout in Redis, the offline dataset's columns, the
normalisation statistics, the ``m3t features get`` display) is derived from the tables
here, so adding a feature is one line and bumps ``FEATURE_SET_VERSION``.

Per admission the model sees:

* demographics: age, sex, admission type (one-hot, with an "other" slot);
* hours since admission, at scoring time;
* for each lab and vital in ``ingest.itemids``: latest value (greatest charttime), mean,
  min, max and count over the stay so far, and hours since the latest measurement;
* for each lab and vital and each window in ``WINDOW_HOURS``: mean, min, max and count of
  the measurements charted in the last W hours before the scoring time (bucket-aligned,
  see ``BUCKET_HOURS``);
* ``numeric_mask``: 1 where a feature is observed, 0 where it is missing (no admission
  event yet, or no measurement of that item yet);
* two note token streams (see ``ingest.events``): radiology reports of this stay
  (``notes_radiology``) and the previous admission's discharge summary
  (``notes_discharge``);
* a reference to the latest chest X-ray (its URI); ``features.cxr`` turns it into the
  ``cxr`` tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from features import model_inputs as mi
from ingest.itemids import ITEMS, LABS, VITALS

# Bump when any definition below changes meaning; it is part of every Redis key and of the
# offline dataset's metadata, so old state and old datasets are never read as new.
FEATURE_SET_VERSION = 2

# MIMIC-IV admissions.admission_type values (demo 2.2). Anything else maps to "other".
ADMISSION_TYPES: tuple[str, ...] = (
    "AMBULATORY OBSERVATION",
    "DIRECT EMER.",
    "DIRECT OBSERVATION",
    "ELECTIVE",
    "EU OBSERVATION",
    "EW EMER.",
    "OBSERVATION ADMIT",
    "SURGICAL SAME DAY ADMISSION",
    "URGENT",
)

# Item order fixes the layout of the aggregate block in the stored state.
MEASURED = LABS + VITALS
ITEM_INDEX: dict[int, int] = {item.itemid: i for i, item in enumerate(MEASURED)}
assert set(ITEM_INDEX) == set(ITEMS), "features must cover exactly the items ingest emits"

# Per-item statistics known at write time, then the ones relative to the scoring time.
ITEM_STATS: tuple[str, ...] = ("last", "mean", "min", "max", "count")
ITEM_TIMES: tuple[str, ...] = ("hours_since_last",)

# Windowed aggregates. Measurements also fall into fixed time buckets of BUCKET_HOURS (by
# charttime, aligned to the epoch), and the state keeps, per item, count/sum/min/max over
# its newest 1, 2, ..., N_BUCKETS buckets (``features.state``, ``features.layout``): an
# event is constant work and a read picks one entry per item and window. A window is
# therefore bucket-aligned: "the last W hours" is the W / BUCKET_HOURS newest buckets, the
# one holding the scoring time included, so it covers between W - BUCKET_HOURS and W hours
# before the scoring time. The bucket width trades that resolution against the size of
# the read blob, which a batch read's cost follows (benchmarks/bench_redis.py times the
# read); more windows up to the widest cost no bytes, only a little transform time.
BUCKET_HOURS = 8.0
WINDOW_HOURS: tuple[float, ...] = (24.0,)
WINDOW_STATS: tuple[str, ...] = ("count", "mean", "min", "max")
WINDOW_BUCKETS: tuple[int, ...] = tuple(round(w / BUCKET_HOURS) for w in WINDOW_HOURS)
assert all(n >= 1 and n * BUCKET_HOURS == w for n, w in zip(WINDOW_BUCKETS, WINDOW_HOURS)), (
    "windows must be whole multiples of BUCKET_HOURS"
)
N_BUCKETS = max(WINDOW_BUCKETS)  # enough for the widest window: older buckets can never be read


@dataclass(frozen=True)
class FeatureDef:
    """One named model input: what it is, its dtype and per-example shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    description: str
    version: int = FEATURE_SET_VERSION


def _numeric_names() -> tuple[str, ...]:
    # Order matters for speed, not meaning: what is fixed at write time comes first, the
    # features relative to the scoring time last, so a read computes one block.
    demographics = ["age", "sex_male"]
    demographics += [f"admission_type={t}" for t in ADMISSION_TYPES] + ["admission_type=other"]
    per_item = [f"{item.name}.{stat}" for item in MEASURED for stat in ITEM_STATS]
    times = ["hours_since_admission"] + [
        f"{item.name}.{t}" for item in MEASURED for t in ITEM_TIMES
    ]
    windows = [
        f"{item.name}.{stat}_{w:g}h"
        for w in WINDOW_HOURS
        for item in MEASURED
        for stat in WINDOW_STATS
    ]
    return tuple(demographics + per_item + times + windows)


# The columns of ``numeric`` / ``numeric_mask``, in order.
NUMERIC_FEATURES: tuple[str, ...] = _numeric_names()
N_NUMERIC = len(NUMERIC_FEATURES)
N_DEMOGRAPHIC = 2 + len(ADMISSION_TYPES) + 1
N_STATIC = NUMERIC_FEATURES.index("hours_since_admission")  # known at write time

# Part of the feature-set tag (the Redis namespace, the fitted features): a change of the
# numeric columns or of the bucket width never lets old state or datasets be read as new.
LAYOUT = hashlib.blake2b(
    repr((NUMERIC_FEATURES, BUCKET_HOURS, N_BUCKETS)).encode(), digest_size=4
).hexdigest()

F32, I64 = np.dtype("float32"), np.dtype("int64")
FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef(mi.NUMERIC, F32, (N_NUMERIC,), "z-scored numeric features, 0 where missing"),
    FeatureDef(mi.NUMERIC_MASK, F32, (N_NUMERIC,), "1 observed, 0 missing"),
    FeatureDef(
        mi.NOTES_RADIOLOGY,
        I64,
        (mi.NOTE_TOKENS,),
        "token ids of this stay's radiology reports, latest text kept, 0 padded",
    ),
    FeatureDef(
        mi.NOTES_DISCHARGE,
        I64,
        (mi.NOTE_TOKENS,),
        "token ids of the previous admission's discharge summary",
    ),
    FeatureDef(
        mi.MODALITY_MASK,
        F32,
        (len(mi.MODALITIES),),
        "1 where the radiology note / discharge note / chest X-ray is present",
    ),
    FeatureDef("cxr_uri", np.dtype(object), (), "URI of the latest chest X-ray study, '' if none"),
)

# Vocabulary: id 0 pads, id 1 stands for words outside the fitted vocabulary.
PAD, UNK = 0, 1
VOCAB_SIZE = 20_000
