"""``m3t train protocol`` end to end on the bundled MIMIC-IV demo (a smoke test: at 100
patients its figures mean nothing), and its cohort rules on hand-made admissions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pandas as pd

from ingest.events import AdmissionEvent, DischargeEvent
from m3t.settings import PROJECT_ROOT, Settings
from trainer.protocol import Cohort

DEMO = Settings().data_dir / "mimic-iv-demo-2.2"


def _stay(hadm_id: int, age: float, discharged: bool = True) -> list:
    admit, leave = datetime(2150, 1, 1), datetime(2150, 1, 3)
    common = dict(hadm_id=hadm_id, subject_id=hadm_id + 1, source="test")
    events = [
        AdmissionEvent(
            event_id=f"a{hadm_id}",
            event_time=admit,
            payload=dict(admittime=admit, admission_type="EW EMER.", gender="F", age=age),
            **common,
        )
    ]
    if discharged:
        events.append(
            DischargeEvent(
                event_id=f"d{hadm_id}",
                event_time=leave,
                payload=dict(dischtime=leave, los_days=2.0, hospital_expire_flag=False),
                **common,
            )
        )
    return events


def test_cohort_keeps_adults_with_a_recorded_discharge():
    kept, left_out = Cohort().select(
        [_stay(1, 40.0), _stay(2, 17.0), _stay(3, 60.0, discharged=False), _stay(4, 18.0)]
    )
    assert [events[0].hadm_id for events in kept] == [1, 4]
    assert left_out == {"under_min_age": 1, "no_discharge_event": 1}
    kept, left_out = Cohort(require_cxr=True).select([_stay(1, 40.0)])
    assert kept == [] and left_out == {"no_cxr_during_stay": 1}


def test_protocol_runs_end_to_end_on_the_demo(tmp_path):
    out = tmp_path / "protocol"
    env = {**os.environ, "M3T_STATE_DIR": str(tmp_path / "state")}
    command = [sys.executable, "-m", "app.cli", "train", "protocol", "--mimic", str(DEMO)]
    command += ["--out", str(out), "--epochs", "2", "--seeds", "1", "--bootstrap", "20", "--json"]
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)

    # The cohort, counted independently from the demo's own tables.
    admissions = pd.read_csv(DEMO / "hosp" / "admissions.csv.gz")
    patients = pd.read_csv(DEMO / "hosp" / "patients.csv.gz")
    rows = admissions.merge(patients, on="subject_id")
    year = pd.to_datetime(rows.admittime).dt.year
    adults = rows[rows.anchor_age + (year - rows.anchor_year) >= 18]
    assert summary["cohort"]["admissions"] == len(adults)
    assert summary["cohort"]["patients"] == adults.subject_id.nunique()

    assert summary["dataset"]["examples"] > summary["cohort"]["admissions"]
    assert json.loads((out / "protocol.json").read_text()) == summary
    table = (out / "run" / "evaluation.md").read_text()
    assert "M3T-LM" in table and "numeric only" in table
    assert (out / "cohort" / "hosp").is_symlink()
