"""Issue 4: `m3t features build` over a synthetic cohort, chest X-rays included."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from app.cli import app
from features import cxr, offline
from features import model_inputs as mi
from ingest.synth import generate

runner = CliRunner()


def test_build_writes_the_trainer_dataset_with_preprocessed_cxr(tmp_path):
    generate(tmp_path / "cohort", 20, seed=5, image_size=64)
    result = runner.invoke(
        app,
        [
            "features",
            "build",
            str(tmp_path / "cohort"),
            "--out",
            str(tmp_path / "ds"),
            "--cutoffs",
            "12,36",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["examples"] > 20 and summary["cxr_errors"] == {}

    dataset = offline.load(tmp_path / "ds")
    a = dataset.arrays
    n = len(a["los_days"])
    for spec in mi.input_specs(dataset.fitted.mean.shape[0]):
        assert a[spec.name].shape == (n, *spec.shape) and a[spec.name].dtype == spec.dtype, (
            spec.name
        )
    assert ((a["hours_after_admit"] == 12) | (a["hours_after_admit"] == 36)).all()
    assert set(np.unique(a["mortality"])) <= {0.0, 1.0} and (a["los_days"] > 0).all()

    with_image = a[mi.MODALITY_MASK][:, mi.MODALITIES.index("cxr")] == 1
    assert with_image.any() and (a["cxr_uri"][with_image] != "").all()
    assert not a[mi.CXR][~with_image].any()
    i = int(np.flatnonzero(with_image)[0])
    want = cxr.reference_preprocess(cxr.load(str(a["cxr_uri"][i])))
    np.testing.assert_allclose(a[mi.CXR][i], want, atol=1e-4)
