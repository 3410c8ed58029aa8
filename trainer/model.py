"""M3T-LM: multi-modal multi-task model for length of stay and in-hospital mortality.

After Chen, Li, Liu and Wen, "M3T-LM: A multi-modal multi-task learning model for jointly
predicting patient length of stay and mortality", Computers in Biology and Medicine 183
(2024). One sub-model per modality, then a shared fusion trunk with two task heads:

    NumericEncoder  attention-embedded 1D CNN over the numeric feature vector
    NotesEncoder    embedding + LSTM over a note's token ids (one instance per note stream:
                    radiology reports, and the prior admission's discharge summary)
    CxrEncoder      CRXMDL, a small strided 2D CNN over the chest X-ray
    FusionHead      placeholder substitution for absent modalities, concatenation, MLP,
                    a length-of-stay head and a mortality head

Every block takes only hyperparameters in its constructor and its forward is pure tensor
code, so each encoder and the fusion head export to ONNX (and serve in Triton) on their
own, and ``fusion(encoders(x)) == M3TLM(x)`` exactly.

Missing data is never zeros pretending to be data: a missing numeric feature carries a
learned "missing" embedding (from ``numeric_mask``), and an absent note or X-ray is replaced
by a learned placeholder embedding chosen by ``modality_mask``, so whatever the absent
input's tensor holds cannot reach the heads.

Length of stay is regressed as ``log1p(days)`` (stays are long-tailed, and the log keeps one
40-day stay from dominating the loss); ``forward`` returns days, ``exp(x) - 1``, clamped
at zero. ``raw`` returns the log-days and the mortality logit that the losses use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from features import model_inputs as mi

ALL_MODALITIES = mi.MODALITIES  # ("radiology", "discharge", "cxr"), modality_mask's columns


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token sequence, pre-projected to q, k, v.

    ``F.scaled_dot_product_attention`` rather than ``nn.MultiheadAttention``: on the CPU
    it is faster for short sequences (no per-call mask checks, a fused kernel), and it
    exports to ONNX (opset 14+).
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d/heads]
        return self.proj(attended.transpose(1, 2).reshape(b, n, d))


class NumericEncoder(nn.Module):
    """Attention-embedded 1D CNN over the numeric feature vector.

    Each of the ``n_features`` features becomes a token: its value times a learned
    direction, plus a learned feature-identity embedding, plus a learned "missing"
    embedding where ``numeric_mask`` is 0 (the value there is 0, which is not a
    measurement). Residual Conv1d blocks mix neighbouring features; after the first, max
    pooling (a 1D CNN's usual downsampling) shortens the sequence by ``pool``, which cuts
    self-attention's cost, quadratic in the length, by ``pool`` squared (on the CPU the
    numeric encoder is most of the cost of rescoring an admission). Multi-head
    self-attention then lets any position attend to any other, and attention pooling (a
    learned query scoring each position) reduces the sequence to one embedding.

    Args:
        n_features: F, the length of the numeric vector.
        embed_dim: width of each feature token and of the conv channels (default 32).
        n_blocks: residual Conv1d blocks (default 2).
        kernel_size: odd Conv1d kernel, so the sequence length is kept (default 3).
        n_heads: self-attention heads; must divide ``embed_dim`` (default 2: on the CPU,
            wider heads run faster).
        pool: max-pooling window and stride after the first block (default 2; 1: none).
        out_dim: embedding size returned (default 64).
        dropout: dropout in the blocks and the output (default 0.1).
    """

    def __init__(
        self,
        n_features: int,
        embed_dim: int = 32,
        n_blocks: int = 2,
        kernel_size: int = 3,
        n_heads: int = 2,
        out_dim: int = 64,
        dropout: float = 0.1,
        pool: int = 2,
    ):
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by n_heads ({n_heads})")
        self.value_direction = nn.Parameter(torch.randn(n_features, embed_dim) * 0.1)
        self.feature_embedding = nn.Parameter(torch.randn(n_features, embed_dim) * 0.1)
        self.missing_embedding = nn.Parameter(torch.randn(n_features, embed_dim) * 0.1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2),
                nn.GELU(),
                nn.Dropout(dropout),
            )
            for _ in range(n_blocks)
        )
        # ceil_mode: the last feature of an odd-length vector gets a window of its own.
        self.pool = nn.MaxPool1d(pool, ceil_mode=True) if pool > 1 else nn.Identity()
        self.conv_norm = nn.LayerNorm(embed_dim)
        self.attention = SelfAttention(embed_dim, n_heads)
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.pool_score = nn.Linear(embed_dim, 1)
        self.out = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, numeric: torch.Tensor, numeric_mask: torch.Tensor) -> torch.Tensor:
        observed = numeric_mask.unsqueeze(-1)  # [B, F, 1]
        tokens = (
            numeric.unsqueeze(-1) * self.value_direction
            + self.feature_embedding
            + (1.0 - observed) * self.missing_embedding
        )  # [B, F, E]
        x = tokens.transpose(1, 2)  # Conv1d wants [B, E, F]
        for i, block in enumerate(self.blocks):
            x = x + block(x)
            if i == 0:
                x = self.pool(x)  # [B, E, ceil(F / pool)]
        x = self.conv_norm(x.transpose(1, 2))  # [B, F', E]
        x = self.attention_norm(x + self.attention(x))
        weights = torch.softmax(self.pool_score(x), dim=1)  # [B, F', 1]
        return self.out((weights * x).sum(dim=1))


class NotesEncoder(nn.Module):
    """Embedding + LSTM over one note's token ids (left-aligned, ``padding_idx`` pads).

    The embedding is the LSTM's hidden state after the last real token, gathered per row:
    with left-aligned tokens this equals running the LSTM on the unpadded note (what
    ``pack_padded_sequence`` computes) while staying a fixed-shape graph that exports to
    ONNX. A row with no tokens yields a meaningless vector; ``modality_mask`` marks it
    absent and the fusion head replaces it with the placeholder.

    Args:
        vocab_size: number of token ids, padding included.
        embed_dim: token embedding size (default 48).
        hidden_dim: LSTM hidden size (default 64).
        num_layers: stacked LSTM layers (default 1).
        out_dim: embedding size returned (default 64).
        dropout: dropout on the token embeddings and output (default 0.1).
        padding_idx: the padding token id (default 0).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 48,
        hidden_dim: int = 64,
        num_layers: int = 1,
        out_dim: int = 64,
        dropout: float = 0.1,
        padding_idx: int = 0,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (padding plus a token), got {vocab_size}")
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx {padding_idx} outside the vocabulary [0, {vocab_size})")
        self.padding_idx = padding_idx
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.out = nn.Sequential(nn.Linear(hidden_dim, out_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.dropout(self.embedding(tokens)))  # [B, L, H]
        lengths = (tokens != self.padding_idx).sum(dim=1)
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
        return self.out(states.gather(1, last).squeeze(1))


class CxrEncoder(nn.Module):
    """CRXMDL: a small 2D CNN over the [1, S, S] chest X-ray.

    A patchifying stem (kernel = stride = ``stem_stride``) downsamples early, which is
    where a CNN on a full-size image spends most of its time; each further block is a 3x3
    convolution with stride 2. A 128x128 image is 32x32 after the stem and 8x8 after two
    blocks; global average pooling then makes the embedding independent of S. GroupNorm
    rather than BatchNorm, so the statistics do not depend on how many absent (all-zero)
    X-rays share a batch.

    Args:
        channels: output channels of the stem and of each block (default (16, 32, 64)).
        stem_stride: the stem's kernel and stride (default 4).
        out_dim: embedding size returned (default 64).
        dropout: dropout on the output (default 0.1).
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),
        stem_stride: int = 4,
        out_dim: int = 64,
        dropout: float = 0.1,
    ):
        super().__init__()
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels}")
        if stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
        layers, previous = [], 1
        for i, width in enumerate(channels):
            kernel, stride, padding = (stem_stride, stem_stride, 0) if i == 0 else (3, 2, 1)
            layers += [
                nn.Conv2d(previous, width, kernel, stride=stride, padding=padding),
                nn.GroupNorm(4 if width % 4 == 0 else 1, width),
                nn.ReLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.Linear(previous, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, cxr: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(cxr).mean(dim=(2, 3)))


class FusionHead(nn.Module):
    """Fuses the four modality embeddings and predicts (los_remaining_days, mortality_prob).

    Where ``modality_mask`` marks a note stream or the X-ray absent, its embedding is
    replaced (``torch.where``, so even NaNs cannot leak) by a learned placeholder. The
    embeddings and the mask itself are concatenated and passed through a shared MLP trunk
    (the multi-task shared representation) into two linear heads.

    Args:
        numeric_dim, notes_dim, cxr_dim: the encoders' ``out_dim`` (defaults 64).
        hidden_dim: trunk width (default 128).
        dropout: trunk dropout (default 0.2).
        modalities: the optional modalities this model may see (default all three).
            A modality left out is always replaced by its placeholder, whatever the mask
            says: this is how ablations are trained "with the modality forced absent".
    """

    def __init__(
        self,
        numeric_dim: int = 64,
        notes_dim: int = 64,
        cxr_dim: int = 64,
        hidden_dim: int = 128,
        dropout: float = 0.2,
        modalities: tuple[str, ...] = ALL_MODALITIES,
    ):
        super().__init__()
        unknown = set(modalities) - set(ALL_MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {ALL_MODALITIES}")
        self.placeholder_radiology = nn.Parameter(torch.randn(notes_dim) * 0.1)
        self.placeholder_discharge = nn.Parameter(torch.randn(notes_dim) * 0.1)
        self.placeholder_cxr = nn.Parameter(torch.randn(cxr_dim) * 0.1)
        enabled = torch.tensor([float(m in modalities) for m in ALL_MODALITIES])
        self.register_buffer("enabled", enabled, persistent=False)
        fused = numeric_dim + 2 * notes_dim + cxr_dim + len(ALL_MODALITIES)
        self.trunk = nn.Sequential(
            nn.Linear(fused, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        self.los_head = nn.Linear(hidden_dim, 1)
        self.mortality_head = nn.Linear(hidden_dim, 1)

    @torch.no_grad()
    def init_output_bias(self, mean_log1p_los: float, prevalence: float) -> None:
        """Start both heads at the constant baseline (mean log-days, prevalence logit), so
        early epochs learn the signal rather than the label's offset."""
        p = min(max(prevalence, 1e-4), 1 - 1e-4)
        self.los_head.bias.fill_(mean_log1p_los)
        self.mortality_head.bias.fill_(float(torch.logit(torch.tensor(p))))

    def raw(self, emb_numeric, emb_radiology, emb_discharge, emb_cxr, modality_mask):
        """(log1p length of stay, mortality logit), each [B, 1]: what the losses see."""
        present = self.present(modality_mask)
        emb_radiology = torch.where(present[:, 0:1], emb_radiology, self.placeholder_radiology)
        emb_discharge = torch.where(present[:, 1:2], emb_discharge, self.placeholder_discharge)
        emb_cxr = torch.where(present[:, 2:3], emb_cxr, self.placeholder_cxr)
        shared = self.trunk(
            torch.cat(
                [emb_numeric, emb_radiology, emb_discharge, emb_cxr, present.to(emb_numeric.dtype)],
                dim=1,
            )
        )
        return self.los_head(shared), self.mortality_head(shared)

    def forward(self, emb_numeric, emb_radiology, emb_discharge, emb_cxr, modality_mask):
        return outputs(*self.raw(emb_numeric, emb_radiology, emb_discharge, emb_cxr, modality_mask))

    def present(self, modality_mask: torch.Tensor) -> torch.Tensor:
        """[B, 3] bool: the modalities whose embedding is used (the rest get the placeholder)."""
        return (modality_mask * self.enabled) > 0.5


def outputs(log_los: torch.Tensor, logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(remaining days, mortality probability) from the heads' raw outputs."""
    # exp - 1 rather than expm1, which ONNX has no operator for; days are >= 1e-2 scale
    # so the cancellation near zero does not matter.
    return (torch.exp(log_los) - 1.0).clamp(min=0.0), torch.sigmoid(logit)


def _on_rows(encoder: nn.Module, x: torch.Tensor, rows: torch.Tensor | None, like: torch.Tensor):
    """``encoder(x)``, computed only on ``rows`` (None: all) and zero elsewhere."""
    if rows is None or len(rows) == len(x):
        return encoder(x)
    if len(rows) == 0:
        return like
    return like.index_copy(0, rows, encoder(x[rows]))


@dataclass(frozen=True)
class M3TConfig:
    """Every hyperparameter of M3T-LM, stored in checkpoints to rebuild the model.

    The defaults are sized for the acceptance run (10,000 admissions trained on 2 CPU
    cores within 15 minutes); see trainer/README.md for the measured throughput.
    """

    n_features: int
    vocab_size: int
    numeric_embed_dim: int = 32
    numeric_blocks: int = 2
    numeric_heads: int = 2
    numeric_pool: int = 2
    notes_embed_dim: int = 48
    notes_hidden_dim: int = 64
    cxr_channels: tuple[int, ...] = (16, 32, 64)
    cxr_stem_stride: int = 4
    emb_dim: int = 64
    fusion_hidden_dim: int = 128
    dropout: float = 0.1
    modalities: tuple[str, ...] = field(default=ALL_MODALITIES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> M3TConfig:
        d = dict(d)
        d.setdefault(
            "numeric_pool", 1
        )  # checkpoints from before the pooling had none (it has no weights)
        d["cxr_channels"] = tuple(d["cxr_channels"])
        d["modalities"] = tuple(d["modalities"])
        return cls(**d)


class Rescore(nn.Module):
    """The numeric encoder and the fusion head as one graph (``m3t_rescore``): all a lab or
    vital re-runs, the note and X-ray embeddings coming from the encoder cache. One serving
    call instead of two saves a round trip and a Python-backend dispatch per batch."""

    def __init__(self, numeric: NumericEncoder, fusion: FusionHead):
        super().__init__()
        self.numeric, self.fusion = numeric, fusion

    def forward(
        self,
        numeric,
        numeric_mask,
        emb_notes_radiology,
        emb_notes_discharge,
        emb_cxr,
        modality_mask,
    ):
        return self.fusion(
            self.numeric(numeric, numeric_mask),
            emb_notes_radiology,
            emb_notes_discharge,
            emb_cxr,
            modality_mask,
        )


class NotesPair(nn.Module):
    """The two note encoders as one module: the ``m3t_enc_notes`` serving model."""

    def __init__(self, radiology: NotesEncoder, discharge: NotesEncoder):
        super().__init__()
        self.radiology, self.discharge = radiology, discharge

    def forward(self, notes_radiology, notes_discharge):
        return self.radiology(notes_radiology), self.discharge(notes_discharge)


class M3TLM(nn.Module):
    """The full model: the four encoders composed with the fusion head.

    Inputs are the tensors of ``features.model_inputs.input_specs`` in that order;
    outputs are ``(los_remaining_days, mortality_prob)``, each [B, 1].
    """

    def __init__(self, config: M3TConfig):
        super().__init__()
        c = config
        self.config = config
        self.numeric = NumericEncoder(
            c.n_features,
            c.numeric_embed_dim,
            c.numeric_blocks,
            n_heads=c.numeric_heads,
            out_dim=c.emb_dim,
            dropout=c.dropout,
            pool=c.numeric_pool,
        )
        notes = dict(
            embed_dim=c.notes_embed_dim,
            hidden_dim=c.notes_hidden_dim,
            out_dim=c.emb_dim,
            dropout=c.dropout,
        )
        self.notes = NotesPair(
            NotesEncoder(c.vocab_size, **notes), NotesEncoder(c.vocab_size, **notes)
        )
        self.cxr = CxrEncoder(c.cxr_channels, c.cxr_stem_stride, c.emb_dim, c.dropout)
        self.fusion = FusionHead(
            c.emb_dim, c.emb_dim, c.emb_dim, c.fusion_hidden_dim, 2 * c.dropout, c.modalities
        )

    def embeddings(
        self, numeric, numeric_mask, notes_radiology, notes_discharge, cxr, present=None
    ):
        """The four modality embeddings. Encoders of modalities this model never sees are
        skipped (their placeholder is used regardless), which makes ablations cheap. With
        ``present`` ([B, 3] bool), the note and X-ray encoders run only on the rows whose
        modality is present: the fusion head uses its placeholder for the others, so the
        outputs are the same for the work the data holds (export traces without it: a
        fixed-shape graph)."""
        emb_numeric = self.numeric(numeric, numeric_mask)
        modalities = self.config.modalities
        skipped = emb_numeric.new_zeros(emb_numeric.shape[0], self.config.emb_dim)
        rows = [None] * 3 if present is None else [p.nonzero().squeeze(1) for p in present.T]
        emb_radiology, emb_discharge, emb_cxr = (
            _on_rows(encoder, x, rows[i], skipped) if name in modalities else skipped
            for i, (name, encoder, x) in enumerate(
                (
                    ("radiology", self.notes.radiology, notes_radiology),
                    ("discharge", self.notes.discharge, notes_discharge),
                    ("cxr", self.cxr, cxr),
                )
            )
        )
        return emb_numeric, emb_radiology, emb_discharge, emb_cxr

    def raw(self, numeric, numeric_mask, notes_radiology, notes_discharge, cxr, modality_mask):
        """(log1p remaining days, mortality logit): what the losses see; the optional
        encoders run only where their modality is present."""
        present = self.fusion.present(modality_mask)
        embs = self.embeddings(
            numeric, numeric_mask, notes_radiology, notes_discharge, cxr, present
        )
        return self.fusion.raw(*embs, modality_mask)

    def predict(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s numbers in PyTorch for less work (``raw``'s row selection)."""
        return outputs(*self.raw(*inputs))

    def forward(self, numeric, numeric_mask, notes_radiology, notes_discharge, cxr, modality_mask):
        embs = self.embeddings(numeric, numeric_mask, notes_radiology, notes_discharge, cxr)
        return self.fusion(*embs, modality_mask)


def input_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in mi.input_specs(1))


def note_embedding_name(stream: str) -> str:
    """Output name of a note stream's embedding, e.g. ``emb_notes_radiology``."""
    return f"{mi.EMB_NOTES}_{stream}"


def build_model(config: M3TConfig, seed: int | None = None) -> M3TLM:
    if seed is not None:
        torch.manual_seed(seed)
    return M3TLM(config)


def weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of per-example losses, weighted by ``weight`` when given."""
    return loss.mean() if weight is None else (loss * weight).sum() / weight.sum()


def mortality_loss(
    logit: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logit.squeeze(1), target, reduction="none")
    return weighted_mean(loss, weight)


def los_loss(
    log_los: torch.Tensor, days: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE on log1p(days); ``days`` is the remaining stay from the cutoff."""
    return weighted_mean((log_los.squeeze(1) - torch.log1p(days)) ** 2, weight)
