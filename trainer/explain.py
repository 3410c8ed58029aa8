"""Explanations computed inside the served graph (``m3t_explain``): the score, and what each
group of numeric features and each modality contributed to its mortality probability.

The method is a baseline difference (occlusion): a group's contribution is the score minus
the score with that group's features set to the input the model sees for an unmeasured
feature (value 0, ``numeric_mask`` 0), a modality's is the score minus the score with the
modality marked absent (the fusion head's learned placeholder). All the perturbed copies
run in one batched forward pass of the numeric encoder and the fusion head, so Triton
serves it as one graph in place of ``m3t_rescore``. Occlusion does not promise that the
contributions add up to the score's distance from an all-missing input; on a model additive
over the groups they do (``tests/test_explanations.py`` checks both properties that hold).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from features import model_inputs as mi
from features import reasons
from trainer.model import Rescore

CONTRIBUTIONS = mi.CONTRIBUTIONS  # output: float32 [N_CONTRIBUTIONS]


class Explain(nn.Module):
    """``Rescore``'s inputs -> (los_remaining_days, mortality_prob, mortality_contributions).

    Args:
        rescore: the numeric encoder and fusion head.
        groups: [G, F] 0/1, each row a group of numeric features (``reasons.GROUP_MATRIX``).
    """

    def __init__(self, rescore: nn.Module, groups: np.ndarray = reasons.GROUP_MATRIX):
        super().__init__()
        self.rescore = rescore
        groups = torch.from_numpy(np.asarray(groups, np.float32))  # [G, F]
        n_groups, n_features = groups.shape
        n_modalities = len(reasons.MODALITY_REASONS)
        # The copies of each row: G with one group occluded, the row unchanged, then one per
        # modality with that modality cleared.
        self.groups, self.copies = n_groups, n_groups + 1 + n_modalities
        self.n_contributions = n_groups + n_modalities
        numeric_keep = torch.ones(self.copies, n_features)
        numeric_keep[:n_groups] -= groups
        modality_keep = torch.ones(self.copies, n_modalities)
        modality_keep[n_groups + 1 :] -= torch.eye(n_modalities)
        self.register_buffer("numeric_keep", numeric_keep, persistent=False)
        self.register_buffer("modality_keep", modality_keep, persistent=False)

    def forward(self, numeric, numeric_mask, emb_radiology, emb_discharge, emb_cxr, modality_mask):
        g, copies = self.groups, self.copies
        f, width = self.numeric_keep.shape[1], self.modality_keep.shape[1]
        x = (numeric.unsqueeze(1) * self.numeric_keep).reshape(-1, f)
        x_mask = (numeric_mask.unsqueeze(1) * self.numeric_keep).reshape(-1, f)
        mod = (modality_mask.unsqueeze(1) * self.modality_keep).reshape(-1, width)

        def repeat(e):
            return e.unsqueeze(1).repeat(1, copies, 1).reshape(-1, e.shape[-1])

        los, mortality = self.rescore(
            x, x_mask, repeat(emb_radiology), repeat(emb_discharge), repeat(emb_cxr), mod
        )
        los = los.reshape(-1, copies)
        mortality = mortality.reshape(-1, copies)
        # Fixed widths (reshape), so the exported graph declares them: [B, 1] and [B, C].
        score = mortality[:, g].reshape(-1, 1)  # the unchanged copy
        others = torch.cat([mortality[:, :g], mortality[:, g + 1 :]], dim=1)
        contributions = (score - others).reshape(-1, self.n_contributions)
        return los[:, g].reshape(-1, 1), score, contributions


def explain_model(numeric: nn.Module, fusion: nn.Module, n_features: int) -> Explain:
    """The feature set's groups; for another numeric width (a test's), one group a feature."""
    groups = (
        reasons.GROUP_MATRIX
        if n_features == reasons.GROUP_MATRIX.shape[1]
        else np.eye(n_features, dtype=np.float32)
    )
    return Explain(Rescore(numeric, fusion), groups)
