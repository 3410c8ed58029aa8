"""Issue 16, item 4: chest X-rays are read safely.

URIs resolve only under the image roots (real paths: no ``..``, no symlink out), regular
files only, with a size cap and a read timeout; DICOM headers are capped before any pixel is
decoded and a deflated data set cannot inflate without bound; a missing file is retried with
backoff, then recorded as absent, counted and logged. Real files in temporary folders
throughout; the scorers run the published ONNX files in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from features import cxr, image_files
from features import model_inputs as mi
from m3t.settings import PROJECT_ROOT, Settings
from stream.scoring import EMB_KEY, EMB_TTL_S, CachedEncoderScorer, FullModelScorer
from stream.xrays import CxrInputs, MissingImages, XrayOutcomes

DATA = Settings().data_dir
PNG = DATA / "cxr-samples" / "nih-cxr14_00027426_000_512px.png"
DICOM_SAMPLES = sorted((DATA / "dicom-samples").glob("*.dcm"))
CXR = mi.MODALITIES.index("cxr")


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "xrays").mkdir()
    return tmp_path / "xrays"


def confined(root: Path, **limits) -> image_files.ImageAccess:
    return dataclasses.replace(image_files.UNCONFINED, roots=(root,), **limits)


def refused(uri: str, access: image_files.ImageAccess, base_dir: Path | None = None) -> str:
    with pytest.raises(image_files.BadImage) as exc:
        cxr.load(uri, base_dir, access)
    reason = str(exc.value)
    assert reason in image_files.REASONS  # a reason, never a path
    return reason


# --- where files may be read from --------------------------------------------------------------


def test_files_outside_the_roots_are_refused_whatever_the_uri(root, tmp_path):
    access = confined(root)
    shutil.copy(PNG, root / "in.png")
    assert isinstance(cxr.load((root / "in.png").as_uri(), access=access), cxr.Encoded)
    outside = tmp_path / "outside.png"
    shutil.copy(PNG, outside)
    for uri in (
        "file:///etc/passwd",
        "/etc/passwd",
        "file:///../../etc/hostname",
        "file:///%2e%2e/%2e%2e/etc/hostname",
        f"{root.as_uri()}/../outside.png",
        str(root / ".." / "outside.png"),
        outside.as_uri(),
        (tmp_path / "nowhere.png").as_uri(),  # absent too: still outside, not "not_found"
    ):
        assert refused(uri, access) == "outside_image_roots", uri
    assert refused("file://elsewhere/etc/passwd", access) == "unsupported_uri_scheme"
    assert refused("s3://bucket/x.png", access) == "unsupported_uri_scheme"
    assert refused("file:///tmp/a%00b.png", access) == "bad_uri"
    for unclosed in ("//[x/a.dcm", "file://[x/a.png", "http://[::1/a.png"):
        assert refused(unclosed, access) == "bad_uri"


def test_relative_uris_resolve_under_a_base_dir_that_is_itself_under_a_root(root, tmp_path):
    access = confined(root)
    (root / "cohort").mkdir()
    shutil.copy(PNG, root / "cohort" / "a.png")
    shutil.copy(PNG, tmp_path / "b.png")
    assert isinstance(cxr.load("a.png", root / "cohort", access), cxr.Encoded)
    assert refused("../../b.png", access, base_dir=root / "cohort") == "outside_image_roots"
    assert refused("b.png", access, base_dir=tmp_path) == "outside_image_roots"


def test_symlinks_are_followed_only_where_they_stay_under_a_root(root, tmp_path):
    access = confined(root)
    (root / "sub").mkdir()
    shutil.copy(PNG, root / "sub" / "real.png")
    shutil.copy(PNG, tmp_path / "secret.png")
    (root / "inside.png").symlink_to(root / "sub" / "real.png")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "escape_dir").symlink_to(tmp_path)
    assert isinstance(cxr.load(str(root / "inside.png"), access=access), cxr.Encoded)
    assert refused(str(root / "escape.png"), access) == "outside_image_roots"
    assert refused(str(root / "escape_dir" / "secret.png"), access) == "outside_image_roots"
    # A root that is itself a symlink: what is under its target is under the root.
    (tmp_path / "linked_root").symlink_to(root)
    linked = confined(tmp_path / "linked_root")
    assert isinstance(cxr.load(str(root / "sub" / "real.png"), access=linked), cxr.Encoded)


@pytest.mark.timeout(10)
def test_a_fifo_a_device_and_a_directory_are_refused_without_blocking(root):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    (root / "pipe.dcm").symlink_to(fifo)
    (root / "folder.png").mkdir()
    access = confined(root)
    started = time.monotonic()
    assert refused(fifo.as_uri(), access) == "not_a_regular_file"
    assert refused(str(root / "pipe.dcm"), access) == "not_a_regular_file"
    assert refused(str(root / "folder.png"), access) == "not_a_regular_file"
    assert refused("/dev/zero", confined(Path("/dev"))) == "not_a_regular_file"
    assert time.monotonic() - started < 2


def test_files_over_max_bytes_are_refused_before_reading(root):
    shutil.copy(PNG, root / "a.png")
    size = PNG.stat().st_size
    assert refused(str(root / "a.png"), confined(root, max_bytes=size - 1)) == "too_large"
    assert isinstance(
        cxr.load(str(root / "a.png"), access=confined(root, max_bytes=size)), cxr.Encoded
    )


def test_missing_files_are_not_found_and_encoded_images_keep_their_checks(root):
    access = confined(root)
    assert refused(str(root / "later.png"), access) == "not_found"
    assert refused(str(root / "no" / "such" / "dir.png"), access) == "not_found"
    from PIL import Image

    Image.new("L", (100, 10)).save(root / "wide.png")
    assert refused(str(root / "wide.png"), confined(root, max_side=64)) == "too_large"
    assert isinstance(cxr.load(str(root / "wide.png"), access=access), cxr.Encoded)
    (root / "junk.png").write_bytes(b"not an image")  # read, then refused by the pipeline
    images, ok, errors = cxr.preprocess_uris(
        [str(root / n) for n in ("wide.png", "junk.png", "later.png")],
        cxr.CxrPreprocessor(batch_size=2, device="cpu"),
        access=access,
    )
    assert ok.tolist() == [True, False, False]
    assert errors == {"unreadable_header": 1, "not_found": 1}


@pytest.mark.timeout(10)
def test_check_uri_refuses_what_can_never_be_read_and_lets_a_late_file_pass(root):
    access = confined(root)
    os.mkfifo(root / "pipe.png")
    (root / "dir.png").mkdir()
    shutil.copy(PNG, root / "a.png")
    image_files.check_uri((root / "a.png").as_uri(), access=access)
    image_files.check_uri(str(root / "later.png"), access=access)  # may still land
    for uri, reason in (
        ("file:///etc/passwd", "outside_image_roots"),
        ("file:///../../etc/hostname", "outside_image_roots"),
        (str(root / "pipe.png"), "not_a_regular_file"),
        (str(root / "dir.png"), "not_a_regular_file"),
        ("http://example.org/a.png", "unsupported_uri_scheme"),
    ):
        with pytest.raises(image_files.BadImage, match=f"^{reason}$"):
            image_files.check_uri(uri, access=access)
    with pytest.raises(image_files.BadImage, match="^too_large$"):
        image_files.check_uri(str(root / "a.png"), access=confined(root, max_bytes=10))


# --- reads that stall --------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_a_read_that_stalls_fails_after_the_timeout():
    release = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(image_files.BadImage, match="read_timeout"):
            image_files.call_with_timeout(release.wait, 0.2)
        assert 0.15 < time.monotonic() - started < 1.5
        assert image_files.call_with_timeout(lambda: 7, 1.0) == 7
        with pytest.raises(KeyError):  # a failure inside is the caller's
            image_files.call_with_timeout(lambda: {}["x"], 1.0)
    finally:
        release.set()


@pytest.mark.timeout(10)
def test_stuck_reads_hold_their_threads_and_later_reads_fail_fast():
    calls = image_files.TimedCalls(threads=1)
    release = threading.Event()
    try:
        with pytest.raises(image_files.BadImage, match="read_timeout"):
            calls.call(release.wait, 0.1)  # stuck: its thread is not free again
        started = time.monotonic()
        with pytest.raises(image_files.BadImage, match="read_timeout"):
            calls.start(lambda: 1, 5.0, slot_deadline=time.monotonic() + 0.1)()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the stuck read returned: its thread is free
        try:
            assert calls.call(lambda: 2, 1.0) == 2
            break
        except image_files.BadImage:
            time.sleep(0.05)
    else:
        pytest.fail("the read thread was never freed")


# --- DICOM -------------------------------------------------------------------------------------


def write_dicom(path: Path, rows, cols, pixels: bytes, frames=None, syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_headers_are_capped_before_any_pixel_is_decoded(root):
    access = confined(root)
    image = write_dicom(root / "ok.dcm", 100, 80, bytes(range(100)) * 80)
    assert cxr.load(str(image), access=access).array.shape == (100, 80)
    assert refused(str(image), confined(root, max_side=64)) == "too_large"
    # Claims 60000 x 60000 (3.6 GB) with 4 bytes of pixel data.
    claim = write_dicom(root / "claim.dcm", 60000, 60000, b"\x00" * 4)
    assert refused(str(claim), access) == "too_large"
    frames = write_dicom(root / "frames.dcm", 8, 8, bytes(8 * 8 * 5), frames=5)
    assert refused(str(frames), confined(root, max_frames=4)) == "too_many_frames"
    assert cxr.load(str(frames), access=confined(root, max_frames=5)).array.shape == (8, 8)


def test_a_deflated_dicom_inflates_no_further_than_max_bytes(root):
    side = 4096  # 16 MiB of zeros, about 16 KB deflated
    bomb = write_dicom(
        root / "bomb.dcm", side, side, bytes(side * side), syntax=DeflatedExplicitVRLittleEndian
    )
    assert bomb.stat().st_size < 64 * 1024
    tracemalloc.start()
    try:
        assert refused(str(bomb), confined(root, max_bytes=1 << 20)) == "too_large"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # pydicom alone inflates it whole (about 48 MB for the header)
    item = cxr.load(str(bomb), access=confined(root))  # within the default cap it reads
    assert item.array.shape == (side, side)


# One sample (SC_rgb_jpeg.dcm) says explicit VR and holds implicit: pydicom warns and reads it.
@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")
@pytest.mark.parametrize("path", DICOM_SAMPLES, ids=lambda p: p.name)
def test_every_shared_dicom_sample_reads_as_pydicom_decodes_it_or_is_refused_by_reason(path):
    """Deflated, RLE, JPEG variants: safe loading reads what plain pydicom reads."""
    many = dataclasses.replace(image_files.UNCONFINED, roots=(DATA,), max_frames=64)
    try:
        want = cxr.dicom_unit_range(pydicom.dcmread(path))
    except Exception:  # colour, or the known-bad JPEG stream
        want = None
    try:
        item = cxr.load(path.as_uri(), access=many)
    except image_files.BadImage as exc:
        assert want is None and str(exc) in ("not_grayscale", "unreadable_file"), str(exc)
        return
    assert want is not None
    if isinstance(item, cxr.Encoded):
        assert cxr.reference_preprocess(item).shape == (1, mi.CXR_SIZE, mi.CXR_SIZE)
    else:
        np.testing.assert_array_equal(item.array, want)
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1)
    if frames > image_files.UNCONFINED.max_frames:
        assert refused(path.as_uri(), image_files.UNCONFINED) == "too_many_frames"


# --- missing files: retried with backoff, then recorded as absent -----------------------------


def test_a_missing_image_is_retried_with_backoff_until_the_retry_time_has_passed():
    missing = MissingImages(retry_s=300)
    t0 = 1_000.0
    assert missing.missed(7, "a", t0)  # awaited: score it absent, record nothing
    tries = [float(t - t0) for t in np.arange(t0, t0 + 300.5, 0.5) if missing.due(t) == [7]]
    # 1 s, doubling, at most a minute apart; the last try at the retry time.
    assert tries == [1, 3, 7, 15, 31, 63, 123, 183, 243, 300]
    assert missing.missed(7, "a", t0 + 299.9)  # still within the time
    assert not missing.missed(7, "a", t0 + 300)  # given up: record it absent
    assert missing.due(t0 + 10_000) == []
    assert not missing.missed(7, "a", t0 + 301)  # and it stays given up
    assert missing.missed(7, "b", t0 + 302)  # a new image is awaited afresh
    missing.found(7)
    assert missing.due(t0 + 10_000) == [] and not missing.awaited


def test_a_miss_nobody_retries_is_forgotten_and_retry_zero_gives_up_at_once():
    missing = MissingImages(retry_s=10)
    assert missing.missed(1, "a", 0.0)
    assert missing.due(10.0) == [1]
    assert missing.due(69.0) == []
    assert missing.due(70.0) == [] and not missing.awaited  # never rescored: forgotten
    assert not MissingImages(retry_s=0).missed(1, "a", 0.0)


def test_outcomes_count_and_log_the_reason_only(caplog):
    clock = [0.0]
    outcomes = XrayOutcomes(retry_s=5, clock=lambda: clock[0])
    hadm, uris = [501, 502, 503], ["/x/late.png", "/etc/passwd", "/x/ok.png"]
    failed = {0: "not_found", 1: "outside_image_roots"}
    with caplog.at_level(logging.WARNING, logger="stream.scoring"):
        assert outcomes.settle(hadm, uris, [0, 1, 2], failed) == {0}
        assert outcomes.errors == Counter({"outside_image_roots": 1})
        clock[0] = 5.0
        assert outcomes.settle(hadm, uris, [0], {0: "not_found"}) == set()
    assert outcomes.errors == Counter({"outside_image_roots": 1, "not_found": 1})
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "chest X-ray scored as absent: outside_image_roots (1 so far)",
        "chest X-ray scored as absent: not_found (1 so far)",
    ]
    assert not any(s in line for line in lines for s in ("/x/", "passwd", "501", "502"))


# --- the scorers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_repo(tmp_path_factory) -> Path:
    """A small M3T-LM published as ONNX files, for the in-process backend."""
    from tests.tiny_model import publish_tiny

    repo = tmp_path_factory.mktemp("images-repo") / "model_repo"
    shutil.copytree(PROJECT_ROOT / "model_repo", repo)
    publish_tiny(repo, repo.parent / "onnx", vocab_size=32, seed=5)
    return repo


def scorer_settings(onnx_repo: Path, root: Path, retry_s: float = 30.0) -> Settings:
    return Settings(
        state_dir=root.parent / "state",
        model_repo=onnx_repo,
        images={"roots": (root,), "missing_retry_s": retry_s},
    )


def batch(hadm_ids: list[int], uris: list[str], n_numeric: int) -> dict:
    arrays = {
        spec.name: np.zeros((len(uris), *spec.shape), spec.dtype)
        for spec in mi.input_specs(n_numeric)
    }
    arrays[mi.MODALITY_MASK][:, CXR] = [1.0 if u else 0.0 for u in uris]
    arrays["cxr_uri"] = np.array(uris, dtype=object)
    arrays["hadm_id"] = np.array(hadm_ids, dtype=np.int64)
    return arrays


def n_numeric(onnx_repo: Path) -> int:
    from trainer.publish import read_config

    config = read_config(onnx_repo / "m3t_lm" / "config.pbtxt")
    return {t.name: tuple(t.dims) for t in config.input}[mi.NUMERIC][0]


def test_the_full_model_scorer_retries_a_missing_xray_then_records_it_absent(
    onnx_repo, root, caplog
):
    clock = [1_000.0]
    scorer = FullModelScorer(
        scorer_settings(onnx_repo, root),
        cxr=CxrInputs(cxr.CxrPreprocessor(batch_size=4, device="cpu")),
        backend="onnx",
        clock=lambda: clock[0],
    )
    shutil.copy(PNG, root / "here.png")
    late, never = root / "late.png", root / "never.png"
    uris = [str(late), str(root / "here.png"), str(never), "file:///etc/passwd", ""]
    inputs = batch([11, 12, 13, 14, 15], uris, n_numeric(onnx_repo))

    def with_image():
        return scorer.arrays(inputs)[mi.MODALITY_MASK][:, CXR].tolist()

    with caplog.at_level(logging.WARNING, logger="stream.scoring"):
        assert with_image() == [0, 1, 0, 0, 0]
        los, mortality = scorer.score(inputs)
        assert np.isfinite(los).all() and np.isfinite(mortality).all()
        assert scorer.image_errors == Counter({"outside_image_roots": 2})  # scored twice
        assert scorer.retries_due(1_000.5) == []
        assert scorer.retries_due(1_001.0) == [11, 13]

        shutil.copy(PNG, late)  # the file lands
        clock[0] = 1_002.0
        assert with_image() == [1, 1, 0, 0, 0]
        assert scorer.retries_due(1_003.0) == [13]  # the landed one is no longer awaited

        clock[0] = 1_030.0  # missing_retry_s after the first miss
        assert with_image() == [1, 1, 0, 0, 0]
        assert scorer.image_errors["not_found"] == 1
        assert scorer.retries_due(5_000.0) == []
    assert "chest X-ray scored as absent: not_found (1 so far)" in caplog.messages
    assert not any("never" in m or "13" in m or "passwd" in m for m in caplog.messages)


@pytest.mark.services
def test_the_cached_scorer_does_not_cache_a_missing_xray_until_it_is_given_up(
    onnx_repo, root, redis_client
):
    clock = [1_000.0]
    scorer = CachedEncoderScorer(
        scorer_settings(onnx_repo, root, retry_s=60),
        redis_client,
        cxr=CxrInputs(cxr.CxrPreprocessor(batch_size=4, device="cpu")),
        backend="onnx",
        clock=lambda: clock[0],
    )
    hadm_ids = [9_160_401, 9_160_402, 9_160_403]
    keys = [EMB_KEY.format(hadm_id=h) for h in hadm_ids]
    redis_client.delete(*keys)
    late, never = root / "late.png", root / "never.png"
    inputs = batch(hadm_ids, [str(late), str(never), str(root / "../x.png")], n_numeric(onnx_repo))

    def cached(key: str) -> dict:
        return {k.decode(): v for k, v in redis_client.hgetall(key).items()}

    try:
        scorer.score(inputs)
        assert "cxr_stamp" not in cached(keys[0]) and "cxr_stamp" not in cached(keys[1])
        assert np.frombuffer(cached(keys[2])["cxr_ok"], np.float32)[0] == 0  # final: cached
        assert scorer.image_errors == Counter({"outside_image_roots": 1})
        assert scorer.retries_due(1_001.0) == hadm_ids[:2]

        shutil.copy(PNG, late)
        clock[0] = 1_001.0
        runs = scorer.runs["cxr"]
        scorer.score(batch(hadm_ids[:2], [str(late), str(never)], n_numeric(onnx_repo)))
        assert scorer.runs["cxr"] == runs + 2  # both read again: neither was cached
        assert np.frombuffer(cached(keys[0])["cxr_ok"], np.float32)[0] == 1

        clock[0] = 1_060.0
        scorer.score(batch(hadm_ids[1:2], [str(never)], n_numeric(onnx_repo)))
        absent = cached(keys[1])
        assert "cxr_stamp" in absent and np.frombuffer(absent["cxr_ok"], np.float32)[0] == 0
        assert 0 < redis_client.ttl(keys[1]) <= EMB_TTL_S
        assert scorer.image_errors == Counter({"outside_image_roots": 1, "not_found": 1})
        assert scorer.retries_due(10_000.0) == []
        runs = scorer.runs["cxr"]
        scorer.score(batch(hadm_ids[1:2], [str(never)], n_numeric(onnx_repo)))
        assert scorer.runs["cxr"] == runs  # recorded absent: not read again
    finally:
        redis_client.delete(*keys)


@pytest.mark.services
def test_images_scored_as_absent_are_in_the_metrics(redis_client):
    from prometheus_client import CollectorRegistry, generate_latest

    from stream.metrics import COUNTERS, METRICS_KEY, RedisWorkerCollector, WorkerMetrics

    errors = Counter({"not_found": 2, "outside_image_roots": 1})
    metrics = WorkerMetrics(redis_client, "images-test", images=errors)
    metrics.flush({name: 0 for name in COUNTERS})
    errors["too_large"] += 1  # live: the next flush has it
    metrics.flush({name: 0 for name in COUNTERS})
    registry = CollectorRegistry()
    registry.register(RedisWorkerCollector(redis_client))
    text = generate_latest(registry).decode()
    for reason, count in (("not_found", 2), ("outside_image_roots", 1), ("too_large", 1)):
        line = f'm3t_images_absent_total{{reason="{reason}",worker="images-test"}} {count}.0'
        assert line in text
    redis_client.hdel(METRICS_KEY, "images-test")
