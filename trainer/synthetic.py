"""A synthetic dataset in the offline builder's format, for tests and timing.

Each modality carries its own share of the signal, so what the model learns from a
modality is measurable (ablations lose exactly that share):

- numeric: a few features drive a latent severity; some values are missing (mask 0);
- radiology note: "finding" tokens (ids 2..9) raise severity by their count;
- prior discharge summary: "chronic" tokens (ids 10..17) raise it too;
- chest X-ray: a bright opacity blob raises it.

Length of stay is log-normal around the severity; death is Bernoulli of a logistic of it.
Each admission has 1..``max_rows`` examples at random hours before its discharge (numeric
feature 2 is the days since admission), labelled with the remaining stay, weighted 1 / its
number of examples, and split by ``features.offline.SplitPolicy`` as the builder splits.
This is a generator of trainer fixtures, not the cohort generator of ingest/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features import model_inputs as mi
from features.offline import CXR_IMAGES, CXR_INDEX, KINDS, SplitPolicy
from trainer.data import Dataset

FINDING_TOKENS = np.arange(2, 10)
CHRONIC_TOKENS = np.arange(10, 18)


def _note(rng, n, length, vocab, signal_tokens, present, strength):
    tokens = np.zeros((n, length), dtype=np.int64)
    hits = np.zeros(n)
    for i in np.flatnonzero(present):
        size = rng.integers(length // 4, length + 1)
        words = rng.integers(18, vocab, size=size)
        hits[i] = rng.binomial(4, strength[i])
        where = rng.choice(size, size=int(hits[i]), replace=False)
        words[where] = rng.choice(signal_tokens, size=len(where))
        tokens[i, :size] = words
    return tokens, hits


def make_dataset(
    n: int = 400,
    n_features: int = 12,
    note_tokens: int = 24,
    cxr_size: int = 32,
    vocab_size: int = 64,
    patients: int | None = None,
    seed: int = 0,
    max_rows: int = 3,
) -> Dataset:
    """``n`` admissions of ``patients`` patients (default n / 2), 1..max_rows rows each."""
    rng = np.random.default_rng(seed)
    subject_id = rng.integers(0, patients or max(n // 2, 1), size=n) + 10_000_000
    severity_numeric = rng.normal(size=n)
    numeric = rng.normal(size=(n, n_features)).astype(np.float32)
    numeric[:, 0] = severity_numeric + rng.normal(scale=0.3, size=n)
    numeric[:, 1] = -severity_numeric + rng.normal(scale=0.3, size=n)
    numeric_mask = (rng.random((n, n_features)) > 0.1).astype(np.float32)
    numeric *= numeric_mask

    modality_mask = (rng.random((n, 3)) < (0.7, 0.5, 0.6)).astype(np.float32)
    hidden = rng.random((n, 3))  # per-modality latent severity, only visible through it
    radiology, finding_hits = _note(
        rng, n, note_tokens, vocab_size, FINDING_TOKENS, modality_mask[:, 0], hidden[:, 0]
    )
    discharge, chronic_hits = _note(
        rng, n, note_tokens, vocab_size, CHRONIC_TOKENS, modality_mask[:, 1], hidden[:, 1]
    )

    opacity = (hidden[:, 2] > 0.5) & (modality_mask[:, 2] > 0)
    present = np.flatnonzero(modality_mask[:, 2])
    images = rng.normal(0.0, 0.3, size=(len(present), 1, cxr_size, cxr_size)).astype(np.float32)
    yy, xx = np.mgrid[:cxr_size, :cxr_size] / cxr_size
    blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.35) ** 2) / 0.02).astype(np.float32)
    images[opacity[present], 0] += 2.0 * blob
    image_of = np.full(n, -1, np.int32)
    image_of[present] = np.arange(len(present))

    severity = 0.8 * severity_numeric + 0.35 * finding_hits + 0.35 * chronic_hits + 0.9 * opacity
    los_days = np.exp(1.0 + 0.35 * severity + rng.normal(scale=0.25, size=n)).astype(np.float32)
    mortality = (rng.random(n) < 1 / (1 + np.exp(-(1.6 * severity - 3.5)))).astype(np.float32)

    # Several cutoffs per admission, each before discharge; the model sees the elapsed days.
    per_stay = rng.integers(1, max_rows + 1, size=n)
    row = np.repeat(np.arange(n), per_stay)
    days_in = rng.random(len(row)) * los_days[row]
    numeric_rows, mask_rows = numeric[row], numeric_mask[row]
    numeric_rows[:, 2], mask_rows[:, 2] = days_in, 1.0
    admit = 1_577_836_800 / 3600 + rng.integers(0, 24 * 365, size=n)  # epoch hours, 2020
    split = SplitPolicy(seed=0)

    arrays = {
        mi.NUMERIC: numeric_rows,
        mi.NUMERIC_MASK: mask_rows,
        mi.NOTES_RADIOLOGY: radiology[row],
        mi.NOTES_DISCHARGE: discharge[row],
        mi.MODALITY_MASK: modality_mask[row],
        CXR_IMAGES: images,
        CXR_INDEX: image_of[row],
        "los_days": los_days[row],
        "los_remaining_days": (los_days[row] - days_in).astype(np.float32),
        "weight": (1.0 / per_stay[row]).astype(np.float32),
        "mortality": mortality[row],
        "hadm_id": (np.arange(n, dtype=np.int64) + 20_000_000)[row],
        "subject_id": subject_id.astype(np.int64)[row],
        "cutoff": (admit[row] + 24 * days_in).astype(np.float64),
        "hours_after_admit": (24 * days_in).astype(np.float64),
        "cutoff_kind": np.array(KINDS)[rng.integers(0, len(KINDS), size=len(row))],
        "split": np.array([split.of(int(s)) for s in subject_id])[row],
        "sex": np.array(["F", "M"])[rng.integers(0, 2, size=n)][row],
        "age": rng.uniform(18, 95, size=n).astype(np.float32)[row],
        "admission_type": np.array(["EW EMER.", "ELECTIVE", "URGENT"])[rng.integers(0, 3, size=n)][
            row
        ],
    }
    meta = {
        "numeric_features": [f"f{i}" for i in range(n_features)],
        "vocab_size": vocab_size,
        "note_tokens": note_tokens,
        "cxr_size": cxr_size,
        "source": "trainer.synthetic",
        "split_policy": {"val": split.val, "test": split.test, "seed": split.seed},
    }
    return Dataset(arrays, meta)


def write_dataset(dataset: Dataset, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "dataset.npz", **dataset.arrays)
    (folder / "meta.json").write_text(json.dumps(dataset.meta, indent=2))
    return folder
