"""M3T-LM modules: shapes, masking, composition, constructor validation."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from features import model_inputs as mi
from tests.tiny_model import TINY
from trainer.export import example_inputs, input_specs_for
from trainer.model import M3TLM, CxrEncoder, FusionHead, M3TConfig, NotesEncoder, NumericEncoder

SHAPES = {mi.NUMERIC: (6,), mi.NOTES_RADIOLOGY: (10,), mi.CXR: (1, 16, 16)}


def tiny_model(**overrides) -> M3TLM:
    torch.manual_seed(0)
    return M3TLM(M3TConfig(n_features=6, vocab_size=30, **{**TINY, **overrides})).eval()


def batch(n=5, seed=0) -> dict[str, torch.Tensor]:
    arrays = example_inputs(input_specs_for(SHAPES), n, vocab_size=30, seed=seed)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def run(model, x):
    with torch.no_grad():
        return model(*(x[spec.name] for spec in mi.input_specs(1)))


def raw(model, x):
    """Log-days and logit: unlike days, never clamped, so any change shows."""
    with torch.no_grad():
        return torch.cat(model.raw(*(x[spec.name] for spec in mi.input_specs(1))), dim=1)


def test_outputs_are_days_and_probabilities_per_admission():
    los, prob = run(tiny_model(), batch(5))
    assert los.shape == prob.shape == (5, 1)
    assert (los >= 0).all() and ((prob > 0) & (prob < 1)).all()


@pytest.mark.parametrize(
    "column,inputs", [(0, [mi.NOTES_RADIOLOGY]), (1, [mi.NOTES_DISCHARGE]), (2, [mi.CXR])]
)
def test_a_masked_out_modality_cannot_change_the_prediction(column, inputs):
    model, x = tiny_model(), batch(6)
    x[mi.MODALITY_MASK][:, column] = 0
    before = raw(model, x)
    for name in inputs:
        x[name] = (
            torch.randint(1, 30, x[name].shape)
            if x[name].dtype == torch.int64
            else torch.randn_like(x[name]) * 100
        )
    after = raw(model, x)
    assert torch.equal(before, after)
    # ...while the same change does move the prediction when the modality is present.
    x[mi.MODALITY_MASK][:, column] = 1
    assert not torch.equal(raw(model, x), after)


def test_absent_modality_uses_the_learned_placeholder_not_zeros():
    fusion = FusionHead(8, 8, 8, 16).eval()
    embs = [torch.randn(3, 8) for _ in range(4)]
    absent = torch.zeros(3, 3)
    with torch.no_grad():
        with_placeholder = torch.cat(fusion.raw(*embs, absent), 1)
        fusion.placeholder_cxr.add_(1.0)
        moved = torch.cat(fusion.raw(*embs, absent), 1)
    assert not torch.equal(with_placeholder, moved)


def test_missing_numeric_values_are_marked_by_the_mask():
    encoder = NumericEncoder(4, embed_dim=8, n_heads=2, out_dim=8).eval()
    values = torch.zeros(1, 4)
    with torch.no_grad():
        observed_zero = encoder(values, torch.ones(1, 4))
        missing = encoder(values, torch.zeros(1, 4))
    assert not torch.allclose(observed_zero, missing)


def test_encoders_plus_fusion_equal_the_full_model():
    model, x = tiny_model(), batch(7)
    with torch.no_grad():
        embs = (
            model.numeric(x[mi.NUMERIC], x[mi.NUMERIC_MASK]),
            *model.notes(x[mi.NOTES_RADIOLOGY], x[mi.NOTES_DISCHARGE]),
            model.cxr(x[mi.CXR]),
        )
        separate = model.fusion(*embs, x[mi.MODALITY_MASK])
    assert all(torch.equal(s, f) for s, f in zip(separate, run(model, x)))


def test_notes_encoder_reads_the_state_after_the_last_real_token():
    torch.manual_seed(0)
    encoder = NotesEncoder(20, embed_dim=6, hidden_dim=5, out_dim=4, dropout=0.0).eval()
    tokens = torch.tensor([[3, 4, 5, 0, 0], [7, 8, 9, 10, 11], [2, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 5, 1])
    with torch.no_grad():
        packed = pack_padded_sequence(
            encoder.embedding(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = encoder.lstm(packed)
        assert torch.allclose(encoder(tokens), encoder.out(h[-1]), atol=1e-6)
        # trailing padding columns (dropped by batching) do not change anything
        assert torch.allclose(
            encoder(tokens), encoder(torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], 1))
        )


def test_ablated_model_ignores_the_modality_whatever_the_mask_says():
    model, x = tiny_model(modalities=()), batch(4)
    x[mi.MODALITY_MASK][:] = 1
    before = raw(model, x)
    x[mi.CXR] = torch.randn_like(x[mi.CXR])
    x[mi.NOTES_RADIOLOGY] = torch.randint(1, 30, x[mi.NOTES_RADIOLOGY].shape)
    assert torch.equal(before, raw(model, x))


def test_gradients_reach_every_trainable_encoder():
    model, x = tiny_model(), batch(4)
    x[mi.MODALITY_MASK][:] = 1
    model.train()
    los, prob = model(*(x[spec.name] for spec in mi.input_specs(1)))
    (los.sum() + prob.sum()).backward()
    for part in (
        model.numeric,
        model.notes.radiology,
        model.notes.discharge,
        model.cxr,
        model.fusion.trunk,
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize(
    "build",
    [
        lambda: NumericEncoder(0),
        lambda: NumericEncoder(4, embed_dim=10, n_heads=4),
        lambda: NumericEncoder(4, kernel_size=4),
        lambda: NumericEncoder(4, pool=0),
        lambda: NotesEncoder(1),
        lambda: NotesEncoder(10, padding_idx=10),
        lambda: CxrEncoder(channels=()),
        lambda: FusionHead(modalities=("ecg",)),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs_in_that_precision_and_stays_close(dtype):
    # GPU serving converts weights and inputs to fp16/bf16; no float32 may be made inside.
    model, x = tiny_model(), batch(5)
    reference = run(model, x)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    outputs = run(model.to(dtype), half)
    assert all(o.dtype == dtype for o in outputs)
    for got, want in zip(outputs, reference):
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("n_features", [6, 7])
def test_pooling_halves_the_sequence_attention_sees_and_keeps_every_feature(n_features):
    encoder = NumericEncoder(n_features, embed_dim=8, n_heads=2, pool=2).eval()
    seen = []
    encoder.attention.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    x, mask = torch.randn(3, n_features), torch.ones(3, n_features)
    with torch.no_grad():
        before = encoder(x, mask)
        x[:, -1] += 5.0  # the last feature, alone in its window when the count is odd
        after = encoder(x, mask)
    assert seen == [(n_features + 1) // 2] * 2
    assert not torch.allclose(before, after)


def test_checkpoints_from_before_pooling_rebuild_without_it():
    old = M3TConfig(n_features=6, vocab_size=30).to_dict()
    del old["numeric_pool"]
    assert M3TConfig.from_dict(old).numeric_pool == 1
    assert M3TConfig.from_dict(M3TConfig(n_features=6, vocab_size=30).to_dict()).numeric_pool == 2


@pytest.mark.parametrize("mask", [[1, 0, 1], [0, 0, 0], [1, 1, 1], "mixed"])
def test_predict_runs_encoders_on_present_rows_only_and_equals_forward(mask):
    model, x = tiny_model(), batch(8, seed=3)
    if mask == "mixed":
        x[mi.MODALITY_MASK] = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]] * 2).float()
    else:
        x[mi.MODALITY_MASK] = torch.tensor([mask] * 8).float()
    seen = []
    model.cxr.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    inputs = [x[spec.name] for spec in mi.input_specs(1)]
    with torch.no_grad():
        full, fast = model(*inputs), model.predict(*inputs)
    for a, b in zip(full, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # forward runs the X-ray encoder on the whole batch, predict on the rows that have one.
    assert seen[0] == 8 and seen[1:] == (
        [] if not x[mi.MODALITY_MASK][:, 2].any() else [int(x[mi.MODALITY_MASK][:, 2].sum())]
    )
