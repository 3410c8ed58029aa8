"""Held-out evaluation of M3T-LM as a clinician reads a risk score (``m3t train evaluate``).

Everything is measured on the test patients of the run's split (``split.json``), which no
model, baseline or threshold has seen. Where: at each horizon (the rows of kind "horizon"
at 6, 12, 24, 48 and 72 h after admission: one row per stay still in hospital then) and
"at every event" (the rows of kind "event": sampled event times, each stay weighted
equally, its rows 1 / its number of event rows). Per horizon every stay counts once, so
per-row and per-stay figures are the same there.

What, per model and place:
- mortality: AUROC, AUPRC, Brier; calibration: the slope and intercept of the logistic
  recalibration fit y ~ a + b logit(p) (1 and 0 when calibrated) and the ECE over ten
  equal-mass bins; F1, sensitivity, specificity, PPV and NPV at two thresholds chosen on
  the validation patients: the one maximising F1 there (per place), and the alert
  threshold, one per model, that gives ``alerts_per_100`` alerts per 100 patient-days;
- remaining length of stay (``los_remaining_days``): MAE, RMSE, R².

Alerts per 100 patient-days: every row stands for the stay's time from its cutoff to the
stay's next row (or to discharge); the share of patient time during which the score is at
or above the threshold, times 100, is the number of alerts a once-daily review of the
current score gives per 100 patient-days. It is counted on all the validation patients'
rows (every kind) and reported on the test patients' too.

Intervals: 95% percentiles of a patient-level bootstrap (patients resampled with all their
rows; one weight matrix for every metric and model, so comparisons are paired). The
paired bootstrap of the difference between M3T-LM and each ablation and baseline, at each
horizon and at every event, for AUROC and MAE, says "beats" only when its interval excludes 0.

Models: the baselines (training mean / prevalence, ridge + logistic regression and
gradient boosting on the numeric features and their mask), M3T-LM (the run), the
ablations (trained once with the run's hyperparameters and seed, cached in
``RUN/ablations/``): three with modalities left out, two single-task, and the one-moment
model trained on the 24-h rows only (what the stream policy replaces), and M3T-LM retrained
with further seeds (``RUN/seeds/<seed>/``): mean and spread of each figure over the seeds.
Subgroups (sex, age band, admission type) at 24 h.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from features import model_inputs as mi
from features.offline import HORIZONS
from trainer import data as D
from trainer import metrics as M
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
    "24-h-only training": dict(only_hours_after_admit=24.0),
}
BASELINES = ("mean / prevalence", "linear + logistic regression", "gradient boosting")
FULL = "M3T-LM"
EVERY_EVENT = "every event"
SUBGROUPS_AT = "24 h"
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, "80+"))
RATES = ("f1", "sensitivity", "specificity", "ppv", "npv")
SEED_FIGURES = ("auroc", "auprc", "f1", "slope", "ece", "mae", "r2")
BASELINE_ROWS_PER_STAY = 4  # training rows drawn per stay for the baselines (fitted once)


@dataclass(frozen=True)
class Predictions:
    los: np.ndarray | None  # remaining days per test row; None: the model has no LoS head
    prob: np.ndarray | None  # mortality per test row
    val_prob: np.ndarray | None  # mortality per validation row (for the thresholds)


class EvaluationError(RuntimeError):
    """The run folder lacks what evaluation needs."""


# --- where: horizons and every event ----------------------------------------------------------


def places(ds: D.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{place: (row index, row weight)}: each horizon's rows, and every event's."""
    a = ds.arrays
    kind = a["cutoff_kind"].astype(str) if "cutoff_kind" in a else np.full(len(ds), "horizon")
    hours = a["hours_after_admit"]
    out = {}
    for h in HORIZONS:
        rows = np.flatnonzero((kind == "horizon") & np.isclose(hours, h))
        out[f"{h:g} h"] = (rows, np.ones(len(rows)))
    rows = np.flatnonzero(kind == "event")
    _, inverse, counts = np.unique(a["hadm_id"][rows], return_inverse=True, return_counts=True)
    out[EVERY_EVENT] = (rows, 1.0 / counts[inverse] if len(rows) else np.ones(0))
    return out


