"""A small M3T-LM shaped to a model repository's configs, exported and published there: what
the tests serve on Triton, or in-process, without training anything."""

from __future__ import annotations

from pathlib import Path

import torch

from features import model_inputs as mi
from trainer.export import export_onnx, graphs
from trainer.model import M3TLM, M3TConfig
from trainer.model_card import build_card
from trainer.publish import publish, read_config

# The smallest M3T-LM hyperparameters the tests train and serve (emb_dim set by the repo's
# configs when published).
TINY = dict(
    numeric_embed_dim=8,
    numeric_heads=2,
    notes_embed_dim=8,
    notes_hidden_dim=8,
    cxr_channels=(4, 8),
    emb_dim=8,
    fusion_hidden_dim=16,
)


def publish_tiny(repo: Path, onnx_dir: Path, vocab_size: int, seed: int):
    """(the model, its graphs, the published versions by model name)."""
    dims = {t.name: tuple(t.dims) for t in read_config(repo / "m3t_lm" / "config.pbtxt").input}
    emb = read_config(repo / "m3t_enc_cxr" / "config.pbtxt").output[0].dims[0]
    torch.manual_seed(seed)
    model = M3TLM(
        M3TConfig(
            n_features=dims[mi.NUMERIC][0],
            vocab_size=vocab_size,
            **{**TINY, "emb_dim": emb},
        )
    ).eval()
    shapes = {spec.name: dims[spec.name] for spec in mi.input_specs(1)}
    export_onnx(model, shapes, onnx_dir)
    # With a model card, as `m3t export publish` writes one: Triton serves the version beside it.
    card = build_card(onnx_dir, {"epoch": 0}, "m3t_lm")
    published = publish(graphs(model, shapes), onnx_dir, repo, card=card)
    return model, graphs(model, shapes), published
