"""A synthetic multimodal cohort, written in the MIMIC-IV layout so ``MimicReader`` loads it.

Output (under ``out``)::

    hosp/{patients,admissions,labevents,d_labitems}.csv.gz
    icu/{icustays,chartevents,d_items}.csv.gz
    note/{radiology,discharge}.csv.gz
    cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz + files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    cxr-dicom/cxr-record-list.csv.gz        + files/pXX/pSUBJECT/sSTUDY/DICOM.dcm

Generative model (one ``numpy.random.Generator``; gzip headers carry no timestamp, so a
seed fixes the bytes of every table):

- Each patient has a frailty ``f ~ N(0, 1)`` and 1 + Poisson(0.45) admissions. Each
  admission has a severity ``s = 0.6 f + 0.8 e`` (``e ~ N(0, 1)``), so a patient's earlier
  stays say something about the next one, and three modality-specific signals
  ``u_lab, u_note, u_img ~ N(0, 1)``, independent of each other and of ``s``.
- Labs and vitals express ``L = s + u_lab``: creatinine, BUN, lactate, WBC, glucose,
  potassium, heart rate, respiratory rate and temperature rise with ``L``; bicarbonate,
  haemoglobin, platelets, sodium, blood pressure and SpO2 fall. Labs also *trend* over the
  stay at a rate proportional to ``L`` (rising creatinine and lactate when ``L > 0``). Up to
  3 panels, 12 h apart; ICU stays (more likely when ``s`` is high) add vitals every 6 h for
  a day. About 20-60 observations per admission.
- Radiology reports express ``R = s + u_note + N(0, 0.5)`` through graded phrases, from
  "No acute cardiopulmonary process" to "Worsening bilateral consolidation".
- Chest radiographs express ``I = s + u_img + N(0, 0.3)``: an opacity blob in a lower
  lung field whose brightness grows with ``I``, on both sides when ``I > 1.2``. 70% of
  admissions have one or two studies, each with a report; the others lack both.
- Discharge summaries express the admission's own ``s`` (graded hospital-course phrases);
  the reader hands them to the patient's next admission as the prior-summary stream.
- Outcomes, with ``a`` the standardised age::

      los_days = exp(1.3 + 0.30 s + 0.15 (u_lab + u_note + u_img) + 0.1 a + N(0, 0.25))
      logit P(death) = -3.0 + 0.9 s + 0.45 (u_lab + u_note + u_img) + 0.3 a

  so each modality carries signal about the outcome that no other modality has, and the
  combination carries the most. Death is drawn only on a patient's last admission (the
  dead are not readmitted).
- Admission type leans on ``s`` too (elective when mild, emergency when severe).
- Noise rows exercise the reader's counted skips: a chloride (known, unused item) in every
  panel, outpatient creatinines without ``hadm_id``, and text-only results ("NEG").

DICOM copies of every radiograph alternate CR (PA) and DX (AP, portable) modalities; one
in four is uncompressed (Explicit VR Little Endian), the rest baseline JPEG encapsulated.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ingest import itemids
from ingest.mimic import CXR_METADATA, cxr_image_path

# Lab generation: (baseline, within-patient sd, effect per unit L, trend per day per unit L)
LAB_MODEL: dict[int, tuple[float, float, float, float]] = {
    50912: (1.0, 0.15, 0.30, 0.20),  # creatinine
    51006: (18.0, 4.0, 8.0, 4.0),  # BUN
    50983: (139.0, 2.5, -1.5, 0.0),  # sodium
    50971: (4.1, 0.35, 0.15, 0.0),  # potassium
    50882: (25.0, 2.0, -2.5, -1.0),  # bicarbonate
    50931: (125.0, 25.0, 15.0, 0.0),  # glucose
    51222: (11.5, 1.0, -0.6, -0.2),  # hemoglobin
    51301: (8.5, 2.0, 2.5, 1.0),  # WBC
    51265: (230.0, 50.0, -25.0, -10.0),  # platelets
    50813: (1.3, 0.3, 0.6, 0.4),  # lactate
}
VITAL_MODEL: dict[int, tuple[float, float, float]] = {  # (baseline, sd, effect per unit L)
    220045: (82.0, 8.0, 9.0),
    220179: (122.0, 10.0, -9.0),
    220180: (68.0, 7.0, -5.0),
    220210: (17.0, 2.5, 2.5),
    220277: (97.0, 1.2, -1.5),
    223761: (98.5, 0.5, 0.6),
}
CHLORIDE = (50902, "Chloride", "Blood", "Chemistry", "mEq/L")  # a known item the model skips
NBP_MEAN = (220181, "Non Invasive Blood Pressure mean", "NBPm", "Routine Vital Signs", "mmHg")

RADIOLOGY_FINDINGS = (
    ("No acute cardiopulmonary process.", "Lungs are clear. No pleural effusion or pneumothorax."),
    (
        "Mild bibasilar atelectasis. No focal consolidation.",
        "Minimal atelectasis at the lung bases.",
    ),
    (
        "Patchy right lower lobe opacity concerning for early pneumonia.",
        "Small left pleural effusion with adjacent opacity, possibly infection.",
    ),
    (
        "Worsening bilateral consolidation with moderate bilateral pleural effusions.",
        "Diffuse bilateral airspace opacities concerning for multifocal pneumonia or ARDS.",
    ),
)
COURSE = (
    "Uncomplicated hospital course; tolerated diet and ambulated independently.",
    "Treated for mild infection with oral antibiotics; improved steadily.",
    "Course complicated by acute kidney injury requiring IV fluids; slow recovery.",
    "Prolonged course complicated by septic shock requiring pressors and ICU care.",
)
CONDITION = (
    "Good, alert and ambulatory.",
    "Fair.",
    "Fair, deconditioned.",
    "Poor, requires assistance.",
)
INDICATIONS = ("shortness of breath", "fever", "cough", "chest pain", "hypoxia", "line placement")
ADMISSION_TYPES = ("ELECTIVE", "OBSERVATION ADMIT", "URGENT", "EW EMER.")
LOCATIONS = (
    "EMERGENCY ROOM",
    "TRANSFER FROM HOSPITAL",
    "PHYSICIAN REFERRAL",
    "WALK-IN/SELF REFERRAL",
)
INSURANCE = ("Medicare", "Medicaid", "Other")
CAREUNITS = (
    "Medical Intensive Care Unit (MICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
)
TIME = "%Y-%m-%d %H:%M:%S"


@dataclass
class SynthSummary:
    out: str
    patients: int = 0
    admissions: int = 0
    deaths: int = 0
    icu_stays: int = 0
    lab_rows: int = 0
    chart_rows: int = 0
    radiology_notes: int = 0
    discharge_notes: int = 0
    images: int = 0
    dicom_files: dict[str, int] = field(default_factory=dict)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- cohort tables


def _cohort(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients and admissions with their latent variables and outcomes."""
    counts = 1 + rng.poisson(0.45, size=n)
    counts = counts[: np.searchsorted(np.cumsum(counts), n) + 1]
    counts[-1] -= counts.sum() - n
    n_patients = len(counts)
    patients = pd.DataFrame(
        {
            "subject_id": 10_000_032 + 1_103 * np.arange(n_patients),
            "gender": np.where(rng.random(n_patients) < 0.5, "M", "F"),
            "anchor_age": rng.integers(18, 86, n_patients),
            "anchor_year": rng.integers(2110, 2180, n_patients),
            "frailty": rng.standard_normal(n_patients),
        }
    )
    patient = np.repeat(np.arange(n_patients), counts)
    order = np.concatenate([np.arange(c) for c in counts])
    last = order == np.repeat(counts - 1, counts)
    adm = pd.DataFrame({"patient": patient, "order": order, "last": last})
    adm["subject_id"] = patients.subject_id.to_numpy()[patient]
    adm["hadm_id"] = 20_000_019 + 3_301 * np.arange(n)
    adm["s"] = 0.6 * patients.frailty.to_numpy()[patient] + 0.8 * rng.standard_normal(n)
    for name in ("u_lab", "u_note", "u_img"):
        adm[name] = rng.standard_normal(n)
    u = adm.u_lab + adm.u_note + adm.u_img
    # Ages drift with the admission year below; the outcome uses the anchor age.
    age_z = (patients.anchor_age.to_numpy()[patient] - 52.0) / 20.0
    adm["los_days"] = np.clip(
        np.exp(1.3 + 0.30 * adm.s + 0.15 * u + 0.1 * age_z + 0.25 * rng.standard_normal(n)),
        0.25,
        90.0,
    )
    p_death = _sigmoid(-3.0 + 0.9 * adm.s + 0.45 * u + 0.3 * age_z)
    adm["died"] = (rng.random(n) < p_death) & last
    adm["has_icu"] = rng.random(n) < _sigmoid(-0.6 + 1.2 * adm.s)
    adm["admission_type"] = np.array(ADMISSION_TYPES)[
        _grade(adm.s + rng.standard_normal(n), (-1.0, 0.0, 1.0))
    ]
    adm["admission_location"] = rng.choice(LOCATIONS, n)
    adm["insurance"] = rng.choice(INSURANCE, n)

    # Admissions follow each other: the first starts within three years of the anchor
    # year; each next one 2 days to a few months after the previous discharge.
    start = np.array([datetime(int(y), 1, 1) for y in patients.anchor_year])[patient]
    first_offset = rng.uniform(0, 3 * 365, n)
    gap = 2 + rng.exponential(120, n)
    admittime, dischtime_prev = [], None
    for i in range(n):
        if order[i] == 0:
            t = start[i] + timedelta(days=float(first_offset[i]))
        else:
            t = dischtime_prev + timedelta(days=float(gap[i]))
        t = t.replace(second=0, microsecond=0)
        admittime.append(t)
        dischtime_prev = (t + timedelta(days=float(adm.los_days[i]))).replace(
            second=0, microsecond=0
        )
    adm["admittime"] = pd.to_datetime(admittime)
    adm["dischtime"] = (adm.admittime + pd.to_timedelta(adm.los_days, unit="D")).dt.floor("min")
    adm["los_days"] = (adm.dischtime - adm.admittime) / pd.Timedelta(days=1)
    return patients, adm