def patient_hours(ds: D.Dataset) -> np.ndarray:
    """Hours of stay each row stands for (see the module docstring)."""
    a = ds.arrays
    return M.coverage_hours(a["hadm_id"], a["cutoff"].astype(np.float64), a[D.LABEL_LOS])


# --- predictions -------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, tensors: dict[str, torch.Tensor], batch_size: int = 512, device="cpu"):
    """(remaining days, mortality probability) as 1-D numpy arrays."""
    model = model.to(device).eval()
    n = len(tensors[D.LABEL_LOS])
    los, prob = [], []
    for start in range(0, n, batch_size):
        batch = D.batch_at(tensors, torch.arange(start, min(start + batch_size, n)), device)
        days, mortality_prob = model.predict(*D.inputs_of(batch))
        los.append(days.squeeze(1).cpu().numpy())
        prob.append(mortality_prob.squeeze(1).cpu().numpy())
    return np.concatenate(los), np.concatenate(prob)


def model_predictions(checkpoint: Path, val: D.Dataset, test: D.Dataset, device) -> Predictions:
    model, ckpt = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(ckpt["train_config"])
    _, val_prob = predict(model, D.to_tensors(val, config.modalities), device=device)
    los, prob = predict(model, D.to_tensors(test, config.modalities), device=device)
    died = "mortality" in config.tasks
    return Predictions(
        los if "los" in config.tasks else None, prob if died else None, val_prob if died else None
    )


def numeric_design(ds: D.Dataset) -> np.ndarray:
    return np.concatenate([ds.arrays[mi.NUMERIC], ds.arrays[mi.NUMERIC_MASK]], axis=1)


def baseline_rows(ds: D.Dataset, seed: int) -> np.ndarray:
    """Training rows for the baselines: about ``BASELINE_ROWS_PER_STAY`` per stay, drawn with
    probability proportional to ``weight`` so that every stay counts alike."""
    weight = ds.arrays[D.WEIGHT].astype(np.float64)
    stays = len(np.unique(ds.arrays["hadm_id"]))
    rng = np.random.default_rng(seed)
    return rng.choice(len(ds), size=BASELINE_ROWS_PER_STAY * stays, p=weight / weight.sum())


def baseline_predictions(
    train_ds: D.Dataset, val: D.Dataset, test: D.Dataset, seed: int = 0
) -> dict[str, Predictions]:
    """Mean/prevalence, linear/logistic regression and gradient boosting on numeric features."""
    rows = baseline_rows(train_ds, seed)
    x_train = numeric_design(train_ds)[rows]
    x_val, x_test = numeric_design(val), numeric_design(test)
    los = train_ds.arrays[D.LABEL_LOS][rows].astype(np.float64)
    died = train_ds.arrays[D.LABEL_MORTALITY][rows]
    out = {
        BASELINES[0]: Predictions(
            np.full(len(test), los.mean()),
            np.full(len(test), died.mean()),
            np.full(len(val), died.mean()),
        )
    }
    models = {
        BASELINES[1]: (
            make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        ),
        BASELINES[2]: (
            HistGradientBoostingRegressor(random_state=seed),
            HistGradientBoostingClassifier(random_state=seed),
        ),
    }
    for name, (regressor, classifier) in models.items():
        regressor.fit(x_train, np.log1p(los))
        if len(np.unique(died)) == 2:
            classifier.fit(x_train, died)
            val_prob = classifier.predict_proba(x_val)[:, 1]
            prob = classifier.predict_proba(x_test)[:, 1]
        else:  # one class in training: the classifier cannot fit; predict the prevalence
            val_prob, prob = np.full(len(val), died.mean()), np.full(len(test), died.mean())
        out[name] = Predictions(
            np.clip(np.expm1(regressor.predict(x_test)), 0, None), prob, val_prob
        )
    return out


# --- figures -------------------------------------------------------------------------------------


def _figure(samples: np.ndarray) -> dict:
    """{value, lo, hi} from [point, resample 1, ...]; JSON has no NaN: undefined is null."""
    lo, hi = M.interval(samples[1:]) if len(samples) > 1 else (np.nan, np.nan)
    return {"value": _number(samples[0]), "lo": _number(lo), "hi": _number(hi)}


