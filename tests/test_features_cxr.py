"""Issue 4: chest X-ray preprocessing with DALI (CPU here) against a Pillow/NumPy reference."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from features import cxr, image_files
from features.model_inputs import CXR_SIZE
from m3t.settings import Settings

# No services needed: the shared data where Settings points by default.
SAMPLES = Settings().data_dir / "cxr-samples"
PNGS = sorted(SAMPLES.glob("*.png"))
JPEG_DICOM = SAMPLES / "nih-cxr14_siim-acr_CR_jpeg-baseline.dcm"
PIXEL_DICOMS = [
    SAMPLES / "nih-cxr14_gcp-dicom_DX_implicit.dcm",
    SAMPLES / "nema-wg04_RG1_chest_UNCR.dcm",
]
# Same filter, same edge handling: agreement is to float rounding (measured: < 2e-6).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def preprocess():
    return cxr.CxrPreprocessor(batch_size=4, device="cpu")


def test_dali_cpu_equals_the_reference_for_png_jpeg_frames_and_dicom_pixels(preprocess):
    items = (
        [cxr.load(str(p)) for p in PNGS]
        + [cxr.load(str(JPEG_DICOM))]
        + [cxr.load(p.as_uri()) for p in PIXEL_DICOMS]
    )
    assert [type(i) for i in items] == [cxr.Encoded] * (len(PNGS) + 1) + [cxr.Pixels] * len(
        PIXEL_DICOMS
    )
    result = preprocess(items)  # 7 images in batches of 4
    assert result.ok.all() and not result.errors
    assert (
        result.tensors.shape == (len(items), 1, CXR_SIZE, CXR_SIZE)
        and result.tensors.dtype == np.float32
    )
    for item, tensor in zip(items, result.tensors):
        np.testing.assert_allclose(tensor, cxr.reference_preprocess(item), atol=TOLERANCE, rtol=0)
    assert (
        -2.01 <= result.tensors.min() and result.tensors.max() <= 2.01
    )  # [0, 1] normalised to [-2, 2]


def test_the_jpeg_frame_decodes_like_the_dicom_pixels():
    encoded = cxr.load(str(JPEG_DICOM))
    pixels = cxr.Pixels(cxr.dicom_unit_range(pydicom.dcmread(JPEG_DICOM)))
    a, b = cxr.reference_preprocess(encoded), cxr.reference_preprocess(pixels)
    assert (
        np.abs(a - b).max() < 4 / 255 / cxr.CXR_STD
    )  # two JPEG decoders: within a few grey levels


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(SAMPLES / "nema-wg04_RG1_chest_UNCR.dcm")
    x = cxr.dicom_unit_range(ds)
    assert 0.0 <= x.min() and x.max() <= 1.0
    raw = ds.pixel_array.astype(np.float32)
    assert np.corrcoef(x.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.9


def _tiff(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format="TIFF")
    return out.getvalue()


def test_bad_images_are_reported_and_skipped_without_failing_the_batch(preprocess):
    png = PNGS[0].read_bytes()
    frame = cxr.load(str(JPEG_DICOM)).data
    tiff = _tiff(PNGS[-1].read_bytes())
    items = [
        cxr.Encoded(png),
        cxr.Encoded(png[: len(png) // 3]),  # truncated PNG: caught by the cheap check
        cxr.Encoded(b""),
        cxr.Encoded(b"not an image at all"),
        cxr.Encoded(frame[: len(frame) // 2]),  # truncated JPEG
        cxr.Encoded(tiff[: len(tiff) // 2]),  # passes the check, fails in DALI: isolated by rerun
        cxr.Pixels(np.full((8, 8), np.nan)),
        cxr.Encoded(frame),
    ]
    result = preprocess(items)
    assert result.ok.tolist() == [True, False, False, False, False, False, False, True]
    assert result.errors == {
        1: "unreadable_header",
        2: "empty",
        3: "unreadable_header",
        4: "truncated_jpeg",
        5: "decode_failed",
        6: "bad_pixels",
    }
    np.testing.assert_allclose(
        result.tensors[0], cxr.reference_preprocess(items[0]), atol=TOLERANCE
    )
    np.testing.assert_allclose(
        result.tensors[7], cxr.reference_preprocess(items[7]), atol=TOLERANCE
    )
    assert not result.tensors[1:7].any()


def test_unreadable_files_are_bad_images(tmp_path):
    with pytest.raises(image_files.BadImage, match="not_found"):
        cxr.load(str(tmp_path / "missing.png"))
    with pytest.raises(image_files.BadImage, match="unreadable_file"):  # the known-bad JPEG stream
        cxr.load(str(SAMPLES.parent / "dicom-samples" / "JPEG-lossy.dcm"))
    with pytest.raises(image_files.BadImage, match="unsupported_uri_scheme"):
        cxr.load("s3://bucket/image.jpg")


def test_the_pipeline_published_for_tritons_dali_backend_gives_the_workers_tensors(
    tmp_path, preprocess
):
    import shutil

    from nvidia.dali import Pipeline

    from m3t.settings import PROJECT_ROOT
    from trainer.publish import (
        CXR_EMBED,
        CXR_PREPROCESS,
        Batching,
        publish_cxr_pipeline,
        read_config,
    )

    (tmp_path / "m3t_enc_cxr").mkdir()
    shutil.copy(
        PROJECT_ROOT / "model_repo" / "m3t_enc_cxr" / "config.pbtxt", tmp_path / "m3t_enc_cxr"
    )
    published = publish_cxr_pipeline(
        tmp_path, "cpu", Batching(max_batch_size=8, preferred_batch_size=(4,))
    )
    assert published[CXR_PREPROCESS] == tmp_path / CXR_PREPROCESS / "1"

    # The configs chain by name: bytes -> the pipeline's external source; its output -> the
    # X-ray encoder's input; the encoder's output -> the ensemble's output.
    dali, ensemble = (
        read_config(tmp_path / name / "config.pbtxt") for name in (CXR_PREPROCESS, CXR_EMBED)
    )
    encoder = read_config(tmp_path / "m3t_enc_cxr" / "config.pbtxt")
    assert (
        dali.backend == "dali"
        and dali.input[0].name == "input"
        and dali.input[0].allow_ragged_batch
    )
    assert list(dali.output[0].dims) == list(encoder.input[0].dims) == [1, 128, 128]
    first, second = ensemble.ensemble_scheduling.step
    assert (first.model_name, second.model_name) == (CXR_PREPROCESS, "m3t_enc_cxr")
    assert first.input_map["input"] == ensemble.input[0].name
    assert second.input_map[encoder.input[0].name] == first.output_map[dali.output[0].name]
    assert second.output_map[encoder.output[0].name] == ensemble.output[0].name
    assert (tmp_path / CXR_EMBED / "1").is_dir()

    # The serialized pipeline, run as the backend runs it (one image's bytes per sample),
    # equals the worker's in-process DALI preprocessing.
    images = [path.read_bytes() for path in PNGS[:2]] + [cxr.from_dicom(JPEG_DICOM).data]
    pipe = Pipeline.deserialize(
        filename=str(published[CXR_PREPROCESS] / "model.dali"),
        device_id=None,
        batch_size=8,
        num_threads=1,
    )
    pipe.build()
    pipe.feed_input("input", [np.frombuffer(data, np.uint8) for data in images])
    (out,) = pipe.run()
    want = preprocess([cxr.Encoded(data) for data in images])
    assert want.ok.all()
    for i in range(len(images)):
        np.testing.assert_array_equal(np.array(out[i]), want.tensors[i])

    # A new version each time, never an overwrite.
    assert publish_cxr_pipeline(tmp_path, "cpu")[CXR_PREPROCESS].name == "2"


def test_a_gpu_pipeline_for_triton_without_cuda_here_is_a_clear_exit_2(tmp_path):
    from typer.testing import CliRunner

    from trainer.cli import export_app

    result = CliRunner().invoke(export_app, ["dali", "--repo", str(tmp_path), "--device", "gpu"])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not list(tmp_path.iterdir())
