"""The offline dataset as the trainer sees it: load, split by patient, batch.

The offline builder (features/) writes ``dataset.npz`` with one array per tensor of
``features.model_inputs`` (numeric, numeric_mask, notes_radiology, notes_discharge, cxr,
modality_mask), the labels ``los_days`` and ``mortality``, and the ids ``hadm_id``,
``subject_id``, ``cutoff``; plus ``meta.json`` (feature names, vocabulary size, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features import model_inputs as mi

INPUTS = tuple(spec.name for spec in mi.input_specs(1))
LABEL_LOS = "los_days"
LABEL_MORTALITY = "mortality"
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The dataset folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Dataset:
    arrays: dict[str, np.ndarray]
    meta: dict

    def __len__(self) -> int:
        return len(self.arrays[LABEL_LOS])

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
        return {name: tuple(self.arrays[name].shape[1:]) for name in INPUTS}

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset({k: v[index] for k, v in self.arrays.items()}, self.meta)


def load_dataset(folder: Path) -> Dataset:
    folder = Path(folder)
    npz, meta_path = folder / "dataset.npz", folder / "meta.json"
    if not npz.exists():
        raise DatasetError(f"{npz} not found: build it with `m3t features build`")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    with np.load(npz, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    return validate(Dataset(arrays, meta))


def validate(dataset: Dataset) -> Dataset:
    required = INPUTS + (LABEL_LOS, LABEL_MORTALITY, "subject_id")
    missing = [name for name in required if name not in dataset.arrays]
    if missing:
        raise DatasetError(f"dataset lacks arrays {missing}")
    n = len(dataset)
    wrong = [name for name in required if len(dataset.arrays[name]) != n]
    if wrong:
        raise DatasetError(f"arrays {wrong} do not have {n} rows like {LABEL_LOS}")
    if n == 0:
        raise DatasetError("dataset is empty")
    return dataset


def split_by_patient(
    subject_id: np.ndarray, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, np.ndarray]:
    """Row indices of train/val/test, with every patient's admissions in exactly one split.

    Patients (not admissions) are shuffled with ``seed`` and cut by the fractions, so a
    patient's later admission can never leak their outcome into another split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    patients = np.unique(subject_id)
    np.random.default_rng(seed).shuffle(patients)
    cuts = np.round(np.cumsum(fractions)[:2] * len(patients)).astype(int)
    groups = np.split(patients, cuts)
    return {name: np.flatnonzero(np.isin(subject_id, group)) for name, group in zip(SPLITS, groups)}


def dataset_splits(
    dataset: Dataset, fractions=(0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, np.ndarray]:
    """The dataset's own ``split`` column when it has one, else ``split_by_patient``.

    The offline builder fits the vocabulary and the normalisation on its training split,
    so reusing that split keeps validation and test patients unseen by every fitted step.
    Either way, a patient found in two splits is an error.
    """
    subjects = dataset.arrays["subject_id"]
    if "split" not in dataset.arrays:
        return split_by_patient(subjects, fractions, seed)
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
    """The model inputs and labels as tensors; modalities not listed are marked absent."""
    a = dataset.arrays
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a[name])) for name in INPUTS}
    for name in (mi.NUMERIC, mi.NUMERIC_MASK, mi.CXR, mi.MODALITY_MASK):
        tensors[name] = tensors[name].float()
    for name in (mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE):
        tensors[name] = tensors[name].long()
    keep = torch.tensor([float(m in modalities) for m in mi.MODALITIES])
    tensors[mi.MODALITY_MASK] = tensors[mi.MODALITY_MASK] * keep
    tensors[LABEL_LOS] = torch.from_numpy(a[LABEL_LOS].astype(np.float32))
    tensors[LABEL_MORTALITY] = torch.from_numpy(a[LABEL_MORTALITY].astype(np.float32))
    return tensors


def batch_at(
    tensors: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device | str = "cpu"
):
    """One batch: the rows at ``index``, note tokens trimmed to the batch's longest note.

    Tokens are left-aligned, so dropping trailing all-padding columns changes no LSTM
    state the model reads and saves most of the recurrent work on short notes.
    """
    batch = {name: t[index] for name, t in tensors.items()}
    for name in (mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE):
        tokens = batch[name]
        longest = int((tokens != 0).sum(dim=1).max()) if len(tokens) else 0
        batch[name] = tokens[:, : max(longest, 1)]
    return {name: t.to(device) for name, t in batch.items()}


def inputs_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(batch[name] for name in INPUTS)
