"""The synthetic cohort: MIMIC-IV layout, deterministic, outcomes that each modality informs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ingest.cli import app
from ingest.mimic import MimicReader
from ingest.synth import generate

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


def test_event_counts_per_admission_stay_moderate(larger):
    _, admissions = larger
    observations = np.array([sum(e.type == "observation" for e in events) for events in admissions])
    assert 15 <= np.median(observations) <= 60 and observations.max() <= 80
    readmitted = sum(
        any(e.type == "note" and e.payload.note_type == "discharge" for e in ev)
        for ev in admissions
    )
    assert readmitted > 40  # the prior-summary stream exists


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


def test_cli_refuses_a_folder_that_is_not_mimic(tmp_path):
    result = CliRunner().invoke(app, ["mimic", str(tmp_path), "--dry-run"])
    assert result.exit_code == 1 and "hosp/admissions" in result.output


def test_every_ingest_command_has_help():
    runner = CliRunner()
    for command in ("mimic", "synth", "replay"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and len(result.output) > 200, command
