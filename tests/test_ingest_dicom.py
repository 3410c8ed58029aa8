"""DICOM: compressed frames handed on undecoded, pixels as arrays, bad files refused by reason."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from ingest.dicom import DicomImage, InvalidDicom, read_header, read_image
from ingest.synth import RadiographPainter, _jpeg, write_dicom
from m3t.settings import Settings

DATA = Settings().data_dir
SAMPLES = sorted((DATA / "dicom-samples").glob("*.dcm")) + sorted(
    (DATA / "cxr-samples").glob("*.dcm")
)
KNOWN_BAD = "JPEG-lossy.dcm"  # a broken JPEG stream (see dicom-samples/PROVENANCE.md)
PHI = ("SYNTHETIC^PATIENT10000032", "10000032", "21000101")


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    return RadiographPainter(128).paint(np.random.default_rng(0), signal=1.5, side=0)


def _synthetic(tmp_path: Path, pixels: np.ndarray, compressed: bool, modality: str) -> Path:
    path = tmp_path / f"{modality}-{'jpeg' if compressed else 'raw'}.dcm"
    write_dicom(
        path,
        pixels,
        jpeg=_jpeg(pixels) if compressed else None,
        modality=modality,
        view="PA" if modality == "CR" else "AP",
        studytime=datetime(2150, 1, 2, 9, 30),
        subject_id=10000032,
        study_id=50000003,
        dicom_id="d-1",
    )
    return path


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_generator_jpeg_variant_is_handed_on_encoded(tmp_path, radiograph, modality):
    image = read_image(_synthetic(tmp_path, radiograph, compressed=True, modality=modality))
    assert image.kind == "encoded" and image.transfer_syntax == pydicom.uid.JPEGBaseline8Bit
    assert (image.modality, image.rows, image.cols, image.photometric) == (
        modality,
        128,
        128,
        "MONOCHROME2",
    )
    assert image.data[:2] == b"\xff\xd8"
    decoded = np.asarray(Image.open(io.BytesIO(image.data)))  # what DALI will do later
    assert np.abs(decoded.astype(int) - radiograph).max() < 40


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_generator_uncompressed_variant_gives_the_pixels(tmp_path, radiograph, modality):
    image = read_image(_synthetic(tmp_path, radiograph, compressed=False, modality=modality))
    assert image.kind == "pixels" and image.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(image.data, radiograph)


def test_header_has_the_study_time_and_no_identifiers(tmp_path, radiograph):
    path = _synthetic(tmp_path, radiograph, compressed=True, modality="CR")
    assert pydicom.dcmread(path).PatientName == PHI[0]  # the file does carry them...
    header = read_header(path)
    assert (header.study_date, header.study_time, header.view_position) == (
        "21500102",
        "093000",
        "PA",
    )
    for result in (header, read_image(path)):  # ...nothing that leaves this module does
        values = [
            v for v in dataclasses.asdict(result).values() if not isinstance(v, (bytes, np.ndarray))
        ]
        assert not any(phi in str(v) for phi in PHI for v in values)
        assert not any(phi in repr(result) for phi in PHI[:1])


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_shared_sample_is_parsed_or_refused_with_a_reason(path):
    if path.name == KNOWN_BAD:
        with pytest.raises(InvalidDicom) as refused:
            read_image(path)
        assert refused.value.reason in {"undecodable", "no_decoder"}
        return
    try:
        image = read_image(path)
    except InvalidDicom as exc:
        # Only a missing optional decoder (pylibjpeg for JPEG-LS / lossless / 12-bit JPEG)
        # may refuse.
        assert exc.reason in {"no_decoder", "undecodable"}
        assert "JPEG" in exc.detail and "Baseline" not in exc.detail and "2000" not in exc.detail
        return
    assert isinstance(image, DicomImage) and image.rows > 0 and image.cols > 0
    if image.kind == "encoded":
        assert isinstance(image.data, bytes) and len(image.data) > 0
    else:
        assert image.data.shape[-2:] == (image.rows, image.cols) or image.data.shape[-3:-1] == (
            image.rows,
            image.cols,
        )


def test_the_chest_samples_cover_both_paths():
    kinds = {p.name: read_image(p).kind for p in sorted((DATA / "cxr-samples").glob("*.dcm"))}
    assert kinds["nih-cxr14_siim-acr_CR_jpeg-baseline.dcm"] == "encoded"
    assert kinds["nema-wg04_RG1_chest_J2KR.dcm"] == "encoded"
    assert kinds["nema-wg04_RG1_chest_UNCR.dcm"] == "pixels"


def test_lossless_copies_decode_to_the_same_pixels():
    reference = read_image(DATA / "dicom-samples/MR_small.dcm").data
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"):
        np.testing.assert_array_equal(read_image(DATA / "dicom-samples" / name).data, reference)


def test_non_dicom_files_are_refused(tmp_path):
    png = DATA / "cxr-samples/nih-cxr14_00027426_000_512px.png"
    with pytest.raises(InvalidDicom, match="not_dicom"):
        read_image(png)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(InvalidDicom) as refused:
        read_image(empty)
    assert refused.value.reason in {"not_dicom", "unreadable"}
    with pytest.raises(InvalidDicom, match="missing_file"):
        read_image(tmp_path / "nowhere.dcm")


@pytest.mark.parametrize("compressed", [True, False], ids=["jpeg", "uncompressed"])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.995])
def test_truncated_files_are_refused(tmp_path, radiograph, compressed, keep):
    whole = _synthetic(tmp_path, radiograph, compressed=compressed, modality="DX").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(InvalidDicom) as refused:
        read_image(cut)
    assert refused.value.reason in {
        "truncated",
        "unreadable",
        "truncated_pixel_data",
        "truncated_frame",
    }
    assert not any(phi in str(refused.value) for phi in PHI)


@pytest.mark.parametrize(
    ("keyword", "vr", "value"), [("NumberOfFrames", "IS", [1, 2]), ("Rows", "US", [256, 2])]
)
def test_a_multi_valued_size_is_refused_with_a_reason(tmp_path, radiograph, keyword, vr, value):
    path = _synthetic(tmp_path, radiograph, compressed=True, modality="DX")
    dataset = pydicom.dcmread(path)
    dataset.add_new(keyword, vr, value)  # one number by the standard, two here
    dataset.save_as(path)
    with pytest.raises(InvalidDicom) as refused:
        read_header(path)
    assert (refused.value.reason, refused.value.detail) == ("invalid_attribute", keyword)
