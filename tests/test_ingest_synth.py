"""The synthetic cohort: MIMIC-IV layout, deterministic, outcomes that each modality's
content informs, and event timing that says nothing about the outcome beyond the latent
state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from ingest.cli import app
from ingest.mimic import MimicReader
from ingest.synth import LAB_MODEL, RADIOLOGY_FINDINGS, VITAL_MODEL, generate, tables

TABLES = (
    "hosp/patients",
    "hosp/admissions",
    "hosp/labevents",
    "hosp/d_labitems",
    "icu/icustays",
    "icu/chartevents",
    "icu/d_items",
    "note/radiology",
    "note/discharge",
    "cxr-jpg/mimic-cxr-2.0.0-metadata",
    "truth",
)


def _digests(root: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((root / f"{name}.csv.gz").read_bytes()).hexdigest() for name in TABLES
    }


def test_same_seed_same_cohort_other_seed_other_cohort(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(tmp_path / name, 12, seed, image_size=64, dicom=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a")["hosp/labevents"] != _digests(tmp_path / "c")["hosp/labevents"]
    images = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert images and all(
        (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in images
    )


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """400 admissions (small images, no DICOM) and what the reader makes of them."""
    out = tmp_path_factory.mktemp("synth400")
    summary = generate(out, 400, seed=11, image_size=64, dicom=False)
    admissions = list(MimicReader(out).admissions())
    return summary, admissions


def _features(events) -> dict:
    """One number per modality, the way a model might summarise it, plus the outcome."""
    creatinine = [
        e.payload.value for e in events if e.type == "observation" and e.payload.itemid == 50912
    ]
    reports = [
        e.payload.text for e in events if e.type == "note" and e.payload.note_type == "radiology"
    ]
    images = [
        np.asarray(Image.open(e.payload.uri.removeprefix("file://")), dtype=float)
        for e in events
        if e.type == "cxr"
    ]
    grade = [
        ("consolidation" in t or "airspace" in t) * 3
        + ("pneumonia" in t or "infection" in t) * 1
        + ("atelectasis" in t) * 0.5
        for t in reports
    ]
    lower_lungs = [img[int(img.shape[0] * 0.5) : int(img.shape[0] * 0.75)].mean() for img in images]
    return {
        "lab": np.mean(creatinine) if creatinine else np.nan,
        "note": np.mean(grade) if grade else np.nan,
        "image": np.mean(lower_lungs) if lower_lungs else np.nan,
        "log_los": np.log(events[-1].payload.los_days),
    }


def test_every_modality_informs_the_outcome_and_together_they_inform_more(larger):
    summary, admissions = larger
    assert summary.admissions == len(admissions) == 400 and summary.deaths > 0
    rows = [_features(events) for events in admissions]
    table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    complete = ~(np.isnan(table["lab"]) | np.isnan(table["note"]) | np.isnan(table["image"]))
    assert 0.5 < complete.mean() < 0.9  # some admissions lack notes and images
    y = table["log_los"][complete]

    def r2(*names):
        x = np.column_stack([np.ones(complete.sum())] + [table[n][complete] for n in names])
        residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return 1 - residual.var() / y.var()

    for name in ("lab", "note", "image"):
        assert np.corrcoef(table[name][complete], y)[0, 1] > 0.2, name
    assert r2("lab", "note", "image") > max(r2("lab"), r2("note"), r2("image")) + 0.05


def test_event_counts_per_day_of_stay_stay_moderate(larger):
    _, admissions = larger
    observations = np.array([sum(e.type == "observation" for e in events) for events in admissions])
    days = np.array([events[-1].payload.los_days for events in admissions])
    per_day = observations / days
    # Ward patients: about two lab panels a day; ICU patients add vitals every 4 h.
    assert 8 <= np.median(per_day) <= 25 and per_day.max() <= 100
    readmitted = sum(
        any(e.type == "note" and e.payload.note_type == "discharge" for e in ev)
        for ev in admissions
    )
    assert readmitted > 40  # the prior-summary stream exists


# --------------------------------------------------------------------------- timing


CUTOFF_HOURS = 24.0


@pytest.fixture(scope="module")
def at_cutoff():
    """3,000 admissions (tables only): what is visible 24 h after admission, by
    availability time, for the stays still open then, with their latent state."""
    t = tables(3000, seed=21)
    adm = t.admissions.set_index("hadm_id")
    cutoff = pd.to_datetime(adm.admittime) + pd.Timedelta(hours=CUTOFF_HOURS)
    still_open = adm.index[pd.to_datetime(adm.dischtime) > cutoff]

    def visible(frame: pd.DataFrame, when: str) -> pd.DataFrame:
        frame = frame[frame.hadm_id.notna()]
        hadm = frame.hadm_id.astype("int64")
        seen = pd.to_datetime(frame[when]).to_numpy() <= cutoff.reindex(hadm).to_numpy()
        return frame[seen].assign(hadm_id=hadm[seen])

    def count(frame: pd.DataFrame) -> pd.Series:
        return frame.hadm_id.value_counts().reindex(still_open, fill_value=0)

    labs = t.labevents[t.labevents.itemid.isin(list(LAB_MODEL)) & t.labevents.valuenum.notna()]
    vitals = t.chartevents[t.chartevents.itemid.isin(list(VITAL_MODEL))]
    labs, vitals = visible(labs, "storetime"), visible(vitals, "storetime")
    studies, reports = visible(t.studies, "studytime"), visible(t.radiology, "storetime")
    counts = pd.DataFrame(
        {
            "labs": count(labs),
            "vitals": count(vitals),
            "studies": count(studies),
            "reports": count(reports),
        }
    )
    # Content, summarised the way a model might: the labs' mean deviation in units of
    # their effect, the reports' mean grade read back from the text, the latest image.
    base = labs.itemid.map({k: v[0] for k, v in LAB_MODEL.items()})
    effect = labs.itemid.map({k: v[2] for k, v in LAB_MODEL.items()})
    grade = reports.text.map(_report_grade)
    content = pd.DataFrame(
        {
            "lab": ((labs.valuenum - base) / effect).groupby(labs.hadm_id).mean(),
            "report": grade.groupby(reports.hadm_id).mean(),
            "image": studies.groupby("hadm_id").image_signal.last(),
        }
    ).reindex(still_open)
    truth = t.truth.set_index("hadm_id").loc[still_open]
    return counts, content, truth


def _report_grade(text: str) -> int:
    return max(g for g, phrases in enumerate(RADIOLOGY_FINDINGS) if any(p in text for p in phrases))


def _logistic_loglik(x: np.ndarray, y: np.ndarray) -> float:
    """Maximised log-likelihood of an unpenalised logistic regression (Newton steps)."""
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ beta))
        hessian = x.T @ (x * (p * (1 - p))[:, None])
        step = np.linalg.lstsq(hessian, x.T @ (y - p), rcond=None)[0]  # collinear columns ok
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    p = np.clip(1 / (1 + np.exp(-x @ beta)), 1e-12, 1 - 1e-12)
    return float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _gaussian_loglik(x: np.ndarray, y: np.ndarray) -> float:
    """Maximised log-likelihood of a least-squares fit, up to a constant."""
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return -len(y) / 2 * np.log(residual @ residual / len(y))


def _gain_p(loglik, base: np.ndarray, extra: np.ndarray, y: np.ndarray) -> float:
    """p-value of a likelihood-ratio test: does ``extra`` predict ``y`` beyond ``base``?"""
    full = np.column_stack([base, extra])
    statistic = 2 * (loglik(full, y) - loglik(base, y))
    df = np.linalg.matrix_rank(full) - np.linalg.matrix_rank(base)
    return float(stats.chi2.sf(statistic, df))


def _timing_gain(truth: pd.DataFrame, counts: np.ndarray) -> tuple[float, float]:
    """p-values of the counts' gain over the latent state, for death and for log remaining
    LoS. The latent state enters through each outcome's linear predictor: death's logit is
    linear in it; among stays open at the cutoff, log remaining LoS has a mean that is a
    smooth function of LoS's (a cubic is close enough)."""
    one = np.ones(len(truth))
    features = np.log1p(counts)
    death = _gain_p(
        _logistic_loglik,
        np.column_stack([one, truth.death_logit]),
        features,
        truth.died.to_numpy(float),
    )
    mu = truth.los_mu.to_numpy()
    remaining = np.log(truth.los_days.to_numpy() - CUTOFF_HOURS / 24)
    los = _gain_p(_gaussian_loglik, np.column_stack([one, mu, mu**2, mu**3]), features, remaining)
    return death, los