def _patients_table(patients: pd.DataFrame, adm: pd.DataFrame) -> pd.DataFrame:
    dod = adm[adm.died].set_index("patient").dischtime.dt.strftime("%Y-%m-%d")
    return pd.DataFrame(
        {
            "subject_id": patients.subject_id,
            "gender": patients.gender,
            "anchor_age": patients.anchor_age,
            "anchor_year": patients.anchor_year,
            "anchor_year_group": "2011 - 2013",
            "dod": dod.reindex(patients.index),
        }
    )


def _admissions_table(adm: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": adm.subject_id,
            "hadm_id": adm.hadm_id,
            "admittime": adm.admittime.dt.strftime(TIME),
            "dischtime": adm.dischtime.dt.strftime(TIME),
            "deathtime": adm.dischtime.dt.strftime(TIME).where(adm.died),
            "admission_type": adm.admission_type,
            "admit_provider_id": "P00000",
            "admission_location": adm.admission_location,
            "discharge_location": np.where(adm.died, "DIED", "HOME"),
            "insurance": adm.insurance,
            "language": "ENGLISH",
            "marital_status": None,
            "race": "UNKNOWN",
            "edregtime": None,
            "edouttime": None,
            "hospital_expire_flag": adm.died.astype(int),
        }
    )


def _labs(rng: np.random.Generator, adm: pd.DataFrame) -> pd.DataFrame:
    """Up to 3 panels 12 h apart (within the stay), plus noise rows the reader skips."""
    panels = np.clip((adm.los_days.to_numpy() * 24 - 2.5) // 12 + 1, 1, 3).astype(int)
    a = np.repeat(np.arange(len(adm)), panels)
    k = np.concatenate([np.arange(p) for p in panels])
    charttime = adm.admittime.to_numpy()[a] + pd.to_timedelta(
        0.5 + 12 * k + rng.uniform(0, 2, len(a)), unit="h"
    )
    L = (adm.s + adm.u_lab).to_numpy()[a]
    days = k / 2.0
    frames = []
    for itemid, (base, sd, effect, trend) in LAB_MODEL.items():
        present = rng.random(len(a)) < 0.92
        value = base + sd * rng.standard_normal(len(a)) + effect * L + trend * L * days
        item = itemids.ITEMS[itemid]
        value = np.clip(value, max(item.low, 0.1 * base), item.high)
        frames.append(_lab_rows(adm, a, itemid, charttime, np.round(value, 2), item.unit, present))
    chloride = 104 + 3 * rng.standard_normal(len(a))
    frames.append(
        _lab_rows(
            adm, a, CHLORIDE[0], charttime, np.round(chloride), CHLORIDE[4], np.ones(len(a), bool)
        )
    )
    # Text-only urine results and outpatient draws (no hadm_id): counted skips.
    text_only = rng.random(len(adm)) < 0.2
    t = adm.admittime[text_only] + pd.Timedelta(hours=3)
    frames.append(
        pd.DataFrame(
            {
                "subject_id": adm.subject_id[text_only],
                "hadm_id": adm.hadm_id[text_only],
                "itemid": 50912,
                "charttime": t,
                "value": "NEG",
                "valuenum": np.nan,
                "valueuom": "mg/dL",
            }
        )
    )
    outpatient = rng.random(len(adm)) < 0.3
    t = adm.admittime[outpatient] - pd.Timedelta(days=20)
    frames.append(
        pd.DataFrame(
            {
                "subject_id": adm.subject_id[outpatient],
                "hadm_id": np.nan,
                "itemid": 50912,
                "charttime": t,
                "value": "1.0",
                "valuenum": 1.0,
                "valueuom": "mg/dL",
            }
        )
    )
    labs = pd.concat(frames, ignore_index=True).sort_values(
        ["subject_id", "charttime"], kind="stable"
    )
    return pd.DataFrame(
        {
            "labevent_id": np.arange(1, len(labs) + 1),
            "subject_id": labs.subject_id.to_numpy(),
            "hadm_id": labs.hadm_id.astype("Int64").to_numpy(),
            "specimen_id": 1_000_000 + np.arange(len(labs)),
            "itemid": labs.itemid.to_numpy(),
            "order_provider_id": None,
            "charttime": labs.charttime.dt.strftime(TIME).to_numpy(),
            "storetime": (labs.charttime + pd.Timedelta(hours=1)).dt.strftime(TIME).to_numpy(),
            "value": labs.value.to_numpy(),
            "valuenum": labs.valuenum.to_numpy(),
            "valueuom": labs.valueuom.to_numpy(),
            "ref_range_lower": None,
            "ref_range_upper": None,
            "flag": None,
            "priority": "ROUTINE",
            "comments": None,
        }
    )


def _lab_rows(adm, a, itemid, charttime, value, unit, present) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": adm.subject_id.to_numpy()[a][present],
            "hadm_id": adm.hadm_id.to_numpy()[a][present],
            "itemid": itemid,
            "charttime": charttime[present],
            "value": value[present].astype(str),
            "valuenum": value[present],
            "valueuom": unit,
        }
    )


