"""The offline dataset as the trainer sees it: load, split by patient, batch.

The offline builder (``m3t features build``) writes ``dataset.npz``, one row per example
(an admission at one cutoff): the model inputs of ``features.model_inputs`` except ``cxr``;
the X-rays once each as ``cxr_images`` [U,1,S,S] with ``cxr_index`` [N] (-1: none), so a
stay's many cutoffs share their images (read per-row X-rays with ``rows``); the labels
``los_remaining_days`` (days from the cutoff to discharge: the LoS head's label) and
``mortality``; ``weight`` (each stay's rows sum to 1); the ids ``hadm_id``, ``subject_id``,
``cutoff``, ``hours_after_admit``, ``cutoff_kind`` and ``split``; ``los_days`` (the whole
stay) and ``sex``, ``age``, ``admission_type`` for subgroups. ``meta.json`` has the
feature names, vocabulary size, cutoff and split policies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features import model_inputs as mi
from features.offline import CXR_IMAGES, CXR_INDEX, SplitPolicy, cxr_of

INPUTS = tuple(spec.name for spec in mi.input_specs(1))
LABEL_LOS = "los_remaining_days"
LABEL_MORTALITY = "mortality"
WEIGHT = "weight"
SPLITS = ("train", "val", "test")
SHARED = (CXR_IMAGES,)  # arrays not indexed by row: kept whole by ``subset``
REQUIRED = tuple(n for n in INPUTS if n != mi.CXR) + (
    CXR_IMAGES,
    CXR_INDEX,
    LABEL_LOS,
    LABEL_MORTALITY,
    WEIGHT,
    "hadm_id",
    "subject_id",
)


class DatasetError(ValueError):
    """The dataset folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Dataset:
    arrays: dict[str, np.ndarray]
    meta: dict
    folder: Path | None = None  # where it was loaded from; a subset has none

    def __len__(self) -> int:
        return len(self.arrays[LABEL_MORTALITY])

    @property
    def n_features(self) -> int:
        return self.arrays[mi.NUMERIC].shape[1]

    @property
    def vocab_size(self) -> int:
        if "vocab_size" in self.meta:
            return int(self.meta["vocab_size"])
        notes = (self.arrays[mi.NOTES_RADIOLOGY], self.arrays[mi.NOTES_DISCHARGE])
        return int(max(n.max(initial=0) for n in notes)) + 1

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shape of each model input, as the arrays have them."""
        source = {**self.arrays, mi.CXR: self.arrays[CXR_IMAGES]}
        return {name: tuple(source[name].shape[1:]) for name in INPUTS}

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(
            {k: v if k in SHARED else v[index] for k, v in self.arrays.items()}, self.meta
        )

    def at_hours(self, hours: float) -> Dataset:
        """One row per stay: its fixed-horizon row ``hours`` after admission, weighing 1
        (stays discharged before then have none)."""
        a = self.arrays
        at = (a["cutoff_kind"] == "horizon") & np.isclose(a["hours_after_admit"], hours)
        one = self.subset(np.flatnonzero(at))
        one.arrays[WEIGHT] = np.ones(len(one), np.float32)
        return one


def rows(dataset: Dataset, name: str, index=slice(None)) -> np.ndarray:
    """Per-row values of array ``name`` at ``index``: the way to read ``cxr`` per row."""
    if name == mi.CXR:
        return cxr_of(dataset.arrays, index)
    return dataset.arrays[name][index]


def load_dataset(folder: Path) -> Dataset:
    folder = Path(folder)
    npz, meta_path = folder / "dataset.npz", folder / "meta.json"
    if not npz.exists():
        raise DatasetError(f"{npz} not found: build it with `m3t features build`")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    with np.load(npz, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return validate(Dataset(arrays, meta, folder))


def validate(dataset: Dataset) -> Dataset:
    missing = [name for name in REQUIRED if name not in dataset.arrays]
    if missing:
        raise DatasetError(
            f"dataset lacks arrays {missing}: rebuild it with this version's `m3t features build`"
        )
    n = len(dataset)
    per_row = [name for name in REQUIRED if name not in SHARED]
    wrong = [name for name in per_row if len(dataset.arrays[name]) != n]
    if wrong:
        raise DatasetError(f"arrays {wrong} do not have {n} rows like {LABEL_MORTALITY}")
    if n == 0:
        raise DatasetError("dataset is empty")
    index = dataset.arrays[CXR_INDEX]
    if index.max(initial=-1) >= len(dataset.arrays[CXR_IMAGES]) or index.min(initial=-1) < -1:
        raise DatasetError(f"{CXR_INDEX} points outside {CXR_IMAGES}")
    if not (dataset.arrays[WEIGHT] > 0).all() or not (dataset.arrays[LABEL_LOS] >= 0).all():
        raise DatasetError(f"{WEIGHT} must be > 0 and {LABEL_LOS} >= 0 on every row")
    return dataset


def split_by_patient(subject_id: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of train/val/test by ``features.offline.SplitPolicy`` (70/10/20 by a
    seeded hash of ``subject_id``): the builder's rule, so a patient is in one split only."""
    policy = SplitPolicy(seed=seed)
    patients, inverse = np.unique(subject_id, return_inverse=True)
    labels = np.array([policy.of(int(p)) for p in patients])[inverse]
    return {name: np.flatnonzero(labels == name) for name in SPLITS}


