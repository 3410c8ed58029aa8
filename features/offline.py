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
import math
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
CXR_IMAGES = "cxr_images"  # [U,1,S,S] float32: each distinct preprocessed image once
CXR_INDEX = "cxr_index"  # [N] int32: the row's image in cxr_images, -1 none


HORIZONS = (6.0, 12.0, 24.0, 48.0, 72.0)  # hours after admission the evaluation reports
KINDS = ("horizon", "grid", "event")  # a cutoff's kind; on a tie the first kind names it


@dataclass(frozen=True)
class CutoffPolicy:
    """When to take an example of an admission, always while the patient is still in hospital
    (admission <= cutoff < discharge):

    - ``hours_after_admit``: fixed horizons (kind "horizon");
    - ``grid_every``: every so many hours from ``grid_from`` to discharge (kind "grid"; None:
      no grid);
    - ``events_train`` / ``events_eval``: that many of the stay's event times (kind "event"),
      drawn with ``seed`` and the admission's id; validation and test stays get more, so
      that "at every event" is evaluated on a fair sample of the times the stream scores.

    ``CutoffPolicy((24.0,))`` is the single 24-h example per stay; ``CutoffPolicy.stream()``
    is the policy for a model that scores at every hour of the stay.
    """

    hours_after_admit: tuple[float, ...] = (24.0,)
    grid_every: float | None = None
    grid_from: float = 2.0
    events_train: int = 0
    events_eval: int = 0
    seed: int = 0

    def __post_init__(self):
        if any(h < 0 for h in self.hours_after_admit) or self.grid_from < 0:
            raise ValueError("cutoffs are non-negative hours after admission")
        if self.grid_every is not None and self.grid_every <= 0:
            raise ValueError("grid_every is a positive number of hours")
        if min(self.events_train, self.events_eval) < 0:
            raise ValueError("events_train and events_eval are counts >= 0")
        if not (self.hours_after_admit or self.grid_every or self.events_train):
            raise ValueError("the policy gives no cutoff: name horizons, a grid or event times")

    @classmethod
    def stream(
        cls,
        grid_every: float | None = 6.0,
        grid_from: float = 2.0,
        events_train: int = 2,
        events_eval: int = 8,
        seed: int = 0,
    ) -> CutoffPolicy:
        return cls(HORIZONS, grid_every, grid_from, events_train, events_eval, seed)

    def cutoffs(
        self,
        admit: float,
        discharge: float,
        event_hours: Iterable[float] = (),
        split: str = "train",
        key: int = 0,
    ) -> list[tuple[float, str]]:
        """``(cutoff, kind)`` in time order, one per distinct cutoff time, all before discharge.

        ``event_hours``: the stay's event times (epoch hours); ``key`` (the hadm_id) and
        ``seed`` fix which of them are drawn.
        """
        found: dict[float, str] = {}

        def add(times, kind):
            for t in times:
                if admit <= t < discharge:
                    found.setdefault(float(t), kind)

        add((admit + h for h in sorted(set(self.hours_after_admit))), "horizon")
        if self.grid_every:
            steps = max(0, math.ceil((discharge - admit - self.grid_from) / self.grid_every))
            add((admit + self.grid_from + k * self.grid_every for k in range(steps)), "grid")
        k = self.events_train if split == "train" else self.events_eval
        if k:
            times = np.unique([t for t in event_hours if admit <= t < discharge])
            rng = np.random.default_rng([self.seed, key % 2**63])
            add(np.sort(rng.choice(times, min(k, len(times)), replace=False)), "event")
        return sorted(found.items())


