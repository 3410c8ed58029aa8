"""The clinician-style evaluation: metric functions on hand-computed examples, the paired
bootstrap, and ``m3t train evaluate`` end to end on a small synthetic dataset."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from tests.tiny_model import TINY
from trainer import metrics as M
from trainer.synthetic import make_dataset, write_dataset
from trainer.train import TrainConfig, train


def one(values) -> float:
    (value,) = np.asarray(values)
    return float(value)


def test_confusion_rates_on_a_tiny_matrix():
    # 3 TP, 1 FN, 2 FP, 4 TN
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    flagged = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    rates = {k: one(v) for k, v in M.confusion(y, flagged, M.point_weights(np.ones(10))).items()}
    assert rates == pytest.approx(
        {
            "sensitivity": 3 / 4,
            "specificity": 4 / 6,
            "ppv": 3 / 5,
            "npv": 4 / 5,
            "f1": 6 / 9,
            "accuracy": 7 / 10,
        }
    )
    # Weights count a row that many times: the FN row weighted 3 gives sensitivity 3/6.
    weight = np.ones(10)
    weight[3] = 3
    assert one(M.confusion(y, flagged, M.point_weights(weight))["sensitivity"]) == 0.5


def test_weighted_discrimination_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.2
    score = np.round(rng.random(400), 2)  # ties
    weight = rng.random(400)
    w = M.point_weights(weight)
    assert one(M.auroc(y, score, w)) == pytest.approx(
        skm.roc_auc_score(y, score, sample_weight=weight)
    )
    assert one(M.auprc(y, score, w)) == pytest.approx(
        skm.average_precision_score(y, score, sample_weight=weight)
    )
    assert np.isnan(one(M.auroc(np.zeros(5), np.arange(5.0), M.point_weights(np.ones(5)))))


def test_the_f1_threshold_is_the_best_cut():
    y = np.array([0, 0, 1, 0, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    # p >= 0.8: F1 = 2*2/(2*2+0+1) = 0.8; p >= 0.3: 2*3/(6+1+0) = 0.857: the best.
    assert M.best_f1_threshold(y, prob) == 0.3
    assert M.best_f1_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5


def test_the_alert_threshold_gives_the_set_alerts_per_100_patient_days():
    # Two stays scored at 0, 10 and 20 h; stay 1 leaves at 30 h, stay 2 at 50 h.
    stay = np.array([1, 1, 1, 2, 2, 2])
    cutoff = np.array([0, 10, 20, 0, 10, 20], dtype=float)
    remaining = (np.array([30, 30, 30, 50, 50, 50]) - cutoff) / 24
    hours = M.coverage_hours(stay, cutoff, remaining)
    assert hours.tolist() == [10, 10, 10, 10, 10, 30]  # 80 patient-hours in all
    prob = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    # The top score covers 30 of 80 h: 37.5 alerts per 100 patient-days (once-daily review).
    assert M.alerts_per_100_patient_days(prob, hours, 0.9) == pytest.approx(37.5)
    assert M.alert_threshold(prob, hours, 40.0) == 0.9
    assert M.alert_threshold(prob, hours, 50.0) == 0.5  # 40 of 80 h
    assert M.alerts_per_100_patient_days(prob, hours, M.alert_threshold(prob, hours, 5.0)) == 0
    # On many rows the achieved rate meets the target closely.
    rng = np.random.default_rng(1)
    p, h = rng.random(5000), rng.uniform(1, 8, 5000)
    cut = M.alert_threshold(p, h, 5.0)
    assert 4.8 < M.alerts_per_100_patient_days(p, h, cut) <= 5.0


def test_perfectly_calibrated_probabilities_have_slope_1_intercept_0_and_small_ece():
    rng = np.random.default_rng(2)
    prob = rng.beta(1, 6, 40_000)
    died = rng.random(40_000) < prob
    w = M.point_weights(np.ones(40_000))
    intercept, slope = (one(v) for v in M.calibration_fit(died, prob, w))
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.1)
    assert one(M.ece(died, prob, w)) < 0.01
    # Overconfident predictions (logits doubled) give a slope near 1/2, and a larger ECE.
    logit = np.log(prob / (1 - prob))
    sharp = 1 / (1 + np.exp(-2 * logit))
    assert one(M.calibration_fit(died, sharp, w)[1]) == pytest.approx(0.5, abs=0.05)
    assert one(M.ece(died, sharp, w)) > 0.03
    bins = M.reliability(died, prob, np.ones(40_000))
    assert all(lo <= o <= hi for lo, o, hi in zip(bins["lo"], bins["observed"], bins["hi"]))
    assert np.allclose(bins["predicted"], bins["observed"], atol=0.02)


def test_regression_metrics():
    true = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([2.0, 2.0, 3.0, 2.0])
    r = {k: one(v) for k, v in M.regression(true, pred, M.point_weights(np.ones(4))).items()}
    assert r == pytest.approx({"mae": 0.75, "rmse": np.sqrt(5 / 4), "r2": 1 - 5 / 5})


def test_patient_resamples_draw_whole_patients():
    subject = np.array([7, 7, 7, 9, 9, 11])
    w = M.patient_resamples(subject, 200, seed=3)
    assert w.shape == (200, 6)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2]) and np.all(w[:, 3] == w[:, 4])
    assert np.all(w[:, [0, 3, 5]].sum(1) == 3)  # three patients drawn each time


def test_the_paired_bootstrap_of_identical_and_of_better_models():
    rng = np.random.default_rng(4)
    n = 600
    subject = np.arange(n) // 2
    died = rng.random(n) < 0.2
    noise = rng.normal(size=n)
    good = died + 0.6 * noise  # a better model: less noise
    poor = died + 1.5 * noise
    w = M.patient_resamples(subject, 300, seed=0)
    same = M.auroc(died, good, w) - M.auroc(died, good, w)
    assert M.interval(same) == (0.0, 0.0)
    lo, hi = M.interval(M.auroc(died, good, w) - M.auroc(died, poor, w))
    assert 0 < lo < hi
    los = rng.lognormal(1, 0.5, n)
    mae = lambda pred: M.regression(los, pred, w)["mae"]  # noqa: E731
    lo, hi = M.interval(mae(los + rng.normal(0, 0.2, n)) - mae(los + rng.normal(0, 1.0, n)))
    assert lo < hi < 0


# --- m3t train evaluate, end to end ------------------------------------------------------------


def at_horizons(dataset):
    """trainer.synthetic's rows of kind "horizon" moved to the horizon at or before them (one
    per stay and horizon; the rest become "grid"), as the builder places them."""
    from features.offline import HORIZONS
    from trainer.data import Dataset

    a = dict(dataset.arrays)
    kind, hours = a["cutoff_kind"].astype("<U8"), a["hours_after_admit"].copy()
    horizon = np.array([max([h for h in HORIZONS if h <= x], default=-1) for x in hours])
    kind[(kind == "horizon") & (horizon < 0)] = "grid"
    seen = set()
    for i in np.flatnonzero(kind == "horizon"):
        if (a["hadm_id"][i], horizon[i]) in seen:
            kind[i] = "grid"
        seen.add((a["hadm_id"][i], horizon[i]))
    moved = np.where(kind == "horizon", hours - horizon, 0.0)
    a["cutoff_kind"], a["hours_after_admit"] = kind, hours - moved
    a["cutoff"] = a["cutoff"] - moved
    a["los_remaining_days"] = (a["los_remaining_days"] + moved / 24).astype(np.float32)
    return Dataset(a, dataset.meta)


MODELS = [
    "mean / prevalence",
    "linear + logistic regression",
    "gradient boosting",
    "M3T-LM",
    "numeric only",
    "numeric + notes",
    "numeric + X-ray",
    "single-task LoS",
    "single-task mortality",
    "24-h-only training",
]


def test_evaluate_reports_every_place_seeds_pairs_and_subgroups_and_publish_carries_it(tmp_path):
    from trainer.cli import app, export_app

    data, run, repo = tmp_path / "data", tmp_path / "run", tmp_path / "repo"
    dataset = at_horizons(make_dataset(n=1500, seed=3, max_rows=6))
    write_dataset(dataset, data)
    train(dataset, run, TrainConfig(max_epochs=2), TINY, progress=False)
    evaluated = CliRunner().invoke(
        app,
        ["evaluate", "--data", str(data), "--run", str(run), "--bootstrap", "100", "--json"]
        + ["--workers", "2"],
    )
    assert evaluated.exit_code == 0, evaluated.output
    table = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert json.loads((run / "evaluation.json").read_text()) == table

    assert list(table["slices"]) == ["6 h", "12 h", "24 h", "48 h", "72 h", "every event"]
    for place, part in table["slices"].items():
        assert part["rows"] > 0 and list(part["models"]) == MODELS, place
        ours = part["models"]["M3T-LM"]
        assert set(ours) == {
            "kind",
            "mortality",
            "calibration",
            "at_f1_threshold",
            "at_alert_threshold",
            "los_remaining",
        }
        for figures in (ours["at_f1_threshold"], ours["at_alert_threshold"]):
            assert set(figures) == {"threshold", "f1", "sensitivity", "specificity", "ppv", "npv"}
        auroc = ours["mortality"]["auroc"]
        assert auroc["lo"] <= auroc["value"] <= auroc["hi"]
        assert "mortality" not in part["models"]["single-task LoS"]
        assert "los_remaining" not in part["models"]["single-task mortality"]
    horizon = table["slices"]["24 h"]
    assert horizon["rows"] == horizon["stays"]  # one row per stay at a horizon
    assert table["slices"]["every event"]["rows"] > table["slices"]["every event"]["stays"]

    alerts = table["alerts"]["models"]["M3T-LM"]
    assert table["alerts"]["target_per_100_patient_days"] == 5.0
    assert 3.0 < alerts["validation_per_100_patient_days"] <= 5.0

    # Paired: at every place, AUROC for each other model with a mortality head and MAE for
    # each with a LoS head; the verdict follows the interval.
    assert len(table["paired"]) == 6 * (8 + 8)
    for c in table["paired"]:
        d = c["difference"]
        excludes = d["lo"] > 0 or d["hi"] < 0
        assert c["verdict"].startswith("M3T-LM") == excludes, c

    groups = {(g["group"], g["value"]) for g in table["subgroups"]["24 h"]}
    assert {("sex", "F"), ("sex", "M"), ("admission type", "ELECTIVE")} <= groups
    assert {("age", band) for band in ("<50", "50-64", "65-79", "80+")} <= groups
    assert (
        sum(g["stays"] for g in table["subgroups"]["24 h"] if g["group"] == "sex")
        == (horizon["stays"])
    )

    # The one-moment model saw only the training stays' 24-h rows, each once per epoch.
    history = json.loads((run / "ablations" / "24-h-only_training" / "history.json").read_text())
    split = json.loads((run / "split.json").read_text())
    a = dataset.arrays
    at_24 = (a["cutoff_kind"] == "horizon") & (a["hours_after_admit"] == 24.0)
    in_train = np.isin(a["subject_id"], split["train"])
    assert {h["examples"] for h in history} == {int((at_24 & in_train).sum())}

    assert table["seeds"]["seeds"] == [0, 1, 2]
    assert all((run / "seeds" / str(s) / "best.pt").exists() for s in (1, 2))
    spread = table["seeds"]["slices"]["24 h"]["auroc"]
    assert len(spread["values"]) == 3 and spread["sd"] is not None
    assert (run / "plots" / "reliability.png").stat().st_size > 1000
    report = (run / "evaluation.md").read_text()
    for section in ("### 6 h", "### every event", "## Alert threshold", "## M3T-LM over seeds"):
        assert section in report
    assert "## Paired bootstrap" in report and "## Subgroups at 24 h" in report

    # The published version's model card carries these figures.
    published = CliRunner().invoke(export_app, ["publish", "--run", str(run), "--repo", str(repo)])
    assert published.exit_code == 0, published.output
    card = (repo / "m3t_lm" / "1" / "model_card.md").read_text()
    value = horizon["models"]["M3T-LM"]["mortality"]["auroc"]["value"]
    assert f"| 24 h | {horizon['stays']} | {value:.3f}" in card
    assert "Not validated on real patients" in card and "Known limits" in card
    assert json.loads((repo / "m3t_lm" / "1" / "model_card.json").read_text())["version"] == 1


def test_trainings_in_worker_processes_equal_those_in_process(tmp_path):
    import shutil

    import torch

    from trainer.data import load_dataset
    from trainer.evaluate import train_compared

    write_dataset(make_dataset(n=300, seed=5, max_rows=3), tmp_path / "data")
    dataset = load_dataset(tmp_path / "data")
    train(dataset, tmp_path / "one", TrainConfig(max_epochs=1), TINY, progress=False)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    names = ("numeric only", "single-task LoS")
    serial, _ = train_compared(dataset, tmp_path / "one", names, 2, progress=False, workers=1)
    parallel, seeds = train_compared(dataset, tmp_path / "two", names, 2, False, workers=2)
    assert set(seeds) == {0, 1} and seeds[1].exists()
    for name in names:
        a, b = (torch.load(p[name], weights_only=False)["state_dict"] for p in (serial, parallel))
        assert all(torch.equal(a[k], b[k]) for k in a), name
