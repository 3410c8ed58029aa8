"""`m3t features build` over a synthetic cohort: examples at many cutoffs per stay (issue 18),
the 24-h-only dataset, and chest X-rays stored once per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from features import cxr, offline
from features import model_inputs as mi
from features.state import hours
from ingest.mimic import MimicReader
from ingest.synth import generate
from trainer.data import load_dataset, rows

runner = CliRunner()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    generate(root, 40, seed=5, image_size=64)
    return root


def _build(cohort, out, *options):
    args = ["features", "build", str(cohort), "--out", str(out), "--device", "cpu", "--json"]
    result = runner.invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def _stays(cohort):
    """{hadm_id: (admit, discharge, admission payload, event hours)} from the cohort's events."""
    out = {}
    for events in MimicReader(cohort).admissions():
        admission = next(e for e in events if e.type == "admission")
        discharge = next(e for e in events if e.type == "discharge")
        times = {hours(e.event_time) for e in events if e.type != "discharge"}
        out[admission.hadm_id] = (
            hours(admission.payload.admittime),
            hours(discharge.payload.dischtime),
            admission.payload,
            times,
        )
    return out


def test_24h_only_build_with_preprocessed_cxr(cohort, tmp_path):
    summary = _build(cohort, tmp_path / "ds", "--cutoffs", "12,36")
    assert summary["examples"] > 20 and summary["cxr_errors"] == {}
    dataset = offline.load(tmp_path / "ds")
    a = dataset.arrays
    n = len(a["los_days"])
    for spec in mi.input_specs(dataset.fitted.mean.shape[0]):
        if spec.name != mi.CXR:  # stored once per image, read per row through trainer.data.rows
            assert a[spec.name].shape == (n, *spec.shape) and a[spec.name].dtype == spec.dtype
    assert ((a["hours_after_admit"] == 12) | (a["hours_after_admit"] == 36)).all()
    assert (a["cutoff_kind"] == "horizon").all()
    assert set(np.unique(a["mortality"])) <= {0.0, 1.0} and (a["los_days"] > 0).all()

    only24 = _build(cohort, tmp_path / "d24", "--cutoffs", "24", "--no-cxr")
    b = offline.load(tmp_path / "d24").arrays
    assert (b["hours_after_admit"] == 24).all()
    assert len(np.unique(b["hadm_id"])) == len(b["hadm_id"])
    assert only24["skipped_admissions"]["discharged_before_first_cutoff"] == 40 - len(b["hadm_id"])
    np.testing.assert_allclose(b["weight"], 1.0)


def test_stream_build_has_many_cutoffs_per_stay_before_discharge(cohort, tmp_path):
    summary = _build(cohort, tmp_path / "ds")
    assert summary["skipped_admissions"]["discharged_before_first_cutoff"] == 0  # short stays too
    data = load_dataset(tmp_path / "ds")
    a = data.arrays
    stays = _stays(cohort)
    assert set(a["hadm_id"].tolist()) == set(stays)
    assert set(summary["examples_per_kind"]) == {"horizon", "grid", "event"}
    assert all(summary["examples_per_kind"][k] > 0 for k in ("horizon", "grid", "event"))
    assert summary["examples"] > 8 * 40

    for hadm_id, (admit, discharge, admission, times) in stays.items():
        mine = a["hadm_id"] == hadm_id
        cutoff, kind = a["cutoff"][mine], a["cutoff_kind"][mine]
        assert ((admit <= cutoff) & (cutoff < discharge)).all()  # only while in hospital
        assert len(np.unique(cutoff)) == len(cutoff)
        assert a["weight"][mine].sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(
            a["los_remaining_days"][mine], (discharge - cutoff) / 24, rtol=1e-5
        )
        assert (a["los_remaining_days"][mine] > 0).all()
        after = cutoff - admit
        want = [h for h in (6, 12, 24, 48, 72) if admit + h < discharge]
        np.testing.assert_allclose(np.sort(after[kind == "horizon"]), want)
        grid = after[kind == "grid"]
        assert np.allclose((grid - 2) % 6, 0) and len(grid) >= len(
            [h for h in np.arange(2, (discharge - admit), 6) if h not in want]
        )
        events = cutoff[kind == "event"]
        assert all(t in times for t in events)
        split = a["split"][mine][0]
        assert len(events) <= (2 if split == "train" else 8)
        assert (a["sex"][mine] == admission.gender).all()
        assert (a["admission_type"][mine] == admission.admission_type).all()
        np.testing.assert_allclose(a["age"][mine], admission.age, rtol=1e-6)
    assert (a["los_remaining_days"] < a["los_days"] + 1e-4).all()
    short = [h for h, (admit, discharge, _, _) in stays.items() if discharge - admit < 24]
    assert not short or set(short) <= set(a["hadm_id"].tolist())


def test_xrays_are_stored_once_and_read_back_per_row(cohort, tmp_path):
    _build(cohort, tmp_path / "ds")
    data = load_dataset(tmp_path / "ds")
    a = data.arrays
    with_image = a[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] == 1
    assert with_image.any() and (a["cxr_uri"][with_image] != "").all()
    assert len(a["cxr_images"]) == len(np.unique(a["cxr_uri"][with_image]))
    assert len(a["cxr_images"]) < with_image.sum()  # the cutoffs of a stay share their images
    per_row = rows(data, mi.CXR)
    assert per_row.shape == (len(data), 1, 128, 128)
    assert not per_row[~with_image].any()
    for i in np.flatnonzero(with_image)[:: max(1, with_image.sum() // 5)]:
        want = cxr.reference_preprocess(cxr.load(str(a["cxr_uri"][i])))
        np.testing.assert_allclose(per_row[i], want, atol=1e-4)
        np.testing.assert_array_equal(rows(data, mi.CXR, [i])[0], per_row[i])


def test_cutoff_policy_draws_event_times_with_its_seed():
    policy = offline.CutoffPolicy.stream(seed=3)
    events = [1.5, 3.0, 3.0, 7.25, 9.0, 30.0, 40.0]
    train = policy.cutoffs(0.0, 36.0, events, "train", key=11)
    assert train == policy.cutoffs(0.0, 36.0, events, "train", key=11)
    assert [c for c, k in train if k == "horizon"] == [6.0, 12.0, 24.0]
    assert [c for c, k in train if k == "grid"] == [2.0, 8.0, 14.0, 20.0, 26.0, 32.0]
    drawn = [c for c, k in train if k == "event"]
    assert len(drawn) == 2 and set(drawn) <= {1.5, 3.0, 7.25, 9.0, 30.0}
    test = policy.cutoffs(0.0, 36.0, events, "test", key=11)
    assert {c for c, k in test if k == "event"} == {1.5, 3.0, 7.25, 9.0, 30.0}  # 5 < 8; 40: gone
    # a time that is both a horizon and an event is one example, named by its horizon
    both = offline.CutoffPolicy((6.0,), events_train=5).cutoffs(0.0, 10.0, [6.0, 1.0])
    assert both == [(1.0, "event"), (6.0, "horizon")]
    assert offline.CutoffPolicy((24.0,)).cutoffs(0.0, 20.0) == []  # the 24-h-only policy
    with pytest.raises(ValueError):
        offline.CutoffPolicy((), grid_every=None)
