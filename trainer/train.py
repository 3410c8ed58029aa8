"""Multi-task training of M3T-LM on the offline dataset.

- Examples: a row is an admission at one cutoff (``m3t features build`` takes many per
  stay). Each stay's rows carry weights summing to 1 (``weight``), and every loss is the
  weighted mean, so a long stay counts as much as a short one. Each epoch draws
  ``examples_per_stay`` rows of every training stay (all of a shorter stay's), with
  probability by weight and without replacement, and spreads the stay's weight over them:
  an epoch costs about that many times a one-row-per-stay epoch, and over epochs every
  cutoff is seen. ``examples_per_stay=None`` trains on every row every epoch.
- Split: by patient, the dataset's own ``split`` column (``features.offline.SplitPolicy``:
  70% train, 10% validation, 20% test by a seeded hash of ``subject_id``, seeded by
  ``m3t features build --split-seed``; the vocabulary and normalisation were fitted on
  that training split). A dataset without the column is split by the same rule with seed
  0. No patient appears in two splits (checked). ``train.json`` records the split.
- Loss: the remaining length of stay (``los_remaining_days``) as MSE on ``log1p(days)``,
  mortality (in-hospital death) as binary cross-entropy on the logit. They are combined by
  learned homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018), in
  the common form ``sum_t exp(-s_t) * L_t + s_t`` with one learned ``s_t = log sigma_t^2``
  per task, so neither task's scale has to be hand tuned; ``weighting="fixed"`` uses
  ``los_weight * L_los + mortality_weight * L_mortality`` instead. Single-task training (an
  ablation) is ``tasks=("los",)`` or ``("mortality",)``.
- Early stopping: on the validation score (``val_examples_per_stay`` rows of each
  validation stay, drawn once per run by weight, weighted as in training),
  each task's loss divided by the loss of the constant baseline for that task (weighted
  train mean of log-days; weighted train prevalence), averaged over the trained tasks.
  Both terms are then unit-free and 1.0 means "no better than the baseline", so the
  criterion does not drift with the learned weights. The best epoch's weights are kept
  (``best.pt``); ``last.pt`` is the final epoch's.
- Determinism: ``seed`` fixes initialisation, the rows drawn each epoch and the batch
  order (not the split: that is the dataset's); on the CPU, with
  ``torch.use_deterministic_algorithms`` and single-process batching, two runs give
  identical weights. A GPU is used when present (``device="auto"``).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from features import model_inputs as mi
from trainer import data as D
from trainer.model import M3TLM, M3TConfig, build_model, los_loss, mortality_loss

TASKS = ("los", "mortality")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (model hyperparameters live in ``M3TConfig``)."""

    max_epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float = 0.5  # learning rate factor after an epoch without validation improvement
    weight_decay: float = 1e-4
    patience: int = 4  # epochs without validation improvement before stopping
    grad_clip: float = 1.0
    seed: int = 0
    weighting: str = "uncertainty"  # or "fixed"
    los_weight: float = 1.0  # used by weighting="fixed"
    mortality_weight: float = 1.0
    tasks: tuple[str, ...] = TASKS
    modalities: tuple[str, ...] = mi.MODALITIES  # the rest are forced absent (ablations)
    device: str = "auto"
    # CPU threads for torch during training. One by default: on a shared 2-core host,
    # OpenMP threads spin-wait against other processes, so two threads step slower than
    # one (trainer/README.md); None keeps torch's default.
    threads: int | None = 1
    max_minutes: float | None = None  # stop after the epoch that crosses this (not deterministic)
    examples_per_stay: int | None = 2  # rows of each training stay per epoch; None: all rows
    # Validation rows per stay, one fixed draw for the whole run (so epochs compare); None: all.
    val_examples_per_stay: int | None = 4
    # Train and validate on one fixed horizon's rows only (the one-moment model the stream
    # policy is compared with); None: every cutoff.
    only_hours_after_admit: float | None = None

    def __post_init__(self):
        if self.weighting not in ("uncertainty", "fixed"):
            raise ValueError(f"weighting must be 'uncertainty' or 'fixed', got {self.weighting!r}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if set(self.modalities) - set(mi.MODALITIES):
            raise ValueError(
                f"modalities must be a subset of {mi.MODALITIES}, got {self.modalities}"
            )
        if self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("batch_size and max_epochs must be >= 1")
        for name in ("examples_per_stay", "val_examples_per_stay"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None: every row)")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}  # older runs also stored their split fractions
        d = {k: v for k, v in d.items() if k in known}
        for key in ("tasks", "modalities"):
            d[key] = tuple(d[key])
        return cls(**d)


class MultiTaskLoss(nn.Module):
    """Combines the per-task losses; see the module docstring for the weighting."""

    def __init__(self, tasks=TASKS, weighting="uncertainty", fixed_weights=None):
        super().__init__()
        self.tasks, self.weighting = tuple(tasks), weighting
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        self.log_vars.requires_grad_(weighting == "uncertainty")
        weights = fixed_weights or {t: 1.0 for t in self.tasks}
        self.register_buffer("fixed", torch.tensor([weights[t] for t in self.tasks]))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[t] for t in self.tasks])
        if self.weighting == "uncertainty":
            return (torch.exp(-self.log_vars) * stacked + self.log_vars).sum()
        return (self.fixed * stacked).sum()


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict]
    best_epoch: int
    seconds: float
    samples_per_s: float
    split_sizes: dict[str, int] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def torch_threads(threads: int | None):
    """Torch's CPU thread count for the block (None: unchanged), restored afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic(seed: int, threads: int | None = None):
    """Seeded, deterministic torch (and its thread count) for the duration of a run;
    restores the global settings afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def task_losses(model: M3TLM, batch: dict[str, torch.Tensor], tasks) -> dict[str, torch.Tensor]:
    """Each task's loss on the batch: the mean weighted by the batch's ``weight``."""
    log_los, logit = model.raw(*D.inputs_of(batch))
    weight = batch[D.WEIGHT]
    losses = {}
    if "los" in tasks:
        losses["los"] = los_loss(log_los, batch[D.LABEL_LOS], weight)
    if "mortality" in tasks:
        losses["mortality"] = mortality_loss(logit, batch[D.LABEL_MORTALITY], weight)
    return losses