def _number(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _at_threshold(died, prob, w, threshold: float) -> dict:
    rates = M.confusion(died, prob >= threshold, w)
    return {"threshold": float(threshold), **{k: _figure(rates[k]) for k in RATES}}


def place_figures(
    pred: Predictions,
    died: np.ndarray,
    los: np.ndarray,
    w: np.ndarray,
    f1_threshold: float | None,
    alert: float | None,
) -> dict:
    """Every figure of one model at one place; ``w``: [point weights, resamples...]."""
    out = {}
    if pred.prob is not None:
        p = pred.prob
        intercept, slope = M.calibration_fit(died, p, w)
        out["mortality"] = {
            "auroc": _figure(M.auroc(died, p, w)),
            "auprc": _figure(M.auprc(died, p, w)),
            "brier": _figure(M.brier(died, p, w)),
        }
        out["calibration"] = {
            "slope": _figure(slope),
            "intercept": _figure(intercept),
            "ece": _figure(M.ece(died, p, w)),
        }
        out["at_f1_threshold"] = _at_threshold(died, p, w, f1_threshold)
        out["at_alert_threshold"] = _at_threshold(died, p, w, alert)
    if pred.los is not None:
        out["los_remaining"] = {k: _figure(v) for k, v in M.regression(los, pred.los, w).items()}
    return out


def _difference(a: np.ndarray, b: np.ndarray, better: str) -> dict:
    """M3T-LM's figure minus the other's, with its interval and what it shows."""
    figure = _figure(a - b)
    lo, hi = figure["lo"], figure["hi"]
    if lo is None:
        verdict = "undefined"
    elif (lo > 0) if better == "higher" else (hi < 0):
        verdict = "M3T-LM better (interval excludes 0)"
    elif (hi < 0) if better == "higher" else (lo > 0):
        verdict = "M3T-LM worse (interval excludes 0)"
    else:
        verdict = "no difference shown (interval contains 0)"
    return {"difference": figure, "verdict": verdict}


def paired(place: str, predictions: dict, died, los, w) -> list[dict]:
    ours = predictions[FULL]
    out = []
    for name, pred in predictions.items():
        if name == FULL:
            continue
        if pred.prob is not None:
            diff = _difference(M.auroc(died, ours.prob, w), M.auroc(died, pred.prob, w), "higher")
            out.append({"slice": place, "metric": "auroc", "other": name, **diff})
        if pred.los is not None:
            a, b = (M.regression(los, x, w)["mae"] for x in (ours.los, pred.los))
            out.append(
                {"slice": place, "metric": "mae", "other": name, **_difference(a, b, "lower")}
            )
    return out


def subgroups(test: D.Dataset, rows, pred: Predictions, w: np.ndarray) -> list[dict]:
    """M3T-LM at 24 h by sex, age band and admission type."""
    a = test.arrays
    died, los = a[D.LABEL_MORTALITY][rows], a[D.LABEL_LOS][rows]
    groups = []
    if "sex" in a:
        sex = a["sex"][rows].astype(str)
        groups += [("sex", v or "unknown", sex == v) for v in np.unique(sex)]
    if "age" in a:
        age = a["age"][rows].astype(np.float64)
        groups += [("age", label, (age >= lo) & (age < hi)) for lo, hi, label in AGE_BANDS]
        groups.append(("age", "unknown", ~np.isfinite(age)))
    if "admission_type" in a:
        kind = a["admission_type"][rows].astype(str)
        groups += [("admission type", v or "unknown", kind == v) for v in np.unique(kind)]
    out = []
    for group, value, member in groups:
        if not member.any():
            continue
        wm = w[:, member]
        prob, days = pred.prob[rows][member], pred.los[rows][member]
        out.append(
            {
                "group": group,
                "value": str(value),
                "stays": int(member.sum()),
                "deaths": int(died[member].sum()),
                "observed_mortality": float(died[member].mean()),
                "mean_predicted": float(prob.mean()),
                "auroc": _figure(M.auroc(died[member], prob, wm)),
                "mae": _figure(M.regression(los[member], days, wm)["mae"]),
            }
        )
    return out


def seed_spread(per_seed: dict[int, Predictions], test: D.Dataset, val: D.Dataset) -> dict:
    """Point figures of each seed's M3T-LM per place, and their mean and SD."""
    a = test.arrays
    out = {}
    test_places, val_places = places(test), places(val)
    for place, (rows, weight) in test_places.items():
        if not len(rows):
            continue
        w = M.point_weights(weight)
        died, los = a[D.LABEL_MORTALITY][rows], a[D.LABEL_LOS][rows]
        val_rows, val_weight = val_places[place]
        values = {k: [] for k in SEED_FIGURES}
        for pred in per_seed.values():
            p = pred.prob[rows]
            cut = M.best_f1_threshold(
                val.arrays[D.LABEL_MORTALITY][val_rows], pred.val_prob[val_rows], val_weight
            )
            intercept, slope = M.calibration_fit(died, p, w)
            figures = {
                "auroc": M.auroc(died, p, w),
                "auprc": M.auprc(died, p, w),
                "f1": M.confusion(died, p >= cut, w)["f1"],
                "slope": slope,
                "ece": M.ece(died, p, w),
                **{k: v for k, v in M.regression(los, pred.los[rows], w).items() if k != "rmse"},
            }
            for k in SEED_FIGURES:
                values[k].append(_number(figures[k][0]))
        out[place] = {k: _spread(v) for k, v in values.items()}
    return out


def _spread(values: list[float | None]) -> dict:
    """Mean and SD over the seeds where the figure is defined."""
    defined = np.array([v for v in values if v is not None], dtype=float)
    return {
        "mean": float(defined.mean()) if len(defined) else None,
        "sd": float(defined.std(ddof=1)) if len(defined) > 1 else None,
        "values": values,
    }


# --- training what is compared -------------------------------------------------------------------


def split_from_run(dataset: D.Dataset, run_dir: Path) -> dict[str, D.Dataset]:
    path = Path(run_dir) / "split.json"
    if not path.exists():
        raise EvaluationError(f"{path} not found: is {run_dir} a training run folder?")
    subjects = json.loads(path.read_text())
    ids = dataset.arrays["subject_id"]
    return {name: dataset.subset(np.flatnonzero(np.isin(ids, subjects[name]))) for name in D.SPLITS}


def _run_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    _, ckpt = load_checkpoint(Path(run_dir) / "best.pt")
    overrides = {
        k: v
        for k, v in ckpt["model_config"].items()
        if k not in ("n_features", "vocab_size", "modalities")
    }
    return TrainConfig.from_dict(ckpt["train_config"]), overrides


def _train_one(data_dir: Path, folder: Path, config: TrainConfig, overrides: dict) -> None:
    """A training in a worker process: the dataset is read there, not sent over a pipe."""
    train(D.load_dataset(data_dir), folder, config, overrides, progress=False)


def _train_missing(dataset: D.Dataset, jobs: dict[Path, TrainConfig], overrides, progress, workers):
    """Trains every job whose ``best.pt`` is missing; ``workers`` > 1 trains that many at once,
    each in its own process (a training is deterministic, so its result is the same)."""
    missing = {
        folder: config for folder, config in jobs.items() if not (folder / "best.pt").exists()
    }
    if workers > 1 and len(missing) > 1 and dataset.folder is not None:
        context = multiprocessing.get_context("spawn")  # no forked OpenMP or torch state
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=context) as pool:
            for done in [
                pool.submit(_train_one, dataset.folder, folder, config, overrides)
                for folder, config in missing.items()
            ]:
                done.result()
    else:
        for folder, config in missing.items():
            train(dataset, folder, config, overrides, progress)


