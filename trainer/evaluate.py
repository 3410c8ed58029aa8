"""Held-out evaluation of M3T-LM against baselines and ablations, with bootstrap CIs.

Everything is measured on the test patients of the run's split (``split.json``), which no
model, baseline or threshold has seen:

- length of stay: MAE and RMSE in days, R²;
- mortality: AUROC, AUPRC, F1 and accuracy (at the threshold that maximises F1 on the
  validation patients), Brier score.

95% confidence intervals are percentile intervals of a patient-level bootstrap (patients
are resampled, with all their admissions, because admissions of one patient are not
independent).

Rows of the table:
- baselines: the training mean of length of stay and the training mortality prevalence;
  ridge regression of log1p(days) and logistic regression on the numeric features and
  their mask; histogram gradient boosting on the same;
- M3T-LM (all modalities, multi-task), the run itself;
- ablations, each a model trained from scratch with the same hyperparameters and seed and
  the left-out modalities forced absent (their placeholder is always used): numeric only,
  numeric + notes, numeric + X-ray, and the two single-task models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features import model_inputs as mi
from trainer import data as D
from trainer.train import (
    TrainConfig,
    ablation_config,
    load_checkpoint,
    resolve_device,
    torch_threads,
    train,
)

ABLATIONS = {
    "numeric only": dict(modalities=()),
    "numeric + notes": dict(modalities=("radiology", "discharge")),
    "numeric + X-ray": dict(modalities=("cxr",)),
    "single-task LoS": dict(tasks=("los",)),
    "single-task mortality": dict(tasks=("mortality",)),
}
FULL = "M3T-LM"
LOS_METRICS = ("mae", "rmse", "r2")
MORTALITY_METRICS = ("auroc", "auprc", "f1", "accuracy", "brier")


@dataclass(frozen=True)
class Predictions:
    los_days: np.ndarray | None  # None: the model does not predict this task
    mortality_prob: np.ndarray | None
    threshold: float = 0.5


class EvaluationError(RuntimeError):
    """The run folder lacks what evaluation needs."""


# --- metrics -------------------------------------------------------------------------


def los_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "mae": float(skm.mean_absolute_error(true, pred)),
        "rmse": float(np.sqrt(skm.mean_squared_error(true, pred))),
        "r2": float(skm.r2_score(true, pred)),
    }


def mortality_metrics(true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    both = len(np.unique(true)) == 2  # AUROC/AUPRC are undefined on one class
    label = (prob >= threshold).astype(int)
    return {
        "auroc": float(skm.roc_auc_score(true, prob)) if both else float("nan"),
        "auprc": float(skm.average_precision_score(true, prob)) if both else float("nan"),
        "f1": float(skm.f1_score(true, label, zero_division=0)),
        "accuracy": float(skm.accuracy_score(true, label)),
        "brier": float(skm.brier_score_loss(true, prob)),
    }


def best_f1_threshold(true: np.ndarray, prob: np.ndarray) -> float:
    """The probability cut that maximises F1 on (validation) data; 0.5 without both classes."""
    if len(np.unique(true)) < 2:
        return 0.5
    precision, recall, thresholds = skm.precision_recall_curve(true, prob)
    if len(thresholds) == 0:
        return 0.5
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def score(
    pred: Predictions, los: np.ndarray, mortality: np.ndarray, rows: np.ndarray | None = None
) -> dict:
    rows = np.arange(len(los)) if rows is None else rows
    out = {}
    if pred.los_days is not None:
        out.update(los_metrics(los[rows], pred.los_days[rows]))
    if pred.mortality_prob is not None:
        out.update(mortality_metrics(mortality[rows], pred.mortality_prob[rows], pred.threshold))
    return out


def bootstrap(
    pred: Predictions, los, mortality, subject_id, n_boot: int = 500, seed: int = 0
) -> dict:
    """Point estimates and patient-level percentile 95% CIs: {metric: {value, lo, hi}}."""
    point = score(pred, los, mortality)
    patients, inverse = np.unique(subject_id, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(patients))]
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in point}
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(patients), len(patients))])
        for name, value in score(pred, los, mortality, rows).items():
            samples[name].append(value)
    out = {}
    for name, value in point.items():
        finite = np.asarray(samples[name], dtype=float)
        finite = finite[np.isfinite(finite)]
        lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        out[name] = {"value": _number(value), "lo": _number(lo), "hi": _number(hi)}
    return out


def _number(x) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. AUROC on one class) is null."""
    return float(x) if np.isfinite(x) else None