def _icu(rng: np.random.Generator, adm: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    icu = adm[adm.has_icu].reset_index(drop=True)
    stay_hours = icu.los_days * 24
    intime = icu.admittime + pd.to_timedelta(
        np.minimum(rng.uniform(1, 12, len(icu)), 0.3 * stay_hours), unit="h"
    )
    outtime = intime + pd.to_timedelta(
        np.minimum(rng.uniform(24, 96, len(icu)), 0.6 * stay_hours), unit="h"
    )
    stays = pd.DataFrame(
        {
            "subject_id": icu.subject_id,
            "hadm_id": icu.hadm_id,
            "stay_id": 30_000_007 + 7 * np.arange(len(icu)),
            "first_careunit": rng.choice(CAREUNITS, len(icu)),
            "last_careunit": None,
            "intime": intime.dt.strftime(TIME),
            "outtime": outtime.dt.strftime(TIME),
            "los": (outtime - intime) / pd.Timedelta(days=1),
        }
    )
    stays["last_careunit"] = stays.first_careunit
    # Vitals every 6 h for the first day of the ICU stay (5 sets), while still in the unit.
    k = np.tile(np.arange(5), len(icu))
    s = np.repeat(np.arange(len(icu)), 5)
    charttime = intime.to_numpy()[s] + pd.to_timedelta(6 * k, unit="h")
    inside = charttime <= outtime.to_numpy()[s]
    s, charttime = s[inside], charttime[inside]
    L = (icu.s + icu.u_lab).to_numpy()[s]
    frames = []
    for itemid, (base, sd, effect) in VITAL_MODEL.items():
        item = itemids.ITEMS[itemid]
        value = np.clip(
            base + sd * rng.standard_normal(len(s)) + effect * L, item.low + 1, item.high
        )
        frames.append(
            pd.DataFrame(
                {
                    "s": s,
                    "charttime": charttime,
                    "itemid": itemid,
                    "valuenum": np.round(value, 1),
                    "valueuom": item.unit,
                }
            )
        )
    mean = (frames[1].valuenum.to_numpy() + 2 * frames[2].valuenum.to_numpy()) / 3
    frames.append(
        pd.DataFrame(
            {
                "s": s,
                "charttime": charttime,
                "itemid": NBP_MEAN[0],
                "valuenum": np.round(mean),
                "valueuom": NBP_MEAN[4],
            }
        )
    )
    chart = pd.concat(frames, ignore_index=True).sort_values(["s", "charttime"], kind="stable")
    chart = pd.DataFrame(
        {
            "subject_id": icu.subject_id.to_numpy()[chart.s],
            "hadm_id": icu.hadm_id.to_numpy()[chart.s],
            "stay_id": stays.stay_id.to_numpy()[chart.s],
            "caregiver_id": None,
            "charttime": chart.charttime.dt.strftime(TIME).to_numpy(),
            "storetime": (chart.charttime + pd.Timedelta(minutes=5)).dt.strftime(TIME).to_numpy(),
            "itemid": chart.itemid.to_numpy(),
            "value": chart.valuenum.astype(str).to_numpy(),
            "valuenum": chart.valuenum.to_numpy(),
            "valueuom": chart.valueuom.to_numpy(),
            "warning": 0,
        }
    )
    return stays, chart


def _studies(rng: np.random.Generator, adm: pd.DataFrame) -> pd.DataFrame:
    """0, 1 or 2 chest X-ray studies per admission, inside the stay, each with a report."""
    n = rng.choice([0, 1, 2], size=len(adm), p=[0.3, 0.5, 0.2])
    a = np.repeat(np.arange(len(adm)), n)
    k = np.concatenate([np.arange(c) for c in n]).astype(int)
    hours = adm.los_days.to_numpy()[a] * 24
    # First study in the first half of the stay (within 2 days), a second one later.
    first = rng.uniform(0.05, 0.5, len(a)) * np.minimum(hours, 96)
    offset = np.where(k == 0, first, first + rng.uniform(0.5, 0.9, len(a)) * (hours - first))
    studytime = (adm.admittime.to_numpy()[a] + pd.to_timedelta(offset, unit="h")).floor("s")
    portable = adm.has_icu.to_numpy()[a]
    S = adm.s.to_numpy()[a]
    return pd.DataFrame(
        {
            "a": a,
            "subject_id": adm.subject_id.to_numpy()[a],
            "hadm_id": adm.hadm_id.to_numpy()[a],
            "study_id": 50_000_003 + 17 * np.arange(len(a)),
            "dicom_id": [
                "-".join(f"{x:08x}" for x in row) for row in rng.integers(0, 2**32, (len(a), 5))
            ],
            "studytime": studytime,
            "view": np.where(portable, "AP", "PA"),
            "image_signal": S + adm.u_img.to_numpy()[a] + 0.3 * rng.standard_normal(len(a)),
            "report_signal": S + adm.u_note.to_numpy()[a] + 0.5 * rng.standard_normal(len(a)),
            "report_delay_h": rng.uniform(0.3, 3.0, len(a)),
            "side": rng.integers(0, 2, len(a)),
            "seq": k + 1,
        }
    )


def _grade(signal: np.ndarray, cuts=(-0.3, 0.6, 1.4)) -> np.ndarray:
    return np.searchsorted(np.asarray(cuts), signal)


def _radiology(rng: np.random.Generator, studies: pd.DataFrame, adm: pd.DataFrame) -> pd.DataFrame:
    grade = _grade(studies.report_signal.to_numpy())
    charttime = studies.studytime + pd.to_timedelta(studies.report_delay_h, unit="h")
    disch = adm.dischtime.to_numpy()[studies.a]
    charttime = charttime.where(
        charttime <= disch, pd.Series(disch) - pd.Timedelta(minutes=1)
    ).dt.floor("s")
    variant = rng.integers(0, 2, len(studies))
    indication = rng.choice(INDICATIONS, len(studies))
    texts = [
        f"EXAMINATION: CHEST ({view})\n\nINDICATION: ___ with {ind}.\n\n"
        f"COMPARISON: {'Prior' if seq > 1 else 'None'}.\n\n"
        f"FINDINGS:\n{RADIOLOGY_FINDINGS[g][1 - v]}\n\nIMPRESSION:\n{RADIOLOGY_FINDINGS[g][v]}\n"
        for view, ind, seq, g, v in zip(studies.view, indication, studies.seq, grade, variant)
    ]
    return pd.DataFrame(
        {
            "note_id": [f"{s}-RR-{i + 1}" for i, s in enumerate(studies.subject_id)],
            "subject_id": studies.subject_id,
            "hadm_id": studies.hadm_id,
            "note_type": "RR",
            "note_seq": studies.seq,
            "charttime": charttime.dt.strftime(TIME),
            "storetime": (charttime + pd.Timedelta(minutes=30)).dt.strftime(TIME),
            "text": texts,
        }
    )


def _discharge_notes(rng: np.random.Generator, adm: pd.DataFrame) -> pd.DataFrame:
    grade = _grade((adm.s + 0.5 * rng.standard_normal(len(adm))).to_numpy())
    texts = []
    for g, died, los in zip(grade, adm.died, adm.los_days):
        course = COURSE[g] + (f" Patient expired on hospital day {int(los) + 1}." if died else "")
        condition = "Expired." if died else CONDITION[g]
        texts.append(f"Brief Hospital Course:\n{course}\n\nDischarge Condition:\n{condition}\n")
    return pd.DataFrame(
        {
            "note_id": [f"{s}-DS-{o + 1}" for s, o in zip(adm.subject_id, adm.order)],
            "subject_id": adm.subject_id,
            "hadm_id": adm.hadm_id,
            "note_type": "DS",
            "note_seq": adm.order + 1,
            "charttime": adm.dischtime.dt.strftime(TIME),
            "storetime": (adm.dischtime + pd.Timedelta(hours=6)).dt.strftime(TIME),
            "text": texts,
        }
    )


def _dictionaries() -> tuple[pd.DataFrame, pd.DataFrame]:
    labs = [(i.itemid, i.label, i.fluid, i.category) for i in itemids.LABS] + [CHLORIDE[:4]]
    d_labitems = pd.DataFrame(labs, columns=["itemid", "label", "fluid", "category"])
    vitals = [
        (
            i.itemid,
            i.label,
            i.abbreviation,
            "chartevents",
            i.category,
            i.unit,
            "Numeric",
            None,
            None,
        )
        for i in itemids.VITALS
    ]
    vitals.append(
        (
            NBP_MEAN[0],
            NBP_MEAN[1],
            NBP_MEAN[2],
            "chartevents",
            NBP_MEAN[3],
            NBP_MEAN[4],
            "Numeric",
            None,
            None,
        )
    )
    d_items = pd.DataFrame(
        vitals,
        columns=[
            "itemid",
            "label",
            "abbreviation",
            "linksto",
            "category",
            "unitname",
            "param_type",
            "lownormalvalue",
            "highnormalvalue",
        ],
    )
    return d_labitems, d_items


# --------------------------------------------------------------------------- images


class RadiographPainter:
    """Small synthetic chest radiographs: a fixed anatomy template plus per-study findings."""

    def __init__(self, size: int = 256):
        self.size = size
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self.x, self.y = x, y
        body = ((x - 0.5) / 0.46) ** 2 + ((y - 0.55) / 0.55) ** 2 < 1
        lungs = [((x - cx) / 0.17) ** 2 + ((y - 0.48) / 0.3) ** 2 < 1 for cx in (0.3, 0.7)]
        mediastinum = (np.abs(x - 0.5) < 0.07) & (y > 0.15)
        ribs = 0.06 * (np.sin(y * 70) > 0.6)
        template = np.where(body, 0.55, 0.05)
        for lung in lungs:
            template = np.where(lung, 0.18 + ribs, template)
        template = np.where(mediastinum, 0.78, template)
        self.template = template.astype(np.float32)
        self.lung_centres = ((0.3, 0.62), (0.7, 0.62))  # lower lung fields

    def paint(self, rng: np.random.Generator, signal: float, side: int) -> np.ndarray:
        """uint8 [size, size]; the opacity's brightness grows with ``signal``."""
        image = self.template * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
        amplitude = 0.55 * _sigmoid(2.0 * (signal - 0.8))
        sides = (side, 1 - side) if signal > 1.2 else (side,)
        for s in sides:
            cx, cy = self.lung_centres[s]
            cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.05, 0.05)
            radius = rng.uniform(0.07, 0.11)
            image = image + amplitude * np.exp(
                -((self.x - cx) ** 2 + (self.y - cy) ** 2) / (2 * radius**2)
            )
        image = image + 0.03 * rng.standard_normal(image.shape, dtype=np.float32)
        return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    jpeg: bytes | None,
    modality: str,
    view: str,
    studytime: datetime,
    subject_id: int,
    study_id: int,
    dicom_id: str,
) -> None:
    """A CR/DX DICOM; baseline JPEG encapsulated when ``jpeg`` is given, else uncompressed.

    The synthetic patient name, id and birth date are there so tests can check that they
    never leave ``ingest.dicom``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        generate_uid,
    )

    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else DigitalXRayImageStorageForPresentation
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[dicom_id])
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(study_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study_id), "series"])
    ds.PatientName = f"SYNTHETIC^PATIENT{subject_id}"
    ds.PatientID = str(subject_id)
    ds.PatientBirthDate = "21000101"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyDate = studytime.strftime("%Y%m%d")
    ds.StudyTime = studytime.strftime("%H%M%S")
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if jpeg is not None:
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _images(
    rng,
    studies: pd.DataFrame,
    out: Path,
    size: int,
    dicom: bool,
    summary: SynthSummary,
    progress: Callable[[int], None],
) -> pd.DataFrame:
    painter = RadiographPainter(size)
    jpg_root, dcm_root = out / "cxr-jpg", out / "cxr-dicom"
    records = []
    for i, study in enumerate(studies.itertuples(index=False)):
        pixels = painter.paint(rng, study.image_signal, study.side)
        encoded = _jpeg(pixels)
        path = cxr_image_path(jpg_root, study.subject_id, study.study_id, study.dicom_id, "jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded)
        studytime = study.studytime.to_pydatetime()
        if dicom:
            modality = "DX" if study.view == "AP" else "CR"
            compressed = i % 4 != 3
            write_dicom(
                cxr_image_path(dcm_root, study.subject_id, study.study_id, study.dicom_id, "dcm"),
                pixels,
                jpeg=encoded if compressed else None,
                modality=modality,
                view=study.view,
                studytime=studytime,
                subject_id=study.subject_id,
                study_id=study.study_id,
                dicom_id=study.dicom_id,
            )
            variant = f"{modality}/{'jpeg-baseline' if compressed else 'uncompressed'}"
            summary.dicom_files[variant] = summary.dicom_files.get(variant, 0) + 1
        records.append(
            (
                study.dicom_id,
                study.subject_id,
                study.study_id,
                "CHEST (PA AND LAT)",
                study.view,
                size,
                size,
                int(studytime.strftime("%Y%m%d")),
                float(studytime.strftime("%H%M%S")),
                "CHEST (PA AND LAT)",
                "postero-anterior" if study.view == "PA" else "antero-posterior",
                "Erect",
            )
        )
        progress(1)
    summary.images = len(records)
    return pd.DataFrame(
        records,
        columns=[
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
            "ProcedureCodeSequence_CodeMeaning",
            "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning",
        ],
    )


# --------------------------------------------------------------------------- entry point


def _write(frame: pd.DataFrame, path: Path) -> None:
    """gzip with mtime 0, so the same seed writes the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(frame.to_csv(index=False).encode())