def ablation_jobs(
    run_dir: Path, base: TrainConfig, names=tuple(ABLATIONS)
) -> dict[str, tuple[Path, TrainConfig]]:
    """{name: (folder, config)}: each ablation of the run (config ``base``) in
    ``run_dir/ablations/<name>/``."""
    return {
        name: (
            Path(run_dir) / "ablations" / name.replace(" ", "_").replace("/", ""),
            ablation_config(base, **ABLATIONS[name]),
        )
        for name in names
    }


def seed_list(own: int, n: int) -> list[int]:
    """The run's own seed, then the lowest others: seeds 0, 1, 2 for a run of seed 0."""
    others = [s for s in range(n + 1) if s != own]
    return [own] + others[: n - 1]


def seed_jobs(run_dir: Path, base: TrainConfig, n: int) -> dict[int, tuple[Path, TrainConfig]]:
    """{seed: (folder, config)}: the run (config ``base``) retrained with the further seeds in
    RUN/seeds/<seed>/."""
    return {
        seed: (Path(run_dir) / "seeds" / str(seed), replace(base, seed=seed))
        for seed in seed_list(base.seed, n)[1:]
    }


def train_compared(
    dataset: D.Dataset,
    run_dir: Path,
    ablations=tuple(ABLATIONS),
    seeds: int = 1,
    progress: bool = True,
    workers: int = 1,
) -> tuple[dict[str, Path], dict[int, Path]]:
    """Trains what is missing of the ablations and the further seeds (cached in the run
    folder) and returns their ``best.pt`` by name and by seed, the run's own seed included."""
    base, overrides = _run_config(run_dir)
    by_name = ablation_jobs(run_dir, base, ablations)
    by_seed = seed_jobs(run_dir, base, seeds)
    jobs = dict([*by_name.values(), *by_seed.values()])
    _train_missing(dataset, jobs, overrides, progress, workers)
    return (
        {name: folder / "best.pt" for name, (folder, _) in by_name.items()},
        {base.seed: Path(run_dir) / "best.pt"}
        | {seed: folder / "best.pt" for seed, (folder, _) in by_seed.items()},
    )