# --- predictions -----------------------------------------------------------------------


@torch.no_grad()
def predict(model, tensors: dict[str, torch.Tensor], batch_size: int = 256, device="cpu"):
    """(los_days, mortality_prob) as 1-D numpy arrays."""
    model = model.to(device).eval()
    n = len(tensors[D.LABEL_LOS])
    los, prob = [], []
    for start in range(0, n, batch_size):
        batch = D.batch_at(tensors, torch.arange(start, min(start + batch_size, n)), device)
        los_days, mortality_prob = model(*D.inputs_of(batch))
        los.append(los_days.squeeze(1).cpu().numpy())
        prob.append(mortality_prob.squeeze(1).cpu().numpy())
    return np.concatenate(los), np.concatenate(prob)


def model_predictions(checkpoint: Path, val: D.Dataset, test: D.Dataset, device) -> Predictions:
    model, ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(ckpt["train_config"])
    _, val_prob = predict(model, D.to_tensors(val, config.modalities), device=device)
    los, prob = predict(model, D.to_tensors(test, config.modalities), device=device)
    return Predictions(
        los if "los" in config.tasks else None,
        prob if "mortality" in config.tasks else None,
        best_f1_threshold(val.arrays[D.LABEL_MORTALITY], val_prob),
    )


def numeric_design(ds: D.Dataset) -> np.ndarray:
    return np.concatenate([ds.arrays[mi.NUMERIC], ds.arrays[mi.NUMERIC_MASK]], axis=1)


def baseline_predictions(
    train_ds: D.Dataset, val: D.Dataset, test: D.Dataset, seed: int = 0
) -> dict[str, Predictions]:
    """Mean/prevalence, linear/logistic regression and gradient boosting on numeric features."""
    x_train, x_val, x_test = numeric_design(train_ds), numeric_design(val), numeric_design(test)
    log_los = np.log1p(train_ds.arrays[D.LABEL_LOS])
    died = train_ds.arrays[D.LABEL_MORTALITY]
    n = len(test)
    out = {
        "mean / prevalence": Predictions(
            np.full(n, train_ds.arrays[D.LABEL_LOS].mean()), np.full(n, died.mean()), 0.5
        )
    }
    models = {
        "linear + logistic regression": (
            make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        ),
        "gradient boosting": (
            HistGradientBoostingRegressor(random_state=seed),
            HistGradientBoostingClassifier(random_state=seed),
        ),
    }
    for name, (regressor, classifier) in models.items():
        regressor.fit(x_train, log_los)
        if len(np.unique(died)) == 2:
            classifier.fit(x_train, died)
            val_prob, prob = (
                classifier.predict_proba(x_val)[:, 1],
                classifier.predict_proba(x_test)[:, 1],
            )
        else:  # one class in training: the classifier cannot fit; predict the prevalence
            val_prob, prob = np.full(len(val), died.mean()), np.full(n, died.mean())
        threshold = best_f1_threshold(val.arrays[D.LABEL_MORTALITY], val_prob)
        out[name] = Predictions(
            np.clip(np.expm1(regressor.predict(x_test)), 0, None), prob, threshold
        )
    return out


# --- the table ---------------------------------------------------------------------------


def split_from_run(dataset: D.Dataset, run_dir: Path) -> dict[str, D.Dataset]:
    path = Path(run_dir) / "split.json"
    if not path.exists():
        raise EvaluationError(f"{path} not found: is {run_dir} a training run folder?")
    subjects = json.loads(path.read_text())
    ids = dataset.arrays["subject_id"]
    return {name: dataset.subset(np.flatnonzero(np.isin(ids, subjects[name]))) for name in D.SPLITS}


