"""A synthetic multimodal cohort, written in the MIMIC-IV layout so ``MimicReader`` loads it.

Output (under ``out``)::

    hosp/{patients,admissions,labevents,d_labitems}.csv.gz
    icu/{icustays,chartevents,d_items}.csv.gz
    note/{radiology,discharge}.csv.gz
    cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz + files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    cxr-dicom/cxr-record-list.csv.gz        + files/pXX/pSUBJECT/sSTUDY/DICOM.dcm
    truth.csv.gz                            the latent state per admission, for tests only

One ``numpy.random.Generator`` draws everything; gzip headers carry no timestamp, so a
seed fixes the bytes of every table. ``tables()`` gives the tables without writing them.

**Latent state.** Each patient has a frailty ``f ~ N(0, 1)`` and 1 + Poisson(0.45) planned
admissions, the ones after an in-hospital death dropped. Each admission has a severity
``s = 0.6 f + 0.8 e`` (so a patient's earlier stays say something about the next one), a
course ``v ~ N(0, 0.6)`` and three modality-specific signals ``u_lab, u_note, u_img ~ N(0,
1)``, all independent. The state ``t`` hours after admission is
``x(t) = s + v min(t / 72, 1)``: the patient worsens (``v > 0``) or improves over three
days, then holds.

**Outcomes** depend on the latent state and on noise of their own, nothing else (``a`` is
the standardised age)::

    log los_days   =  1.3 + 0.30 s + 0.25 v + 0.10 u_lab + 0.20 (u_note + u_img) + 0.1 a
                      + N(0, 0.25²)
    logit P(death) = -3.3 + 0.9 s + 0.6 v + 0.25 u_lab + 0.6 (u_note + u_img) + 0.3 a

(LoS clipped to 0.25-90 days). Every admission can end in death; the dead are not
readmitted. ``truth.csv.gz`` holds the latent variables and both linear predictors.

**Timing.** When something happens depends only on the state at that time and on the
clock, never on the stay's future: rates are piecewise constant over 2-hour blocks,
evaluated at ``x`` in the block, and the stay's end only censors: nothing in a stay is
placed relative to its discharge (the discharge summary, written after it, reaches only
the next admission). So at any cutoff inside a stay, which events are visible says nothing
about the outcome beyond the latent state (``tests/test_ingest_synth.py`` checks this).

- ICU: a transfer hazard of ``0.0025 e^{1.3 x(t)}`` per hour (three times that in the
  first 12 h, transfers from the emergency department); a stay of
  ``36 h e^{0.3 x + N(0, 0.5²)}``, cut at discharge. One ICU stay per admission at most.
- Labs: an admission panel 0.3-2 h in, a morning panel around 05:00 each day, and extra
  panels at ``2/day`` in the ICU or ``0.2 e^{0.5 x}/day`` on the ward. Each of the nine
  routine labs is in a panel with probability 0.92; lactate (a blood gas) with
  probability 0.8 in the ICU and ``sigmoid(x - 1)`` on the ward.
- Vitals (``chartevents``): every 4 h while in the ICU.
- Chest X-rays: an admission film (probability ``sigmoid(0.3 + 0.8 s)``, about 2 h in),
  then studies at ``0.6/day`` in the ICU (portable AP films) or ``0.15 e^{0.5 x}/day`` on
  the ward (PA).
- Availability: a lab result is stored 5 min to 8 h after its draw (median 45 min; blood
  gases 10 min), a vital 1-30 min after charting, a radiology report is signed 0.2-24 h
  after the exam (median 1.5 h; MIMIC-IV-Note's ``charttime`` is the exam time,
  ``storetime`` the signature), a discharge summary 2-30 h after discharge.

**Content** expresses the state at the event's time plus the modality's own signal, so
each modality tells something the others do not:

- Labs and vitals express ``L = x(t) + u_lab``: creatinine, BUN, lactate, WBC, glucose,
  potassium, heart rate, respiratory rate and temperature rise with ``L``; bicarbonate,
  haemoglobin, platelets, sodium, blood pressure and SpO2 fall.
- Radiology reports express ``R = x(t) + u_note + N(0, 0.5²)`` through graded phrases,
  from "No acute cardiopulmonary process" to "Worsening bilateral consolidation".
- Chest radiographs express ``I = x(t) + u_img + N(0, 0.3²)``: an opacity blob in a lower
  lung field whose brightness grows with ``I``, on both sides when ``I > 1.2``.
- Discharge summaries express the admission's ``s + v`` (graded hospital-course phrases);
  the reader hands them to the patient's next admission as the prior-summary stream.
- Admission type leans on ``s`` (elective when mild, emergency when severe).
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

# Lab generation: (baseline, within-patient sd, effect per unit L)
LAB_MODEL: dict[int, tuple[float, float, float]] = {
    50912: (1.0, 0.15, 0.30),  # creatinine
    51006: (18.0, 4.0, 8.0),  # BUN
    50983: (139.0, 2.5, -1.5),  # sodium
    50971: (4.1, 0.35, 0.15),  # potassium
    50882: (25.0, 2.0, -2.5),  # bicarbonate
    50931: (125.0, 25.0, 15.0),  # glucose
    51222: (11.5, 1.0, -0.6),  # hemoglobin
    51301: (8.5, 2.0, 2.5),  # WBC
    51265: (230.0, 50.0, -25.0),  # platelets
    50813: (1.3, 0.3, 0.6),  # lactate
}
LACTATE = 50813
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

# Outcome model (see the module docstring): intercept, then weights on s, v, u_lab, u_note,
# u_img and the standardised age. Notes and X-rays weigh more than the labs' own signal, so
# what only they show matters to both outcomes.
LOS_MODEL = (1.3, 0.30, 0.25, 0.10, 0.20, 0.20, 0.1)
LOS_NOISE = 0.25
DEATH_MODEL = (-3.3, 0.9, 0.6, 0.25, 0.6, 0.6, 0.3)
COURSE_HOURS = 72.0  # the course v plays out over the first three days
BLOCK_HOURS = 2.0  # event rates are constant within a block of the stay

# Event rates (per hour) and schedules; see the module docstring.
ICU_HAZARD, ICU_EARLY_HOURS, ICU_EARLY_FACTOR = 0.0025, 12.0, 3.0
ICU_MEDIAN_HOURS = 36.0
LAB_EXTRA_ICU, LAB_EXTRA_WARD = 2.0 / 24, 0.2 / 24
LAB_MORNING_HOUR = 5.0
VITAL_EVERY_HOURS = 4.0
CXR_ICU, CXR_WARD = 0.6 / 24, 0.15 / 24
CXR_ADMISSION_HOURS = 2.0  # mean delay of the admission film

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
TRUTH = "truth"  # truth.csv.gz: the latent state, which the reader never opens


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


@dataclass
class SynthTables:
    """Every table of a cohort, as written (``studies`` holds what the painter needs)."""

    patients: pd.DataFrame
    admissions: pd.DataFrame
    labevents: pd.DataFrame
    icustays: pd.DataFrame
    transfers: pd.DataFrame
    chartevents: pd.DataFrame
    studies: pd.DataFrame
    radiology: pd.DataFrame
    discharge: pd.DataFrame
    truth: pd.DataFrame


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- latent state


def _cohort(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients and admissions with their latent variables and outcomes."""
    planned = 1 + rng.poisson(0.45, size=n)  # n patients have at least n admissions
    patients = pd.DataFrame(
        {
            "subject_id": 10_000_032 + 1_103 * np.arange(n),
            "gender": np.where(rng.random(n) < 0.5, "M", "F"),
            "anchor_age": rng.integers(18, 86, n),
            "anchor_year": rng.integers(2110, 2180, n),
            "frailty": rng.standard_normal(n),
        }
    )
    patient = np.repeat(np.arange(n), planned)
    m = len(patient)
    adm = pd.DataFrame(
        {"patient": patient, "order": np.concatenate([np.arange(c) for c in planned])}
    )
    adm["s"] = 0.6 * patients.frailty.to_numpy()[patient] + 0.8 * rng.standard_normal(m)
    adm["v"] = 0.6 * rng.standard_normal(m)
    for name in ("u_lab", "u_note", "u_img"):
        adm[name] = rng.standard_normal(m)
    # Ages drift with the admission year below; the outcome uses the anchor age.
    adm["age_z"] = (patients.anchor_age.to_numpy()[patient] - 52.0) / 20.0
    latent = adm[["s", "v", "u_lab", "u_note", "u_img", "age_z"]].to_numpy()
    adm["los_mu"] = LOS_MODEL[0] + latent @ np.array(LOS_MODEL[1:])
    los = np.exp(adm.los_mu.to_numpy() + LOS_NOISE * rng.standard_normal(m))
    adm["death_logit"] = DEATH_MODEL[0] + latent @ np.array(DEATH_MODEL[1:])
    adm["died"] = rng.random(m) < _sigmoid(adm.death_logit)
    # The dead are not readmitted; the first n admissions left make the cohort.
    alive = (adm.died.groupby(patient).cumsum() - adm.died == 0).to_numpy()
    adm = adm[alive].iloc[:n].reset_index(drop=True)
    los = los[alive][:n]
    patients = patients.iloc[: adm.patient.iloc[-1] + 1]
    patient, order = adm.patient.to_numpy(), adm.order.to_numpy()
    adm["subject_id"] = patients.subject_id.to_numpy()[patient]
    adm["hadm_id"] = 20_000_019 + 3_301 * np.arange(n)
    adm["admission_type"] = np.array(ADMISSION_TYPES)[
        _grade(adm.s + rng.standard_normal(n), (-1.0, 0.0, 1.0))
    ]
    adm["admission_location"] = rng.choice(LOCATIONS, n)
    adm["insurance"] = rng.choice(INSURANCE, n)

    # Admissions follow each other: the first starts within three years of the anchor
    # year; each next one 2 days to a few months after the previous discharge.
    los_days = np.clip(los, 0.25, 90.0)
    start = np.array([datetime(int(y), 1, 1) for y in patients.anchor_year])[patient]
    first_offset = rng.uniform(0, 3 * 365, n)
    gap = 2 + rng.exponential(120, n)
    admittime, dischtime, previous = [], [], None
    for i in range(n):
        if order[i] == 0:
            t = start[i] + timedelta(days=float(first_offset[i]))
        else:
            t = previous + timedelta(days=float(gap[i]))
        t = t.replace(second=0, microsecond=0)
        previous = (t + timedelta(days=float(los_days[i]))).replace(second=0, microsecond=0)
        admittime.append(t)
        dischtime.append(previous)
    adm["admittime"] = pd.to_datetime(admittime)
    adm["dischtime"] = pd.to_datetime(dischtime)
    adm["los_days"] = (adm.dischtime - adm.admittime) / pd.Timedelta(days=1)
    return patients, adm