# --- the evaluation ------------------------------------------------------------------------------


def evaluate_run(
    dataset: D.Dataset,
    run_dir: Path,
    ablations: bool = True,
    seeds: int = 3,
    n_boot: int = 500,
    alerts_per_100: float = 5.0,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    stem: str = "evaluation",
    threads: int | None = 1,
    workers: int = 1,
) -> dict:
    """The evaluation as JSON-ready data; also writes ``<stem>.json``, ``<stem>.md`` and the
    plots into the run folder. Ablations and further seeds are trained first where missing,
    ``workers`` at a time (each in its own process, reading the dataset from its folder)."""
    run_dir = Path(run_dir)
    device = resolve_device(device)
    if not (run_dir / "best.pt").exists():
        raise EvaluationError(f"{run_dir / 'best.pt'} not found: train first with `m3t train run`")
    parts = split_from_run(dataset, run_dir)
    val, test = parts["val"], parts["test"]
    if len(test) == 0 or len(val) == 0:
        raise EvaluationError("the validation or test split is empty")

    # sklearn's OpenMP threads spin against other processes on a shared host as torch's do
    # (trainer/README.md): the baselines get the same thread count as the models.
    with threadpool_limits(threads):
        predictions = baseline_predictions(parts["train"], val, test, seed)
    per_seed = {}
    with torch_threads(threads):
        predictions[FULL] = model_predictions(run_dir / "best.pt", val, test, device)
        by_name, by_seed = train_compared(
            dataset, run_dir, tuple(ABLATIONS) if ablations else (), seeds, progress, workers
        )
        for name, path in by_name.items():
            predictions[name] = model_predictions(path, val, test, device)
        if seeds > 1:
            for s, path in by_seed.items():
                per_seed[s] = model_predictions(path, val, test, device)

    a, av = test.arrays, val.arrays
    val_hours, test_hours = patient_hours(val), patient_hours(test)
    alerts = {}
    for name, pred in predictions.items():
        if pred.prob is not None:
            cut = M.alert_threshold(pred.val_prob, val_hours, alerts_per_100)
            alerts[name] = {
                "threshold": cut,
                "validation_per_100_patient_days": M.alerts_per_100_patient_days(
                    pred.val_prob, val_hours, cut
                ),
                "test_per_100_patient_days": M.alerts_per_100_patient_days(
                    pred.prob, test_hours, cut
                ),
            }

    slices, comparisons, groups, reliability = {}, [], [], {}
    val_places = places(val)
    for place, (rows, weight) in places(test).items():
        if not len(rows):
            slices[place] = {"stays": 0, "rows": 0, "models": {}}
            continue
        w = np.vstack(
            [
                M.point_weights(weight),
                M.patient_resamples(a["subject_id"][rows], n_boot, seed) * weight,
            ]
        )
        died, los = a[D.LABEL_MORTALITY][rows], a[D.LABEL_LOS][rows]
        val_rows, val_weight = val_places[place]
        models = {}
        for name, pred in predictions.items():
            at = Predictions(
                None if pred.los is None else pred.los[rows],
                None if pred.prob is None else pred.prob[rows],
                None,
            )
            f1_cut = None
            if pred.prob is not None:
                f1_cut = M.best_f1_threshold(
                    av[D.LABEL_MORTALITY][val_rows], pred.val_prob[val_rows], val_weight
                )
            alert = alerts.get(name, {}).get("threshold")
            models[name] = {
                "kind": _kind(name),
                **place_figures(at, died, los, w, f1_cut, alert),
            }
            if name == FULL:
                reliability[place] = M.reliability(died, at.prob, weight)
        comparisons += paired(
            place,
            {n: _rows_of(p, rows) for n, p in predictions.items()},
            died,
            los,
            w,
        )
        if place == SUBGROUPS_AT:
            groups = subgroups(test, rows, predictions[FULL], w)
        slices[place] = {
            "stays": int(len(np.unique(a["hadm_id"][rows]))),
            "rows": int(len(rows)),
            "patients": int(len(np.unique(a["subject_id"][rows]))),
            "deaths": int(len(np.unique(a["hadm_id"][rows][died > 0]))),
            "models": models,
        }

    table = {
        "test": {
            "rows": int(len(test)),
            "admissions": int(len(np.unique(a["hadm_id"]))),
            "patients": int(len(np.unique(a["subject_id"]))),
            "mortality_per_stay": float(_per_stay(a["hadm_id"], a[D.LABEL_MORTALITY]).mean()),
        },
        "cohort": cohort(test),
        "counting": {
            "horizon": "rows of kind 'horizon' at that many hours after admission: one per stay",
            EVERY_EVENT: "rows of kind 'event'; each stay weighs 1, split over its event rows",
            "thresholds": "chosen on validation patients: F1-maximising per place; the alert "
            "threshold once per model",
            "patient_days": "each row covers its stay's time until the next row or discharge; "
            "alerts per 100 patient-days = 100 x the share of that time at or above the "
            "threshold (a once-daily review of the current score)",
        },
        "alerts": {"target_per_100_patient_days": alerts_per_100, "models": alerts},
        "bootstrap": {"resamples": n_boot, "unit": "patient", "interval": "95% percentile"},
        "slices": slices,
        "paired": comparisons,
        "subgroups": {SUBGROUPS_AT: groups},
        "seeds": {"seeds": sorted(per_seed), "slices": seed_spread(per_seed, test, val)}
        if per_seed
        else None,
    }
    (run_dir / f"{stem}.json").write_text(json.dumps(table, indent=2))
    from trainer.report import markdown_report

    (run_dir / f"{stem}.md").write_text(markdown_report(table))
    from trainer.plots import write_plots

    full = predictions[FULL]
    write_plots(run_dir, a[D.LABEL_LOS], full.los, reliability)
    return table