def generate(
    out: Path,
    admissions: int,
    seed: int = 0,
    *,
    image_size: int = 256,
    dicom: bool = True,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write a cohort of ``admissions`` admissions under ``out``; ``progress`` gets studies
    painted."""
    if admissions < 1:
        raise ValueError("admissions must be at least 1")
    out = Path(out)
    rng = np.random.default_rng(seed)
    patients, adm = _cohort(rng, admissions)
    labs = _labs(rng, adm)
    stays, chart = _icu(rng, adm)
    studies = _studies(rng, adm)
    radiology = _radiology(rng, studies, adm)
    discharge = _discharge_notes(rng, adm)
    d_labitems, d_items = _dictionaries()

    summary = SynthSummary(
        out=str(out),
        patients=len(patients),
        admissions=len(adm),
        deaths=int(adm.died.sum()),
        icu_stays=len(stays),
        lab_rows=len(labs),
        chart_rows=len(chart),
        radiology_notes=len(radiology),
        discharge_notes=len(discharge),
    )
    _write(_patients_table(patients, adm), out / "hosp/patients.csv.gz")
    _write(_admissions_table(adm), out / "hosp/admissions.csv.gz")
    _write(labs, out / "hosp/labevents.csv.gz")
    _write(d_labitems, out / "hosp/d_labitems.csv.gz")
    _write(stays, out / "icu/icustays.csv.gz")
    _write(chart, out / "icu/chartevents.csv.gz")
    _write(d_items, out / "icu/d_items.csv.gz")
    _write(radiology, out / "note/radiology.csv.gz")
    _write(discharge, out / "note/discharge.csv.gz")
    metadata = _images(rng, studies, out, image_size, dicom, summary, progress or (lambda n: None))
    _write(metadata, out / f"cxr-jpg/{CXR_METADATA}.csv.gz")
    if dicom:
        records = metadata[["subject_id", "study_id", "dicom_id"]].assign(
            path=[
                cxr_image_path(Path("."), s, st, d, "dcm").as_posix()
                for s, st, d in zip(metadata.subject_id, metadata.study_id, metadata.dicom_id)
            ]
        )
        _write(records, out / "cxr-dicom/cxr-record-list.csv.gz")
    return summary


def studies_count(admissions: int, seed: int = 0) -> int:
    """How many radiographs ``generate`` paints (for sizing a progress bar), cheaply."""
    rng = np.random.default_rng(seed)
    _, adm = _cohort(rng, admissions)
    _labs(rng, adm)
    _icu(rng, adm)
    return len(_studies(rng, adm))
