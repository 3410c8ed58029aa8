"""The offline builder: point-in-time training examples from event histories.

For each admission and each cutoff (hours after admission, while the patient is still in
hospital), the builder folds the admission's events with ``event_time <= cutoff`` through
``AdmissionState.apply`` (the update the online store applies) and turns the snapshots
into model inputs with ``features.transform.assemble`` (the transform the online store
reads through). Labels come only from the discharge event, which is never folded into a
snapshot (it is after every cutoff).

The vocabulary and the normalisation statistics are fitted on the training split only
(split by patient, so no patient is in two splits).

Output, for the trainer: ``dataset.npz`` with the arrays named in
``features.model_inputs`` plus ``los_days``, ``mortality``, ``hadm_id``, ``subject_id``,
``cutoff`` (epoch hours), ``hours_after_admit``, ``split`` (the split the vocabulary and
norms were fitted on: train only on ``split == "train"``) and ``cxr_uri``; and
``meta.json`` with the fitted features (feature names, vocabulary, normalisation
statistics), versions and the cutoff policy.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from features import definitions as fd
from features import model_inputs as mi
from features.fitted import FittedFeatures
from features.state import AdmissionState, hours
from features.vocab import Vocabulary
from ingest.events import sort_key

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CutoffPolicy:
    """Score each admission at fixed hours after admission while it is still open."""

    hours_after_admit: tuple[float, ...] = (24.0,)

    def __post_init__(self):
        if not self.hours_after_admit or any(h < 0 for h in self.hours_after_admit):
            raise ValueError("cutoffs are one or more non-negative hours after admission")

    def cutoffs(self, admit: float, discharge: float) -> list[float]:
        return [admit + h for h in sorted(set(self.hours_after_admit)) if admit + h < discharge]


@dataclass(frozen=True)
class SplitPolicy:
    """Deterministic split by patient: a hash of subject_id, not the row order."""

    val: float = 0.1
    test: float = 0.1
    seed: int = 0

    def of(self, subject_id: int) -> str:
        digest = hashlib.blake2b(f"{self.seed}:{subject_id}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        return "test" if u < self.test else "val" if u < self.test + self.val else "train"


@dataclass
class Admission:
    hadm_id: int
    subject_id: int
    events: list  # sorted by ingest.events.sort_key
    admit: float  # epoch hours
    discharge: float
    los_days: float
    mortality: float


@dataclass
class Dataset:
    arrays: dict[str, np.ndarray]
    fitted: FittedFeatures
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrays["hadm_id"])


def group_admissions(events: Iterable) -> dict[int, list]:
    """Events per admission, each list in event-time order. Accepts events or lists of them."""
    grouped: dict[int, list] = defaultdict(list)
    for item in events:
        for event in item if isinstance(item, (list, tuple)) else (item,):
            grouped[event.hadm_id].append(event)
    return {hadm_id: sorted(evs, key=sort_key) for hadm_id, evs in grouped.items()}


def labelled(grouped: Mapping[int, list], skipped: dict[str, int] | None = None) -> list[Admission]:
    """Admissions with both an admission and a discharge event (the label's source)."""
    out = []
    for hadm_id, evs in grouped.items():
        admit = next((e for e in evs if e.type == "admission"), None)
        discharge = next((e for e in evs if e.type == "discharge"), None)
        if admit is None or discharge is None:
            if skipped is not None:
                reason = "no_admission_event" if admit is None else "no_discharge_event"
                skipped[reason] = skipped.get(reason, 0) + 1
            continue
        out.append(
            Admission(
                hadm_id,
                admit.subject_id,
                evs,
                hours(admit.payload.admittime),
                hours(discharge.payload.dischtime),
                float(discharge.payload.los_days),
                float(discharge.payload.hospital_expire_flag),
            )
        )
    return out


def snapshots(
    events: list, cutoffs: list[float], vocab: Vocabulary, note_tokens: int = mi.NOTE_TOKENS
):
    """The state blob as of each cutoff: only events with event_time <= cutoff folded in."""
    state, blobs, i = AdmissionState(note_tokens), [], 0
    for cutoff in sorted(cutoffs):
        while i < len(events) and hours(events[i].event_time) <= cutoff:
            state.apply(events[i], vocab)
            i += 1
        blobs.append(state.to_blob())
    return blobs


def visible_notes(admission: Admission, cutoffs: list[float]) -> Iterable[str]:
    last = max(cutoffs)
    return (
        e.payload.text for e in admission.events if e.type == "note" and hours(e.event_time) <= last
    )


def build(
    events: Iterable,
    policy: CutoffPolicy = CutoffPolicy(),
    splits: SplitPolicy = SplitPolicy(),
    fitted: FittedFeatures | None = None,
    vocab_size: int = fd.VOCAB_SIZE,
    note_tokens: int = mi.NOTE_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Training examples for every admission and cutoff; fits vocabulary and norms on train."""
    skipped: dict[str, int] = {}
    admissions = labelled(group_admissions(events), skipped)
    plan = [(a, policy.cutoffs(a.admit, a.discharge), splits.of(a.subject_id)) for a in admissions]
    plan = [(a, cutoffs, split) for a, cutoffs, split in plan if cutoffs]
    skipped["discharged_before_first_cutoff"] = len(admissions) - len(plan)

    refit = fitted is None  # else: reuse the training split's fit (e.g. for a later cohort)
    if refit:
        texts = (
            t for a, cutoffs, split in plan if split == "train" for t in visible_notes(a, cutoffs)
        )
        vocab = Vocabulary.fit(texts, max_size=vocab_size)
        fitted = FittedFeatures.unnormalised(vocab, note_tokens)

    blobs, rows = [], []
    for n, (a, cutoffs, split) in enumerate(plan, 1):
        for cutoff, blob in zip(
            cutoffs, snapshots(a.events, cutoffs, fitted.vocab, fitted.note_tokens)
        ):
            blobs.append(blob)
            rows.append(
                (a.hadm_id, a.subject_id, cutoff, cutoff - a.admit, split, a.los_days, a.mortality)
            )
        if progress:
            progress(n)
    if not rows:
        raise ValueError("no admission has a cutoff before its discharge: nothing to build")

    hadm, subject, cutoff, after, split, los, mortality = map(list, zip(*rows))
    cutoff = np.array(cutoff, dtype=np.float64)
    split = np.array(split)
    if refit:
        raw = fitted.assemble(blobs, cutoff)["numeric_raw"]
        train = split == "train"
        fitted = fitted.with_norm_fitted(raw[train] if train.any() else raw)

    inputs = fitted.assemble(blobs, cutoff)
    arrays = {
        **{spec.name: inputs[spec.name] for spec in fd.FEATURES if spec.name != "cxr_uri"},
        "cxr_uri": inputs["cxr_uri"].astype(str),  # fixed-width unicode: loads without pickle
        "los_days": np.array(los, dtype=np.float32),
        "mortality": np.array(mortality, dtype=np.float32),
        "hadm_id": np.array(hadm, dtype=np.int64),
        "subject_id": np.array(subject, dtype=np.int64),
        "cutoff": cutoff,
        "hours_after_admit": np.array(after, dtype=np.float64),
        "split": split,
    }
    meta = {
        "feature_set_version": fd.FEATURE_SET_VERSION,
        "cutoff_policy": asdict(policy),
        "split_policy": asdict(splits),
        "point_in_time": "events with event_time <= cutoff; labels from the discharge event only",
        "examples": len(rows),
        "admissions": len(plan),
        "examples_per_split": {s: int((split == s).sum()) for s in SPLITS},
        "skipped_admissions": skipped,
        "vocab_size": len(fitted.vocab),
        "numeric_features": list(fd.NUMERIC_FEATURES),
        "features": fitted.to_dict(),
        "inputs": [
            {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in fd.FEATURES
        ],
    }
    return Dataset(arrays, fitted, meta)


def write(dataset: Dataset, out_dir: Path, cxr_tensors: np.ndarray | None = None) -> Path:
    """``dataset.npz`` and ``meta.json`` under ``out_dir``; returns the npz path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(dataset.arrays)
    if (
        cxr_tensors is None
    ):  # images not preprocessed: the trainer still gets the input, marked absent
        cxr_tensors = np.zeros((len(dataset), 1, mi.CXR_SIZE, mi.CXR_SIZE), np.float32)
        arrays[mi.MODALITY_MASK] = arrays[mi.MODALITY_MASK].copy()
        arrays[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] = 0.0
    arrays[mi.CXR] = cxr_tensors
    path = out_dir / "dataset.npz"
    np.savez(path, **arrays)
    (out_dir / "meta.json").write_text(json.dumps(dataset.meta, indent=1))
    return path


def load(out_dir: Path) -> Dataset:
    out_dir = Path(out_dir)
    with np.load(out_dir / "dataset.npz") as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads((out_dir / "meta.json").read_text())
    return Dataset(arrays, FittedFeatures.from_dict(meta["features"]), meta)


def cxr_tensors(
    dataset: Dataset, preprocessor, base_dir: Path | None = None, access=None
) -> tuple[np.ndarray, dict[str, int]]:
    """The ``cxr`` input [N, 1, S, S] for every example (zeros where there is none).

    Each distinct image is read and preprocessed once (cutoffs of one stay share it). An
    image that cannot be read or decoded is counted by reason, its examples keep zeros and
    their ``modality_mask`` CXR flag is cleared (the scorer does the same online when an
    image fails). ``access`` (``features.image_files.ImageAccess``): where images may be read from
    and their limits; ``m3t features build`` passes the settings' roots and the cohort.
    """
    from features import cxr

    uris = dataset.arrays["cxr_uri"]
    distinct = sorted({u for u in uris.tolist() if u})
    size = preprocessor.size
    images, ok, errors = cxr.preprocess_uris(distinct, preprocessor, base_dir, access)

    position = {uri: i for i, uri in enumerate(distinct)}
    index = np.array([position.get(u, -1) for u in uris.tolist()], dtype=np.int64)
    has_image = (
        (index >= 0) & ok[np.maximum(index, 0)] if len(distinct) else np.zeros(len(uris), bool)
    )
    tensors = np.zeros((len(uris), 1, size, size), np.float32)
    tensors[has_image] = images[index[has_image]]
    dataset.arrays[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] = has_image.astype(np.float32)
    return tensors, errors