def test_timing_carries_nothing_about_the_outcome_beyond_the_latent_state(at_cutoff):
    counts, _, truth = at_cutoff
    assert len(truth) > 2800 and 0.04 < truth.died.mean() < 0.11
    assert (counts.mean() > [10, 2, 0.5, 0.5]).all()  # every kind of event is there by 24 h
    # The counts do follow the state (sicker patients are watched more) ...
    latent = np.column_stack([np.ones(len(truth)), truth.s, truth.v])
    assert _gain_p(_gaussian_loglik, latent[:, :1], latent[:, 1:], np.log1p(counts.labs)) < 1e-6
    # ... but add nothing to it about death or the remaining stay.
    death, los = _timing_gain(truth, counts.to_numpy(float))
    assert death > 0.01 and los > 0.01, (death, los)


def test_the_timing_check_catches_the_old_generators_leak(at_cutoff):
    """The old placement (first study at a fraction of min(LoS, 96 h), the second at a
    fraction of what remains) on the same stays, and a planted death leak."""
    counts, _, truth = at_cutoff
    rng = np.random.default_rng(0)
    hours = truth.los_days.to_numpy() * 24
    n = rng.choice([0, 1, 2], size=len(hours), p=[0.3, 0.5, 0.2])
    first = rng.uniform(0.05, 0.5, len(hours)) * np.minimum(hours, 96)
    second = first + rng.uniform(0.5, 0.9, len(hours)) * (hours - first)
    leaky = counts.assign(studies=(n >= 1) * (first <= 24) + (n >= 2) * (second <= 24))
    _, los = _timing_gain(truth, leaky.to_numpy(float))
    assert los < 1e-6
    # Notes that come more often to those who will die.
    reports = rng.poisson(np.where(truth.died, 1.5, 0.8))
    death, _ = _timing_gain(truth, counts.assign(reports=reports).to_numpy(float))
    assert death < 1e-3


