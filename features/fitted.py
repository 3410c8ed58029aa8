"""What is fitted on the training split: the vocabulary and the normalisation statistics.

Saved as JSON (inside the offline dataset's ``meta.json`` and on its own), loaded by the
online store and the trainer, so both normalise and tokenise exactly alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features import definitions as fd
from features import model_inputs as mi
from features import transform
from features.vocab import Vocabulary


@dataclass(frozen=True)
class FittedFeatures:
    vocab: Vocabulary
    mean: np.ndarray  # [N_NUMERIC] float64, over the training rows where observed
    std: np.ndarray  # [N_NUMERIC] float64, 1 where a feature never varied
    note_tokens: int = mi.NOTE_TOKENS
    version: int = fd.FEATURE_SET_VERSION

    def __post_init__(self):
        for name in ("mean", "std"):
            if np.shape(getattr(self, name)) != (fd.N_NUMERIC,):
                raise ValueError(
                    f"{name} must have {fd.N_NUMERIC} entries, one per numeric feature"
                )

    @classmethod
    def unnormalised(cls, vocab: Vocabulary, note_tokens: int = mi.NOTE_TOKENS) -> FittedFeatures:
        """Identity normalisation: enough to write state, which depends on the vocabulary only."""
        return cls(vocab, np.zeros(fd.N_NUMERIC), np.ones(fd.N_NUMERIC), note_tokens)

    def with_norm_fitted(self, raw: np.ndarray) -> FittedFeatures:
        """Mean/std per feature over ``raw`` [rows, F] (NaN = missing)."""
        observed = ~np.isnan(raw)
        counts = observed.sum(axis=0)
        safe = np.where(observed, raw, 0.0)
        mean = np.divide(safe.sum(axis=0), counts, out=np.zeros(fd.N_NUMERIC), where=counts > 0)
        var = np.divide(
            (np.where(observed, raw - mean, 0.0) ** 2).sum(axis=0),
            counts,
            out=np.zeros(fd.N_NUMERIC),
            where=counts > 0,
        )
        std = np.sqrt(var)
        std = np.where(std > 1e-12, std, 1.0)
        return FittedFeatures(self.vocab, mean, std, self.note_tokens, self.version)

    @property
    def tag(self) -> str:
        """Feature-set version, layout and vocabulary fingerprints: the Redis key namespace."""
        return f"v{self.version}-{fd.LAYOUT}-{self.vocab.fingerprint}"

    def assemble(self, blobs, as_of=None) -> dict[str, np.ndarray]:
        return transform.assemble(blobs, as_of, self.mean, self.std, self.note_tokens)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "tag": self.tag,
            "note_tokens": self.note_tokens,
            "layout": fd.LAYOUT,
            "bucket_hours": fd.BUCKET_HOURS,
            "window_hours": list(fd.WINDOW_HOURS),
            "numeric_features": list(fd.NUMERIC_FEATURES),
            "norm": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "vocab": list(self.vocab.words),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FittedFeatures:
        if data["version"] != fd.FEATURE_SET_VERSION:
            raise ValueError(
                f"fitted for feature-set version {data['version']}, this code is version "
                f"{fd.FEATURE_SET_VERSION}: rebuild the offline dataset"
            )
        if list(data["numeric_features"]) != list(fd.NUMERIC_FEATURES):
            raise ValueError("the numeric feature list differs from features.definitions")
        if data.get("layout") != fd.LAYOUT:
            raise ValueError(
                "fitted for another bucket layout of the windowed aggregates: "
                "rebuild the offline dataset"
            )
        return cls(
            Vocabulary(data["vocab"]),
            np.asarray(data["norm"]["mean"], dtype=np.float64),
            np.asarray(data["norm"]["std"], dtype=np.float64),
            int(data["note_tokens"]),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> FittedFeatures:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("features", data))  # a dataset meta.json or a bare file