def _rows_of(pred: Predictions, rows: np.ndarray) -> Predictions:
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return Predictions(pick(pred.los), pick(pred.prob), None)


def _kind(name: str) -> str:
    return "baseline" if name in BASELINES else "m3t" if name == FULL else "ablation"


def _per_stay(hadm: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, first = np.unique(hadm, return_index=True)
    return values[first]


def cohort(test: D.Dataset) -> dict:
    """Who the test patients are, per stay: counts, sex, age, admission types, dates."""
    a = test.arrays
    _, first = np.unique(a["hadm_id"], return_index=True)
    out: dict = {"stays": int(len(first))}
    if "sex" in a:
        sex, counts = np.unique(a["sex"][first].astype(str), return_counts=True)
        out["sex"] = {(s or "unknown"): int(c) for s, c in zip(sex, counts)}
    if "age" in a:
        age = a["age"][first].astype(np.float64)
        if np.isfinite(age).any():
            out["age_median"] = float(np.nanmedian(age))
    if "admission_type" in a:
        kinds, counts = np.unique(a["admission_type"][first].astype(str), return_counts=True)
        out["admission_type"] = {(k or "unknown"): int(c) for k, c in zip(kinds, counts)}
    hours = a["cutoff"].astype(np.float64)
    first_day, last_day = (np.datetime64(int(h * 3600), "s") for h in (hours.min(), hours.max()))
    out["cutoffs_from"], out["cutoffs_to"] = str(first_day)[:10], str(last_day)[:10]
    return out
