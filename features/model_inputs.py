"""The tensors that cross from the feature store into M3T-LM (and Triton).

One source of truth for names, dtypes and per-example shapes: the offline builder writes
arrays under these names, the online store assembles batches under them, the trainer's
modules take them, ONNX export names its graph inputs after them, and the Triton configs
in model_repo/ are generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Fixed by the feature-set version; the trainer reads them from the offline dataset's
# metadata rather than from here when they differ.
NOTE_TOKENS = 128  # token ids per note sequence (left-aligned, 0 = padding)
CXR_SIZE = 128  # chest X-ray side, pixels, after DALI resize

NUMERIC = "numeric"  # float32 [F]   normalised numeric features (0 where missing)
NUMERIC_MASK = "numeric_mask"  # float32 [F]  1 observed, 0 missing
NOTES_RADIOLOGY = "notes_radiology"  # int64 [NOTE_TOKENS]
NOTES_DISCHARGE = "notes_discharge"  # int64 [NOTE_TOKENS]  prior admission's summary
CXR = "cxr"  # float32 [1, CXR_SIZE, CXR_SIZE]
MODALITY_MASK = "modality_mask"  # float32 [3]: radiology note, discharge note, cxr present

LOS_REMAINING = "los_remaining_days"  # float32 [1]: days from the newest event to discharge
MORTALITY = "mortality_prob"  # float32 [1]
# m3t_explain's: float32 [groups + modalities], each one's part of mortality_prob
# (``features.reasons``, ``trainer.explain``).
CONTRIBUTIONS = "mortality_contributions"

# Per-modality embeddings, for serving the encoders and the fusion head separately.
EMB_NUMERIC = "emb_numeric"
EMB_NOTES = "emb_notes"
EMB_CXR = "emb_cxr"

MODALITIES = ("radiology", "discharge", "cxr")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # per example; -1 where set by the feature set (F)

    @property
    def triton_dtype(self) -> str:
        return {np.dtype("float32"): "TYPE_FP32", np.dtype("int64"): "TYPE_INT64"}[self.dtype]


def input_specs(n_numeric: int, note_tokens: int = NOTE_TOKENS, cxr_size: int = CXR_SIZE):
    f32, i64 = np.dtype("float32"), np.dtype("int64")
    return (
        TensorSpec(NUMERIC, f32, (n_numeric,)),
        TensorSpec(NUMERIC_MASK, f32, (n_numeric,)),
        TensorSpec(NOTES_RADIOLOGY, i64, (note_tokens,)),
        TensorSpec(NOTES_DISCHARGE, i64, (note_tokens,)),
        TensorSpec(CXR, f32, (1, cxr_size, cxr_size)),
        TensorSpec(MODALITY_MASK, f32, (len(MODALITIES),)),
    )


def output_specs():
    f32 = np.dtype("float32")
    return (TensorSpec(LOS_REMAINING, f32, (1,)), TensorSpec(MORTALITY, f32, (1,)))