def dataset_splits(dataset: Dataset) -> dict[str, np.ndarray]:
    """Row indices of train/val/test: the dataset's ``split`` column.

    The offline builder fits the vocabulary and the normalisation on its training split,
    so that split is the one used. A dataset without the column is split by the same rule
    (``split_by_patient``, seed 0). A patient found in two splits is an error.
    """
    subjects = dataset.arrays["subject_id"]
    if "split" not in dataset.arrays:
        return split_by_patient(subjects)
    labels = dataset.arrays["split"].astype(str)
    unknown = set(np.unique(labels)) - set(SPLITS)
    if unknown:
        raise DatasetError(f"split column has values {sorted(unknown)}; expected {SPLITS}")
    splits = {name: np.flatnonzero(labels == name) for name in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if np.intersect1d(subjects[splits[a]], subjects[splits[b]]).size:
            raise DatasetError(f"the dataset's split puts patients in both {a} and {b}")
    return splits


def to_tensors(
    dataset: Dataset, modalities: tuple[str, ...] = mi.MODALITIES
) -> dict[str, torch.Tensor]:
    """The model inputs, labels and weights as tensors; modalities not listed are marked
    absent. X-rays stay deduplicated (``cxr_images`` with a zero image first, ``cxr_index``
    shifted by one) and ``batch_at`` gathers each batch's."""
    a = dataset.arrays
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(a[name])) for name in INPUTS if name != mi.CXR
    }
    for name in (mi.NUMERIC, mi.NUMERIC_MASK, mi.MODALITY_MASK):
        tensors[name] = tensors[name].float()
    for name in (mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE):
        tensors[name] = tensors[name].long()
    keep = torch.tensor([float(m in modalities) for m in mi.MODALITIES])
    tensors[mi.MODALITY_MASK] = tensors[mi.MODALITY_MASK] * keep
    images = torch.from_numpy(np.ascontiguousarray(a[CXR_IMAGES], dtype=np.float32))
    tensors[CXR_IMAGES] = torch.cat([images.new_zeros((1, *images.shape[1:])), images])
    tensors[CXR_INDEX] = torch.from_numpy(a[CXR_INDEX].astype(np.int64) + 1)
    for name in (LABEL_LOS, LABEL_MORTALITY, WEIGHT):
        tensors[name] = torch.from_numpy(a[name].astype(np.float32))
    return tensors


def batch_at(
    tensors: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device | str = "cpu"
):
    """One batch: the rows at ``index`` with their X-rays gathered, note tokens trimmed to
    the batch's longest note.

    Tokens are left-aligned, so dropping trailing all-padding columns changes no LSTM
    state the model reads and saves most of the recurrent work on short notes.
    """
    batch = {name: t[index] for name, t in tensors.items() if name != CXR_IMAGES}
    batch[mi.CXR] = tensors[CXR_IMAGES][batch.pop(CXR_INDEX)]
    for name in (mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE):
        tokens = batch[name]
        longest = int((tokens != 0).sum(dim=1).max()) if len(tokens) else 0
        batch[name] = tokens[:, : max(longest, 1)]
    return {name: t.to(device) for name, t in batch.items()}


def inputs_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(batch[name] for name in INPUTS)