def test_each_modalitys_content_informs_the_outcome_beyond_the_others(at_cutoff):
    _, content, truth = at_cutoff
    assert content.lab.notna().all() and 0.5 < content.report.notna().mean() < 0.9

    def filled(column):  # value (0 where missing) and a missing flag
        return np.column_stack([content[column].fillna(0), content[column].isna()])

    one = np.ones((len(truth), 1))
    lab = np.column_stack([one, content.lab])
    lab_report = np.column_stack([lab, filled("report")])
    remaining = np.log(truth.los_days.to_numpy() - CUTOFF_HOURS / 24)
    for loglik, y in (
        (_logistic_loglik, truth.died.to_numpy(float)),
        (_gaussian_loglik, remaining),
    ):
        assert _gain_p(loglik, one, content.lab, y) < 1e-6
        assert _gain_p(loglik, lab, filled("report"), y) < 1e-4
        assert _gain_p(loglik, lab_report, filled("image"), y) < 1e-4


def test_events_fall_inside_the_stay_and_are_stored_after_they_happen():
    t = tables(300, seed=4)
    adm = t.admissions.set_index("hadm_id")
    admit, disch = pd.to_datetime(adm.admittime), pd.to_datetime(adm.dischtime)
    labs = t.labevents[t.labevents.hadm_id.notna() & t.labevents.valuenum.notna()]
    for frame, when in (
        (labs, "charttime"),
        (t.chartevents, "charttime"),
        (t.studies, "studytime"),
    ):
        hadm = frame.hadm_id.astype("int64")
        time = pd.to_datetime(frame[when]).to_numpy()
        assert (time >= admit.reindex(hadm).to_numpy()).all(), when
        assert (time <= disch.reindex(hadm).to_numpy()).all(), when
    stays = t.icustays
    assert (pd.to_datetime(stays.outtime) <= disch.reindex(stays.hadm_id).to_numpy()).all()
    for frame in (t.labevents, t.chartevents, t.radiology, t.discharge):
        delay = pd.to_datetime(frame.storetime) - pd.to_datetime(frame.charttime)
        assert (delay >= pd.Timedelta(0)).all() and delay.nunique() > 10
    assert set(t.truth.hadm_id) == set(adm.index)


def test_cli_synth_then_dry_run_reads_it_back(tmp_path):
    runner = CliRunner()
    made = runner.invoke(
        app,
        [
            "synth",
            "--admissions",
            "8",
            "--seed",
            "2",
            "--out",
            str(tmp_path / "c"),
            "--image-size",
            "64",
            "--json",
        ],
    )
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["admissions"] == 8
    dead = tmp_path / "dead.jsonl"
    read = runner.invoke(
        app, ["mimic", str(tmp_path / "c"), "--dry-run", "--json", "--dead-letter-file", str(dead)]
    )
    assert read.exit_code == 0, read.output
    summary = json.loads(read.stdout)
    assert (
        summary["balanced"]
        and summary["events"]["admission"] == 8
        and summary["dead_letters"] == {}
    )
    assert dead.exists() and dead.read_text() == ""
    assert set(summary["tables"]) >= {
        "hosp/labevents",
        "icu/chartevents",
        "note/radiology",
        "cxr-jpg/mimic-cxr-2.0.0-metadata",
    }
    assert (tmp_path / "c/truth.csv.gz").is_file() and not any(
        "truth" in t for t in summary["tables"]
    )


def test_cli_refuses_a_folder_that_is_not_mimic(tmp_path):
    result = CliRunner().invoke(app, ["mimic", str(tmp_path), "--dry-run"])
    assert result.exit_code == 1 and "hosp/admissions" in result.output


def test_every_ingest_command_has_help():
    runner = CliRunner()
    for command in ("mimic", "synth", "replay"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and len(result.output) > 200, command