def _weighted(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (values * weight).sum() / weight.sum()


def baseline_losses(train: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation-loss scale: the loss of predicting the (weighted) training mean / prevalence."""
    weight = train[D.WEIGHT]
    log_los = torch.log1p(train[D.LABEL_LOS])
    variance = _weighted((log_los - _weighted(log_los, weight)) ** 2, weight)
    p = _weighted(train[D.LABEL_MORTALITY], weight).clamp(1e-4, 1 - 1e-4)
    bce = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    return {"los": float(variance.clamp(min=1e-8)), "mortality": float(bce.clamp(min=1e-8))}


def sample_examples(
    stay: np.ndarray, weight: np.ndarray, per_stay: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's rows: up to ``per_stay`` rows of each stay (``stay``: a stay id per row),
    drawn without replacement with probability by ``weight`` (Gumbel top-k), and their
    training weights, rescaled so each stay's drawn rows weigh what all its rows weigh."""
    if per_stay is None:
        return np.arange(len(stay)), weight.astype(np.float32)
    keys = np.log(weight) + rng.gumbel(size=len(stay))
    order = np.lexsort((-keys, stay))  # by stay, then by key, largest first
    sorted_stay = stay[order]
    first = np.r_[0, np.flatnonzero(sorted_stay[1:] != sorted_stay[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    rows = np.sort(order[rank < per_stay])
    _, group = np.unique(stay, return_inverse=True)
    total = np.bincount(group, weights=weight)
    drawn = np.bincount(group[rows], weights=weight[rows], minlength=len(total))
    return rows, (weight[rows] * total[group[rows]] / drawn[group[rows]]).astype(np.float32)


@torch.no_grad()
def evaluate_losses(model, tensors, tasks, batch_size, device) -> dict[str, float]:
    """Each task's weighted mean loss over all rows of ``tensors``."""
    model.eval()
    n = len(tensors[D.LABEL_LOS])
    totals = {t: 0.0 for t in tasks}
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n))
        batch = D.batch_at(tensors, index, device)
        mass = float(batch[D.WEIGHT].sum())
        for task, value in task_losses(model, batch, tasks).items():
            totals[task] += float(value) * mass
    total = float(tensors[D.WEIGHT].sum())
    return {t: v / total for t, v in totals.items()}


def split_record(dataset: D.Dataset, splits: dict[str, np.ndarray]) -> dict:
    """The split as it is, for ``train.json``: its source, rule and sizes."""
    a = dataset.arrays
    column = "split" in a
    return {
        "source": "the dataset's split column" if column else "SplitPolicy (no split column)",
        "rule": "features.offline.SplitPolicy: a seeded hash of subject_id, "
        "val and test fractions as in policy",
        "policy": dataset.meta.get("split_policy") if column else {"val": 0.1, "test": 0.1},
        **{
            name: {
                "examples": int(len(idx)),
                "admissions": int(len(np.unique(a["hadm_id"][idx]))),
                "patients": int(len(np.unique(a["subject_id"][idx]))),
            }
            for name, idx in splits.items()
        },
    }


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
        console=Console(stderr=True),  # stdout stays clean for --json
    )


def save_checkpoint(
    path: Path, model: M3TLM, train_config: TrainConfig, dataset: D.Dataset, epoch: int
) -> None:
    torch.save(
        {
            "input_shapes": dataset.input_shapes,
            "model_config": model.config.to_dict(),
            "train_config": asdict(train_config),
            "state_dict": model.state_dict(),
            "meta": dataset.meta,
            "epoch": epoch,
        },
        path,
    )


def load_checkpoint(path: Path, map_location="cpu") -> tuple[M3TLM, dict]:
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    model = M3TLM(M3TConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def model_config_for(dataset: D.Dataset, train_config: TrainConfig, **overrides) -> M3TConfig:
    return M3TConfig(
        n_features=dataset.n_features,
        vocab_size=dataset.vocab_size,
        modalities=train_config.modalities,
        **overrides,
    )


def train(
    dataset: D.Dataset,
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    model_overrides: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains M3T-LM, writing ``best.pt``, ``last.pt``, ``history.json`` and ``split.json``.

    Test-set metrics and plots are written afterwards by ``trainer.evaluate.evaluate_run``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    splits = D.dataset_splits(dataset)
    if min(len(splits["train"]), len(splits["val"])) == 0:
        raise D.DatasetError(
            f"too few patients to split: { ({k: len(v) for k, v in splits.items()}) }"
        )
    (out_dir / "split.json").write_text(
        json.dumps(
            {
                name: np.unique(dataset.arrays["subject_id"][idx]).tolist()
                for name, idx in splits.items()
            }
        )
    )
    train_set, val_set = dataset.subset(splits["train"]), dataset.subset(splits["val"])
    if config.only_hours_after_admit is not None:
        train_set = train_set.at_hours(config.only_hours_after_admit)
        val_set = val_set.at_hours(config.only_hours_after_admit)
    val_rows, val_weight = sample_examples(
        val_set.arrays["hadm_id"],
        val_set.arrays[D.WEIGHT].astype(np.float64),
        config.val_examples_per_stay,
        np.random.default_rng(0),  # the same validation rows whatever the training seed
    )
    val_set = val_set.subset(val_rows)
    val_set.arrays[D.WEIGHT] = val_weight
    train_t = D.to_tensors(train_set, config.modalities)
    val_t = D.to_tensors(val_set, config.modalities)
    scale = baseline_losses(train_t)
    model_config = model_config_for(dataset, config, **(model_overrides or {}))

    with deterministic(config.seed, config.threads):
        model = build_model(model_config)
        model.fusion.init_output_bias(
            float(_weighted(torch.log1p(train_t[D.LABEL_LOS]), train_t[D.WEIGHT])),
            float(_weighted(train_t[D.LABEL_MORTALITY], train_t[D.WEIGHT])),
        )
        model = model.to(device)
        weights = {"los": config.los_weight, "mortality": config.mortality_weight}
        criterion = MultiTaskLoss(config.tasks, config.weighting, weights).to(device)
        optimiser = torch.optim.AdamW(
            list(model.parameters()) + list(criterion.parameters()),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        # Halve the step size as soon as validation stalls: the validation score is noisy
        # (few deaths), and smaller steps settle the multi-task optimum before early stopping.
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimiser, factor=config.lr_decay, patience=0
        )
        order = torch.Generator().manual_seed(config.seed)
        draws = np.random.default_rng(config.seed)
        stays = train_set.arrays["hadm_id"]
        stay_weight = train_set.arrays[D.WEIGHT].astype(np.float64)
        history, best, best_epoch, stale, seen = [], math.inf, 0, 0, 0
        started = time.perf_counter()
        with _progress(progress) as bar:
            epochs = bar.add_task("epochs", total=config.max_epochs, status="")
            batches = bar.add_task("batches", total=None, status="")
            for epoch in range(1, config.max_epochs + 1):
                model.train()
                rows, row_weight = sample_examples(
                    stays, stay_weight, config.examples_per_stay, draws
                )
                epoch_weight = torch.from_numpy(row_weight)
                rows = torch.from_numpy(rows)
                bar.reset(batches, total=math.ceil(len(rows) / config.batch_size))
                sums, mass = {t: 0.0 for t in config.tasks}, 0.0
                for at in torch.randperm(len(rows), generator=order).split(config.batch_size):
                    batch = D.batch_at(train_t, rows[at], device)
                    batch[D.WEIGHT] = epoch_weight[at].to(device)
                    losses = task_losses(model, batch, config.tasks)
                    optimiser.zero_grad(set_to_none=True)
                    criterion(losses).backward()
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimiser.step()
                    batch_mass = float(epoch_weight[at].sum())
                    mass += batch_mass
                    for t, v in losses.items():
                        sums[t] += float(v.detach()) * batch_mass
                    bar.update(
                        batches,
                        advance=1,
                        status=" ".join(f"{t}={float(v.detach()):.3f}" for t, v in losses.items()),
                    )
                seen += len(rows)
                val = evaluate_losses(model, val_t, config.tasks, 4 * config.batch_size, device)
                score = sum(val[t] / scale[t] for t in config.tasks) / len(config.tasks)
                schedule.step(score)
                history.append(
                    {
                        "epoch": epoch,
                        "train": {t: s / mass for t, s in sums.items()},
                        "examples": len(rows),
                        "val": val,
                        "val_score": score,
                        "log_vars": criterion.log_vars.detach().cpu().tolist(),
                        "lr": optimiser.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - started,
                    }
                )
                save_checkpoint(out_dir / "last.pt", model, config, dataset, epoch)
                if score < best - 1e-6:
                    best, best_epoch, stale = score, epoch, 0
                    save_checkpoint(out_dir / "best.pt", model, config, dataset, epoch)
                else:
                    stale += 1
                bar.update(
                    epochs, advance=1, status=f"val_score={score:.4f} best={best:.4f}@{best_epoch}"
                )
                out_of_time = (
                    config.max_minutes is not None
                    and time.perf_counter() - started > 60 * config.max_minutes
                )
                if stale >= config.patience or out_of_time:
                    break
        seconds = time.perf_counter() - started

    samples_per_s = seen / seconds
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    sizes = {name: int(len(idx)) for name, idx in splits.items()}
    summary = {
        "train_config": asdict(config),
        "model_config": model_config.to_dict(),
        "device": str(device),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": seconds,
        "train_samples_per_s": samples_per_s,
        "split_sizes": sizes,
        "split": split_record(dataset, splits),
        "torch_threads": config.threads or torch.get_num_threads(),
    }
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(out_dir, history, best_epoch, seconds, samples_per_s, sizes)


def ablation_config(
    config: TrainConfig, modalities=None, tasks=None, only_hours_after_admit=None
) -> TrainConfig:
    changes = {}
    if modalities is not None:
        changes["modalities"] = tuple(modalities)
    if tasks is not None:
        changes["tasks"] = tuple(tasks)
    if only_hours_after_admit is not None:
        changes["only_hours_after_admit"] = float(only_hours_after_admit)
    return replace(config, **changes)