@dataclass(frozen=True)
class SplitPolicy:
    """Deterministic split by patient: a hash of subject_id, not the row order.

    70/10/20: the test share is twice the validation's because in-hospital deaths are few
    (5-7% of stays) and the paired comparison of two models' AUROC needs them: 10,000
    admissions leave about 120 test deaths.
    """

    val: float = 0.1
    test: float = 0.2
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
    sex: str = ""  # "F", "M" or "" (unknown); with age and admission type: for subgroup tables
    age: float = float("nan")  # years at admission
    admission_type: str = ""


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
    """Admissions with both an admission and a discharge event (the label's source): the
    admission event sent last (an A08 update) and the latest discharge, where no cancel
    took it back; an admission cancelled and never admitted again is no example."""
    out = []
    for hadm_id, evs in grouped.items():
        admits = [e for e in evs if e.type == "admission"]
        discharges = [e for e in evs if e.type == "discharge"]
        life = AdmissionState()  # the admission's life only: its admits, discharges, cancels
        for e in (*admits, *discharges, *(e for e in evs if e.type == "cancel")):
            life.apply(e, None)
        reason = (
            "no_admission_event"
            if not admits
            else "cancelled_admission"
            if life.cancelled
            else "no_discharge_event"
            if not life.discharged
            else None
        )
        if reason is not None:
            if skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
            continue
        admit = max(admits, key=lambda e: (hours(e.event_time), sort_key(e)))
        discharge = max(discharges, key=sort_key)
        out.append(
            Admission(
                hadm_id,
                admit.subject_id,
                evs,
                hours(admit.payload.admittime),
                hours(discharge.payload.dischtime),
                float(discharge.payload.los_days),
                float(discharge.payload.hospital_expire_flag),
                admit.payload.gender or "",
                float(admit.payload.age) if admit.payload.age is not None else float("nan"),
                admit.payload.admission_type or "",
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
    policy: CutoffPolicy | None = None,
    splits: SplitPolicy = SplitPolicy(),
    fitted: FittedFeatures | None = None,
    vocab_size: int = fd.VOCAB_SIZE,
    note_tokens: int = mi.NOTE_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Training examples for every admission and cutoff; fits vocabulary and norms on train.

    ``policy`` defaults to ``CutoffPolicy.stream()``. Each stay's examples share a weight
    of 1 (``weight`` = 1 / its number of examples), so long stays do not dominate.
    """
    policy = CutoffPolicy.stream() if policy is None else policy
    skipped: dict[str, int] = {}
    admissions = labelled(group_admissions(events), skipped)
    plan = []
    for a in admissions:
        split = splits.of(a.subject_id)
        times = (hours(e.event_time) for e in a.events if e.type != "discharge")
        cutoffs = policy.cutoffs(a.admit, a.discharge, times, split, a.hadm_id)
        if cutoffs:
            plan.append((a, cutoffs, split))
    skipped["discharged_before_first_cutoff"] = len(admissions) - len(plan)

    refit = fitted is None  # else: reuse the training split's fit (e.g. for a later cohort)
    if refit:
        texts = (
            t
            for a, cutoffs, split in plan
            if split == "train"
            for t in visible_notes(a, [c for c, _ in cutoffs])
        )
        vocab = Vocabulary.fit(texts, max_size=vocab_size)
        fitted = FittedFeatures.unnormalised(vocab, note_tokens)

    blobs, rows = [], []
    for n, (a, cutoffs, split) in enumerate(plan, 1):
        times = [c for c, _ in cutoffs]
        for (cutoff, kind), blob in zip(
            cutoffs, snapshots(a.events, times, fitted.vocab, fitted.note_tokens)
        ):
            blobs.append(blob)
            rows.append(
                (
                    a.hadm_id,
                    a.subject_id,
                    cutoff,
                    cutoff - a.admit,
                    split,
                    a.los_days,
                    (a.discharge - cutoff) / 24.0,
                    1.0 / len(cutoffs),
                    kind,
                    a.mortality,
                    a.sex,
                    a.age,
                    a.admission_type,
                )
            )
        if progress:
            progress(n)
    if not rows:
        raise ValueError("no admission has a cutoff before its discharge: nothing to build")

    columns = list(zip(*rows))
    hadm, subject, cutoff, after, split, los, remaining, weight, kind = columns[:9]
    mortality, sex, age, admission_type = columns[9:]
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
        "los_remaining_days": np.array(remaining, dtype=np.float32),
        "weight": np.array(weight, dtype=np.float32),
        "mortality": np.array(mortality, dtype=np.float32),
        "hadm_id": np.array(hadm, dtype=np.int64),
        "subject_id": np.array(subject, dtype=np.int64),
        "cutoff": cutoff,
        "hours_after_admit": np.array(after, dtype=np.float64),
        "cutoff_kind": np.array(kind, dtype="<U7"),
        "split": split,
        "sex": np.array(sex, dtype="<U1"),
        "age": np.array(age, dtype=np.float32),
        "admission_type": np.array(admission_type, dtype=str),
    }
    meta = {
        "feature_set_version": fd.FEATURE_SET_VERSION,
        "cutoff_policy": asdict(policy),
        "split_policy": asdict(splits),
        "point_in_time": "events with event_time <= cutoff; labels from the discharge event only",
        "examples": len(rows),
        "admissions": len(plan),
        "examples_per_split": {s: int((split == s).sum()) for s in SPLITS},
        "examples_per_kind": {k: int((arrays["cutoff_kind"] == k).sum()) for k in KINDS},
        "skipped_admissions": skipped,
        "vocab_size": len(fitted.vocab),
        "numeric_features": list(fd.NUMERIC_FEATURES),
        "features": fitted.to_dict(),
        "inputs": [
            {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in fd.FEATURES
        ],
    }
    return Dataset(arrays, fitted, meta)


def write(
    dataset: Dataset, out_dir: Path, cxr: tuple[np.ndarray, np.ndarray] | None = None
) -> Path:
    """``dataset.npz`` and ``meta.json`` under ``out_dir``; returns the npz path.

    ``cxr``: ``(cxr_images [U,1,S,S], cxr_index [N])`` from ``cxr_images``: each distinct
    image is stored once and a row points at its image (-1: none), since a stay's many
    cutoffs share their X-rays. Without it the rows are marked as having no image.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(dataset.arrays)
    if cxr is None:  # images not preprocessed: the trainer still gets the input, marked absent
        cxr = (
            np.zeros((0, 1, mi.CXR_SIZE, mi.CXR_SIZE), np.float32),
            np.full(len(dataset), -1, np.int32),
        )
        arrays[mi.MODALITY_MASK] = arrays[mi.MODALITY_MASK].copy()
        arrays[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] = 0.0
    arrays[CXR_IMAGES], arrays[CXR_INDEX] = cxr
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


def cxr_of(arrays: Mapping[str, np.ndarray], rows=slice(None)) -> np.ndarray:
    """The ``cxr`` input [n, 1, S, S] of the given rows (zeros where a row has no image)."""
    images, index = arrays[CXR_IMAGES], np.asarray(arrays[CXR_INDEX][rows])
    out = np.zeros((len(index), *images.shape[1:]), np.float32)
    has = index >= 0
    out[has] = images[index[has]]
    return out


def preprocess_cxr(
    dataset: Dataset, base_dir: Path, extra_roots: tuple[Path, ...] = (), device: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """``cxr_images`` for ``write``: the X-rays the rows point at, resolved against
    ``base_dir`` and read only under the settings' image roots and ``extra_roots`` (the
    cohort named on the command line), preprocessed on ``device``. The errors by reason and
    the number of rows with an image go into the dataset's meta."""
    from features.cxr import CxrPreprocessor
    from features.image_files import ImageAccess
    from m3t.settings import get_settings

    access = ImageAccess.from_settings(get_settings(), extra_roots=extra_roots)
    images, errors = cxr_images(dataset, CxrPreprocessor(device=device), base_dir, access)
    dataset.meta["cxr_errors"] = errors
    dataset.meta["cxr_examples"] = int(dataset.arrays[mi.MODALITY_MASK][:, 2].sum())
    return images


def cxr_images(
    dataset: Dataset, preprocessor, base_dir: Path | None = None, access=None
) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, int]]:
    """``(cxr_images [U,1,S,S], cxr_index [N])`` for ``write``, and the errors by reason.

    Each distinct image is read and preprocessed once (cutoffs of one stay share it). An
    image that cannot be read or decoded is counted by reason, its rows get index -1 and
    their ``modality_mask`` CXR flag is cleared (the scorer does the same online when an
    image fails). ``access`` (``features.image_files.ImageAccess``): where images may be read from
    and their limits; ``m3t features build`` passes the settings' roots and the cohort.
    """
    from features import cxr

    uris = dataset.arrays["cxr_uri"]
    distinct = sorted({u for u in uris.tolist() if u})
    size = preprocessor.size
    images, ok, errors = cxr.preprocess_uris(distinct, preprocessor, base_dir, access)
    ok = np.asarray(ok, bool)
    kept = np.flatnonzero(ok)  # only the images that were read are stored
    position = {distinct[i]: j for j, i in enumerate(kept)}
    index = np.array([position.get(u, -1) for u in uris.tolist()], dtype=np.int32)
    stored = (
        np.asarray(images)[kept].astype(np.float32)
        if len(kept)
        else np.zeros((0, 1, size, size), np.float32)
    )
    dataset.arrays[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] = (index >= 0).astype(
        np.float32
    )
    return (stored, index), errors