def train_ablations(
    dataset: D.Dataset, run_dir: Path, names=tuple(ABLATIONS), progress: bool = True
) -> dict[str, Path]:
    """Trains each missing ablation into ``run_dir/ablations/<name>/`` (reused when present)."""
    _, ckpt = load_checkpoint(Path(run_dir) / "best.pt")
    base = TrainConfig.from_dict(ckpt["train_config"])
    overrides = {
        k: v
        for k, v in ckpt["model_config"].items()
        if k not in ("n_features", "vocab_size", "modalities")
    }
    paths = {}
    for name in names:
        folder = Path(run_dir) / "ablations" / name.replace(" ", "_").replace("/", "")
        if not (folder / "best.pt").exists():
            train(dataset, folder, ablation_config(base, **ABLATIONS[name]), overrides, progress)
        paths[name] = folder / "best.pt"
    return paths


def evaluate_run(
    dataset: D.Dataset,
    run_dir: Path,
    ablations: bool = True,
    n_boot: int = 500,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    stem: str = "evaluation",
    threads: int | None = 1,
) -> dict:
    """The evaluation table as JSON-ready data; also writes ``<stem>.json``, ``<stem>.md``
    and the plots into the run folder. Ablations are trained first where missing."""
    run_dir = Path(run_dir)
    device = resolve_device(device)
    if not (run_dir / "best.pt").exists():
        raise EvaluationError(f"{run_dir / 'best.pt'} not found: train first with `m3t train run`")
    parts = split_from_run(dataset, run_dir)
    test = parts["test"]
    if len(test) == 0:
        raise EvaluationError("the test split is empty")
    los, died, subjects = (
        test.arrays[D.LABEL_LOS],
        test.arrays[D.LABEL_MORTALITY],
        test.arrays["subject_id"],
    )

    predictions = baseline_predictions(parts["train"], parts["val"], test, seed)
    with torch_threads(threads):
        predictions[FULL] = model_predictions(run_dir / "best.pt", parts["val"], test, device)
        if ablations:
            for name, path in train_ablations(dataset, run_dir, progress=progress).items():
                predictions[name] = model_predictions(path, parts["val"], test, device)

    rows = []
    for name, pred in predictions.items():
        result = bootstrap(pred, los, died, subjects, n_boot, seed)
        rows.append(
            {
                "model": name,
                "kind": "baseline"
                if name
                in ("mean / prevalence", "linear + logistic regression", "gradient boosting")
                else "m3t"
                if name == FULL
                else "ablation",
                "mortality_threshold": pred.threshold,
                "los": {m: result[m] for m in LOS_METRICS if m in result},
                "mortality": {m: result[m] for m in MORTALITY_METRICS if m in result},
            }
        )
    hadm = test.arrays.get("hadm_id")
    table = {
        "test_examples": int(len(test)),  # one per (admission, scoring cutoff)
        "test_admissions": int(len(np.unique(hadm))) if hadm is not None else int(len(test)),
        "test_patients": int(len(np.unique(subjects))),
        "test_mortality_prevalence": float(died.mean()),
        "bootstrap": {"resamples": n_boot, "unit": "patient", "interval": "95% percentile"},
        "rows": rows,
    }
    (run_dir / f"{stem}.json").write_text(json.dumps(table, indent=2))
    (run_dir / f"{stem}.md").write_text(markdown_table(table))
    from trainer.plots import write_plots

    write_plots(run_dir, los, predictions[FULL], died)
    return table


def _cell(metric: dict | None, digits: int = 3) -> str:
    if metric is None:
        return "-"
    if metric["value"] is None:
        return "n/a"
    if metric["lo"] is None:
        return f"{metric['value']:.{digits}f}"
    return f"{metric['value']:.{digits}f} [{metric['lo']:.{digits}f}, {metric['hi']:.{digits}f}]"


def markdown_table(table: dict) -> str:
    head = [
        "model",
        "LoS MAE (d)",
        "LoS RMSE (d)",
        "LoS R²",
        "AUROC",
        "AUPRC",
        "F1",
        "accuracy",
        "Brier",
    ]
    lines = [
        f"Held-out test set: {table['test_examples']} examples "
        f"from {table['test_admissions']} admissions of "
        f"{table['test_patients']} patients, "
        f"mortality {table['test_mortality_prevalence']:.1%}. "
        "Brackets: 95% CI, patient-level bootstrap "
        f"({table['bootstrap']['resamples']} resamples).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in table["rows"]:
        cells = [_cell(row["los"].get(m), 2) for m in LOS_METRICS] + [
            _cell(row["mortality"].get(m)) for m in MORTALITY_METRICS
        ]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