def state(adm: pd.DataFrame, a: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """``x(t)``: admission ``a``'s state ``hours`` after admission."""
    course = np.minimum(np.asarray(hours) / COURSE_HOURS, 1.0)
    return adm.s.to_numpy()[a] + adm.v.to_numpy()[a] * course


@dataclass
class _Timeline:
    """Each admission's stay cut into blocks of BLOCK_HOURS, and its ICU stay in hours."""

    hours: np.ndarray  # per admission: length of stay
    a: np.ndarray  # per block: its admission
    start: np.ndarray  # per block: hours after admission
    icu_in: np.ndarray  # per admission, NaN without an ICU stay
    icu_out: np.ndarray

    def in_icu(self, a: np.ndarray, hours: np.ndarray) -> np.ndarray:
        return (hours >= self.icu_in[a]) & (hours < self.icu_out[a])

    def poisson(self, rng, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Event times of a Poisson process with ``rate`` per hour in each block, cut at
        discharge; sorted by admission, then time."""
        k = rng.poisson(rate * BLOCK_HOURS)
        a = np.repeat(self.a, k)
        t = np.repeat(self.start, k) + rng.uniform(0, BLOCK_HOURS, len(a))
        keep = t < self.hours[a]
        a, t = a[keep], t[keep]
        order = np.lexsort((t, a))
        return a[order], t[order]


def _timeline(rng: np.random.Generator, adm: pd.DataFrame) -> _Timeline:
    hours = adm.los_days.to_numpy() * 24
    blocks = np.ceil(hours / BLOCK_HOURS).astype(int)
    a = np.repeat(np.arange(len(adm)), blocks)
    start = (np.arange(len(a)) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * BLOCK_HOURS
    # ICU transfer: the first block whose hazard fires, at a uniform time within it.
    x = state(adm, a, start + BLOCK_HOURS / 2)
    early = np.where(start < ICU_EARLY_HOURS, ICU_EARLY_FACTOR, 1.0)
    hazard = ICU_HAZARD * np.exp(1.3 * x) * early
    fired = np.flatnonzero(rng.random(len(a)) < -np.expm1(-hazard * BLOCK_HOURS))
    first = fired[np.unique(a[fired], return_index=True)[1]]
    icu_in = np.full(len(adm), np.nan)
    icu_in[a[first]] = start[first] + rng.uniform(0, BLOCK_HOURS, len(first))
    icu_in[icu_in >= hours] = np.nan  # discharged first
    with_icu = ~np.isnan(icu_in)
    stay = ICU_MEDIAN_HOURS * np.exp(
        0.3 * state(adm, np.arange(len(adm)), np.nan_to_num(icu_in))
        + 0.5 * rng.standard_normal(len(adm))
    )
    icu_out = np.where(with_icu, np.minimum(icu_in + stay, hours), np.nan)
    return _Timeline(hours, a, start, icu_in, icu_out)


def _at(adm: pd.DataFrame, a: np.ndarray, hours: np.ndarray) -> pd.Series:
    """Timestamps ``hours`` after admission ``a``'s admit time, to the second."""
    when = adm.admittime.to_numpy()[a] + pd.to_timedelta(hours, unit="h")
    return pd.Series(when).dt.floor("s")


# --------------------------------------------------------------------------- tables


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


WARD = "Medicine"  # where a stay is outside the ICU (the ED first, for an emergency)


def _transfers_table(admissions: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    """hosp/transfers: each stay opens in the ED or on the ward, moves to its ICU stays
    and back to the ward, and ends with a discharge row; no draw, so the other tables
    are unchanged."""
    first = np.where(
        admissions.admission_location == "EMERGENCY ROOM", "Emergency Department", WARD
    )
    frames = [
        pd.DataFrame(
            {
                "subject_id": admissions.subject_id,
                "hadm_id": admissions.hadm_id,
                "eventtype": "admit",
                "careunit": first,
                "intime": admissions.admittime,
            }
        ),
        pd.DataFrame(
            {
                "subject_id": stays.subject_id,
                "hadm_id": stays.hadm_id,
                "eventtype": "transfer",
                "careunit": stays.first_careunit,
                "intime": stays.intime,
            }
        ),
    ]
    disch = stays.hadm_id.map(admissions.set_index("hadm_id").dischtime)
    back = stays[stays.outtime < disch]
    frames.append(
        pd.DataFrame(
            {
                "subject_id": back.subject_id,
                "hadm_id": back.hadm_id,
                "eventtype": "transfer",
                "careunit": WARD,
                "intime": back.outtime,
            }
        )
    )
    frames.append(
        pd.DataFrame(
            {
                "subject_id": admissions.subject_id,
                "hadm_id": admissions.hadm_id,
                "eventtype": "discharge",
                "careunit": None,
                "intime": admissions.dischtime,
            }
        )
    )
    table = pd.concat(frames, ignore_index=True).sort_values(["hadm_id", "intime"], kind="stable")
    table.insert(2, "transfer_id", 40_000_003 + 3 * np.arange(len(table)))
    return table.assign(outtime=None).reset_index(drop=True)


def _truth_table(adm: pd.DataFrame, timeline: _Timeline) -> pd.DataFrame:
    columns = ["subject_id", "hadm_id", "s", "v", "u_lab", "u_note", "u_img", "age_z"]
    truth = adm[columns + ["los_mu", "death_logit", "los_days", "died"]].copy()
    truth["died"] = truth.died.astype(int)
    truth["icu_in_hours"] = np.round(timeline.icu_in, 4)
    return truth.round(6)


def _panels(rng: np.random.Generator, adm: pd.DataFrame, tl: _Timeline):
    """Lab draw times: an admission panel, a morning panel each day, extra panels at a
    state-dependent rate; sorted by admission, then time."""
    n = len(adm)
    first = rng.uniform(0.3, 2.0, n)
    clock = (adm.admittime.dt.hour + adm.admittime.dt.minute / 60).to_numpy()
    morning = (LAB_MORNING_HOUR - clock) % 24
    morning = np.where(morning < 4, morning + 24, morning)  # not right after the first panel
    jitter = 0.75  # hours either side of the morning round
    # Every round that could fall before discharge, so only the censoring below drops any.
    days = np.maximum(np.ceil((tl.hours - morning + jitter) / 24), 0).astype(int)
    daily_a = np.repeat(np.arange(n), days)
    k = np.arange(len(daily_a)) - np.repeat(np.cumsum(days) - days, days)
    daily_t = morning[daily_a] + 24 * k + rng.uniform(-jitter, jitter, len(daily_a))
    mid = tl.start + BLOCK_HOURS / 2
    x = state(adm, tl.a, mid)
    rate = np.where(tl.in_icu(tl.a, mid), LAB_EXTRA_ICU, LAB_EXTRA_WARD * np.exp(0.5 * x))
    extra_a, extra_t = tl.poisson(rng, rate)
    a = np.concatenate([np.arange(n), daily_a, extra_a])
    t = np.concatenate([first, daily_t, extra_t])
    keep = t < tl.hours[a]
    a, t = a[keep], t[keep]
    order = np.lexsort((t, a))
    return a[order], t[order]


def _labs(rng: np.random.Generator, adm: pd.DataFrame, tl: _Timeline) -> pd.DataFrame:
    """Panels of the routine labs, plus noise rows the reader skips."""
    a, t = _panels(rng, adm, tl)
    charttime = _at(adm, a, t).dt.floor("min")
    L = state(adm, a, t) + adm.u_lab.to_numpy()[a]
    in_icu = tl.in_icu(a, t)
    frames = []
    for itemid, (base, sd, effect) in LAB_MODEL.items():
        if itemid == LACTATE:  # a blood gas: drawn when the patient looks sick
            present = rng.random(len(a)) < np.where(in_icu, 0.8, _sigmoid(state(adm, a, t) - 1))
        else:
            present = rng.random(len(a)) < 0.92
        value = base + sd * rng.standard_normal(len(a)) + effect * L
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
    # Resulted minutes to hours after the draw; blood gases within minutes.
    median = np.where(labs.itemid.to_numpy() == LACTATE, 10.0, 45.0)
    delay = np.clip(median * np.exp(0.7 * rng.standard_normal(len(labs))), 5.0, 480.0)
    storetime = (labs.charttime + pd.to_timedelta(delay, unit="min")).dt.floor("s")
    return pd.DataFrame(
        {
            "labevent_id": np.arange(1, len(labs) + 1),
            "subject_id": labs.subject_id.to_numpy(),
            "hadm_id": labs.hadm_id.astype("Int64").to_numpy(),
            "specimen_id": 1_000_000 + np.arange(len(labs)),
            "itemid": labs.itemid.to_numpy(),
            "order_provider_id": None,
            "charttime": labs.charttime.dt.strftime(TIME).to_numpy(),
            "storetime": storetime.dt.strftime(TIME).to_numpy(),
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
            "charttime": charttime.to_numpy()[present],
            "value": value[present].astype(str),
            "valuenum": value[present],
            "valueuom": unit,
        }
    )


def _icu(
    rng: np.random.Generator, adm: pd.DataFrame, tl: _Timeline
) -> tuple[pd.DataFrame, pd.DataFrame]:
    i = np.flatnonzero(~np.isnan(tl.icu_in))
    intime, outtime = _at(adm, i, tl.icu_in[i]), _at(adm, i, tl.icu_out[i])
    stays = pd.DataFrame(
        {
            "subject_id": adm.subject_id.to_numpy()[i],
            "hadm_id": adm.hadm_id.to_numpy()[i],
            "stay_id": 30_000_007 + 7 * np.arange(len(i)),
            "first_careunit": rng.choice(CAREUNITS, len(i)),
            "last_careunit": None,
            "intime": intime.dt.strftime(TIME),
            "outtime": outtime.dt.strftime(TIME),
            "los": (outtime - intime) / pd.Timedelta(days=1),
        }
    )
    stays["last_careunit"] = stays.first_careunit
    # A set of vitals every few hours while in the unit.
    sets = np.ceil((tl.icu_out[i] - tl.icu_in[i]) / VITAL_EVERY_HOURS).astype(int)
    s = np.repeat(np.arange(len(i)), sets)
    k = np.arange(len(s)) - np.repeat(np.cumsum(sets) - sets, sets)
    hours = tl.icu_in[i][s] + VITAL_EVERY_HOURS * k + rng.uniform(0, 0.5, len(s))
    inside = hours < tl.icu_out[i][s]
    s, hours = s[inside], hours[inside]
    a = i[s]
    charttime = _at(adm, a, hours).dt.floor("min").to_numpy()
    L = state(adm, a, hours) + adm.u_lab.to_numpy()[a]
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
    delay = pd.to_timedelta(rng.uniform(1, 30, len(chart)), unit="min")
    chart = pd.DataFrame(
        {
            "subject_id": stays.subject_id.to_numpy()[chart.s],
            "hadm_id": stays.hadm_id.to_numpy()[chart.s],
            "stay_id": stays.stay_id.to_numpy()[chart.s],
            "caregiver_id": None,
            "charttime": chart.charttime.dt.strftime(TIME).to_numpy(),
            "storetime": (chart.charttime + delay).dt.floor("s").dt.strftime(TIME).to_numpy(),
            "itemid": chart.itemid.to_numpy(),
            "value": chart.valuenum.astype(str).to_numpy(),
            "valuenum": chart.valuenum.to_numpy(),
            "valueuom": chart.valueuom.to_numpy(),
            "warning": 0,
        }
    )
    return stays, chart


def _studies(rng: np.random.Generator, adm: pd.DataFrame, tl: _Timeline) -> pd.DataFrame:
    """Chest X-ray studies: an admission film for most, then a state-dependent rate."""
    n = len(adm)
    filmed = rng.random(n) < _sigmoid(0.3 + 0.8 * adm.s.to_numpy())
    first_t = rng.exponential(CXR_ADMISSION_HOURS, n)
    first_a = np.flatnonzero(filmed & (first_t < tl.hours))
    mid = tl.start + BLOCK_HOURS / 2
    x = state(adm, tl.a, mid)
    rate = np.where(tl.in_icu(tl.a, mid), CXR_ICU, CXR_WARD * np.exp(0.5 * x))
    later_a, later_t = tl.poisson(rng, rate)
    a = np.concatenate([first_a, later_a])
    hours = np.concatenate([first_t[first_a], later_t])
    order = np.lexsort((hours, a))
    a, hours = a[order], hours[order]
    seq = np.arange(len(a)) - np.searchsorted(a, a)  # 0 for an admission's first study
    x = state(adm, a, hours)
    return pd.DataFrame(
        {
            "a": a,
            "subject_id": adm.subject_id.to_numpy()[a],
            "hadm_id": adm.hadm_id.to_numpy()[a],
            "study_id": 50_000_003 + 17 * np.arange(len(a)),
            "dicom_id": [
                "-".join(f"{v:08x}" for v in row) for row in rng.integers(0, 2**32, (len(a), 5))
            ],
            "studytime": _at(adm, a, hours),
            "hours": hours,
            "view": np.where(tl.in_icu(a, hours), "AP", "PA"),  # portable films in the ICU
            "image_signal": x + adm.u_img.to_numpy()[a] + 0.3 * rng.standard_normal(len(a)),
            "report_signal": x + adm.u_note.to_numpy()[a] + 0.5 * rng.standard_normal(len(a)),
            "report_delay_h": np.clip(1.5 * np.exp(0.8 * rng.standard_normal(len(a))), 0.2, 24),
            "side": rng.integers(0, 2, len(a)),
            "seq": seq + 1,
        }
    )


def _grade(signal: np.ndarray, cuts=(-0.3, 0.6, 1.4)) -> np.ndarray:
    return np.searchsorted(np.asarray(cuts), signal)


def _radiology(rng: np.random.Generator, studies: pd.DataFrame) -> pd.DataFrame:
    """One report per study: charted at the exam, stored when signed (maybe after
    discharge, as in MIMIC-IV-Note)."""
    grade = _grade(studies.report_signal.to_numpy())
    signed = studies.studytime + pd.to_timedelta(studies.report_delay_h, unit="h")
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
            "charttime": studies.studytime.dt.strftime(TIME),
            "storetime": signed.dt.floor("s").dt.strftime(TIME),
            "text": texts,
        }
    )


def _discharge_notes(rng: np.random.Generator, adm: pd.DataFrame) -> pd.DataFrame:
    grade = _grade((adm.s + adm.v + 0.5 * rng.standard_normal(len(adm))).to_numpy())
    texts = []
    for g, died, los in zip(grade, adm.died, adm.los_days):
        course = COURSE[g] + (f" Patient expired on hospital day {int(los) + 1}." if died else "")
        condition = "Expired." if died else CONDITION[g]
        texts.append(f"Brief Hospital Course:\n{course}\n\nDischarge Condition:\n{condition}\n")
    written = adm.dischtime + pd.to_timedelta(rng.uniform(2, 30, len(adm)), unit="h")
    return pd.DataFrame(
        {
            "note_id": [f"{s}-DS-{o + 1}" for s, o in zip(adm.subject_id, adm.order)],
            "subject_id": adm.subject_id,
            "hadm_id": adm.hadm_id,
            "note_type": "DS",
            "note_seq": adm.order + 1,
            "charttime": adm.dischtime.dt.strftime(TIME),
            "storetime": written.dt.floor("s").dt.strftime(TIME),
            "text": texts,
        }
    )


def _tables(rng: np.random.Generator, admissions: int) -> SynthTables:
    if admissions < 1:
        raise ValueError("admissions must be at least 1")
    patients, adm = _cohort(rng, admissions)
    timeline = _timeline(rng, adm)
    labs = _labs(rng, adm, timeline)
    stays, chart = _icu(rng, adm, timeline)
    studies = _studies(rng, adm, timeline)
    admissions_table = _admissions_table(adm)
    return SynthTables(
        patients=_patients_table(patients, adm),
        admissions=admissions_table,
        labevents=labs,
        icustays=stays,
        transfers=_transfers_table(admissions_table, stays),
        chartevents=chart,
        studies=studies,
        radiology=_radiology(rng, studies),
        discharge=_discharge_notes(rng, adm),
        truth=_truth_table(adm, timeline),
    )


def tables(admissions: int, seed: int = 0) -> SynthTables:
    """The cohort ``generate(out, admissions, seed)`` writes, in memory, without images."""
    return _tables(np.random.default_rng(seed), admissions)


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
    out = Path(out)
    rng = np.random.default_rng(seed)
    t = _tables(rng, admissions)
    d_labitems, d_items = _dictionaries()
    summary = SynthSummary(
        out=str(out),
        patients=len(t.patients),
        admissions=len(t.admissions),
        deaths=int(t.admissions.hospital_expire_flag.sum()),
        icu_stays=len(t.icustays),
        lab_rows=len(t.labevents),
        chart_rows=len(t.chartevents),
        radiology_notes=len(t.radiology),
        discharge_notes=len(t.discharge),
    )
    _write(t.patients, out / "hosp/patients.csv.gz")
    _write(t.admissions, out / "hosp/admissions.csv.gz")
    _write(t.labevents, out / "hosp/labevents.csv.gz")
    _write(d_labitems, out / "hosp/d_labitems.csv.gz")
    _write(t.icustays, out / "icu/icustays.csv.gz")
    _write(t.transfers, out / "hosp/transfers.csv.gz")
    _write(t.chartevents, out / "icu/chartevents.csv.gz")
    _write(d_items, out / "icu/d_items.csv.gz")
    _write(t.radiology, out / "note/radiology.csv.gz")
    _write(t.discharge, out / "note/discharge.csv.gz")
    _write(t.truth, out / f"{TRUTH}.csv.gz")
    metadata = _images(
        rng, t.studies, out, image_size, dicom, summary, progress or (lambda n: None)
    )
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
    """How many radiographs ``generate`` paints (for sizing a progress bar)."""
    return len(tables(admissions, seed).studies)
