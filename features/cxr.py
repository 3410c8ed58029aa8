"""Chest X-ray preprocessing with NVIDIA DALI: bytes or pixels -> the model's ``cxr`` input.

One pipeline definition, ``cxr_pipeline``, with the device and the input kind as
parameters:

* ``source="encoded"``: compressed bytes (PNG/JPEG files, or the JPEG frame pydicom hands
  over from an encapsulated DICOM without decoding it) -> ``fn.decoders.image`` (GRAY;
  ``device="mixed"`` decodes with nvJPEG where there is a GPU, ``"cpu"`` elsewhere);
* ``source="pixels"``: pixel arrays already scaled to [0, 1] (uncompressed or
  high-bit-depth DICOM, decoded by pydicom).

Both then take the same steps: ``fn.resize`` to ``CXR_SIZE`` x ``CXR_SIZE`` (linear,
antialiased: a triangle filter as wide as the scale factor, edges replicated) and
``fn.crop_mirror_normalize`` to ``(x - CXR_MEAN) / CXR_STD`` with x in [0, 1], CHW.

DALI fails a whole batch on one undecodable sample, so each sample's bytes are checked
cheaply first (``check_encoded``); if a batch still fails, its samples are rerun one at a
time to find the culprit. A bad image is reported with a reason and skipped; it never
fails the batch.

Images are read by URI (``load``, ``read_images``) only where an ``ImageAccess`` allows
(``features.image_files``). DICOM headers are checked (rows, columns, frames) before any
pixel is decoded, and a deflated data set is inflated to at most ``max_bytes``.

``reference_preprocess`` is the same transform in Pillow/NumPy, for tests.
"""

from __future__ import annotations

import functools
import io
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from features.image_files import (
    READ_THREADS,
    UNCONFINED,
    BadImage,
    ImageAccess,
    _path_of,
    _read_file,
    _real_roots,
    call_with_timeout,
)
from features.model_inputs import CXR_SIZE

# Fixed, not fitted: x in [0, 1] maps to [-2, 2]. Changing them is a feature-set version bump.
CXR_MEAN = 0.5
CXR_STD = 0.25

# Transfer syntaxes whose frames DALI decodes as they are (8-bit only, see from_dicom).
DALI_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "jpeg_baseline",
    "1.2.840.10008.1.2.4.90": "jpeg2000_lossless",
    "1.2.840.10008.1.2.4.91": "jpeg2000",
}


@dataclass(frozen=True)
class Encoded:
    data: bytes


@dataclass(frozen=True)
class Pixels:
    array: np.ndarray  # [H, W] float32 in [0, 1]


@dataclass
class Result:
    tensors: np.ndarray  # [N, 1, S, S] float32; zeros where the image failed
    ok: np.ndarray  # [N] bool
    errors: dict[int, str] = field(default_factory=dict)  # input index -> reason


# --- the pipeline ------------------------------------------------------------------------------


def _pipeline_def():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def cxr_pipeline(source: str = "encoded", decode_device: str = "cpu", size: int = CXR_SIZE):
        if source == "encoded":
            data = fn.external_source(name="input", dtype=types.UINT8)
            images = fn.decoders.image(data, device=decode_device, output_type=types.GRAY)
            scale = 255.0
        else:
            images = fn.external_source(name="input", dtype=types.FLOAT, layout="HWC")
            images = images.gpu() if decode_device == "mixed" else images
            scale = 1.0
        images = fn.resize(
            images,
            resize_x=size,
            resize_y=size,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
            dtype=types.FLOAT,
        )
        return fn.crop_mirror_normalize(
            images,
            mean=[CXR_MEAN * scale],
            std=[CXR_STD * scale],
            output_layout="CHW",
            dtype=types.FLOAT,
        )

    return cxr_pipeline


def serialized_pipeline(
    device: str = "gpu", batch_size: int = 64, num_threads: int = 4, size: int = CXR_SIZE
) -> bytes:
    """The encoded-image pipeline, serialized for Triton's DALI backend: its external source
    ``input`` takes one image's compressed bytes per sample, its one output is the ``cxr``
    tensor. ``device="gpu"`` decodes with nvJPEG; DALI serializes a GPU pipeline only where
    CUDA is present (it raises ``RuntimeError`` elsewhere)."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, not {device!r}")
    gpu = device == "gpu"
    pipe = _pipeline_def()(
        source="encoded",
        decode_device="mixed" if gpu else "cpu",
        size=size,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=0 if gpu else None,
    )
    return pipe.serialize()


def gpu_available() -> bool:
    try:
        from nvidia.dali.backend import GetCUDADeviceCount

        return GetCUDADeviceCount() > 0
    except Exception:  # no driver, no CUDA runtime: the CPU path
        return False


class CxrPreprocessor:
    """Batches of chest X-rays -> ``cxr`` tensors, with per-image errors.

    ``device``: "gpu" (decode with nvJPEG, resize on the GPU), "cpu", or "auto".
    """

    def __init__(
        self,
        batch_size: int = 16,
        device: str = "auto",
        num_threads: int = 2,
        size: int = CXR_SIZE,
        device_id: int = 0,
    ):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
        self.gpu = gpu_available() if device == "auto" else device == "gpu"
        self.batch_size, self.size = batch_size, size
        self._options = dict(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id if self.gpu else None,
            prefetch_queue_depth=1,
        )
        self._pipes = {}

    @property
    def device(self) -> str:
        return "gpu" if self.gpu else "cpu"

    def _pipe(self, source: str):
        if source not in self._pipes:
            pipe = _pipeline_def()(
                source=source,
                decode_device="mixed" if self.gpu else "cpu",
                size=self.size,
                **self._options,
            )
            pipe.build()
            self._pipes[source] = pipe
        return self._pipes[source]

    def _run(self, source: str, samples: list[np.ndarray]) -> list[np.ndarray]:
        pipe = self._pipe(source)
        pipe.feed_input("input", samples)
        (out,) = pipe.run()
        if self.gpu:
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(samples))]

    def __call__(self, items: list[Encoded | Pixels]) -> Result:
        n = len(items)
        result = Result(np.zeros((n, 1, self.size, self.size), np.float32), np.zeros(n, bool))
        queues: dict[str, list[tuple[int, np.ndarray]]] = {"encoded": [], "pixels": []}
        for i, item in enumerate(items):
            try:
                source, sample = _as_sample(item)
            except BadImage as exc:
                result.errors[i] = str(exc)
                continue
            queues[source].append((i, sample))
        for source, queue in queues.items():
            for start in range(0, len(queue), self.batch_size):
                self._run_batch(source, queue[start : start + self.batch_size], result)
        return result

    def _run_batch(self, source: str, batch: list[tuple[int, np.ndarray]], result: Result) -> None:
        try:
            outputs = self._run(source, [sample for _, sample in batch])
        except RuntimeError:
            if len(batch) == 1:
                result.errors[batch[0][0]] = "decode_failed"
                return
            for one in batch:  # find the culprit; the pipeline recovers after a failed run
                self._run_batch(source, [one], result)
            return
        for (i, _), tensor in zip(batch, outputs):
            result.tensors[i], result.ok[i] = tensor, True


def _as_sample(item: Encoded | Pixels) -> tuple[str, np.ndarray]:
    if isinstance(item, Encoded):
        check_encoded(item.data)
        return "encoded", np.frombuffer(item.data, dtype=np.uint8)
    array = np.asarray(item.array, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 1 or not np.isfinite(array).all():
        raise BadImage("bad_pixels")
    return "pixels", array[:, :, None]


# --- inputs ------------------------------------------------------------------------------------


def check_encoded(data: bytes) -> None:
    """Cheap checks that catch what would make DALI fail the batch; raises BadImage."""
    if not data:
        raise BadImage("empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            if kind == "PNG":
                image.verify()  # walks every chunk and its CRC: catches truncation
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("too_large") from None
    except Exception:
        raise BadImage("unreadable_header") from None
    if (
        kind == "JPEG" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9"
    ):  # DICOM pads frames to even length
        raise BadImage("truncated_jpeg")
    if kind not in ("PNG", "JPEG", "JPEG2000", "TIFF"):
        raise BadImage("unsupported_format")


def from_dicom(source, access: ImageAccess | None = None) -> Encoded | Pixels:
    """An image from a DICOM file (a path, the file's bytes, or a read ``pydicom.Dataset``):
    its compressed frame if DALI can decode it, else the first frame's pixels.

    The header is held to ``access``'s limits (default: the settings' defaults, no roots)
    before any pixel is decoded: rows and columns at most ``max_side``, frames at most
    ``max_frames``, one sample per pixel; raises ``BadImage`` otherwise.
    """
    from pydicom.encaps import generate_frames

    access = access or UNCONFINED
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source = call_with_timeout(lambda: _read_file(path, None, access), access.read_timeout_s)
    ours = isinstance(source, bytes)
    ds = _dicom_dataset(source, access) if ours else source
    frames = _check_dicom_header(ds, access)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    eight_bit = int(ds.BitsStored) <= 8
    if (
        syntax in DALI_TRANSFER_SYNTAXES
        and eight_bit
        and ds.PhotometricInterpretation == "MONOCHROME2"
    ):
        frame = next(generate_frames(ds.PixelData, number_of_frames=frames))
        _check_encoded_side(frame, access)
        return Encoded(frame)
    if ours:
        ds.pixel_array_options(index=0)  # only the frame that is used is decoded
    return Pixels(dicom_unit_range(ds))


def _dicom_dataset(data: bytes, access: ImageAccess):
    """A DICOM file's data set, read from its bytes; pixel data is not decoded here.

    pydicom inflates a deflated data set (Deflated Explicit VR Little Endian) whole, however
    large it grows: a few KB of zeros make hundreds of MB. Here it is inflated to at most
    ``max_bytes``, the same cap a file has, and read as the explicit little endian it is.
    """
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = DicomBytesIO(data)
    preamble = read_preamble(fp, False)  # no DICM prefix: InvalidDicomError
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(DicomBytesIO(data))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[fp.tell() :], access.max_bytes + 1)
    except zlib.error:
        raise BadImage("unreadable_file") from None
    if len(inflated) > access.max_bytes:
        raise BadImage("too_large")
    dataset = read_dataset(DicomBytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(
        "",
        dataset,
        preamble=preamble,
        file_meta=meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )


def _check_dicom_header(ds, access: ImageAccess) -> int:
    """The number of frames, once rows, columns, frames and samples are within limits."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except Exception:  # absent or not a number
        raise BadImage("unreadable_file") from None
    if min(rows, cols, frames) < 1 or "PixelData" not in ds:
        raise BadImage("unreadable_file")
    if max(rows, cols) > access.max_side:
        raise BadImage("too_large")
    if frames > access.max_frames:
        raise BadImage("too_many_frames")
    if samples != 1:
        raise BadImage("not_grayscale")
    return frames


def _check_encoded_side(data: bytes, access: ImageAccess) -> None:
    """A compressed image's sides, from its header, within ``max_side``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise BadImage("too_large") from None
    except Exception:
        return  # check_encoded says what is wrong with it
    if max(width, height) > access.max_side:
        raise BadImage("too_large")


def dicom_unit_range(ds) -> np.ndarray:
    """First frame's pixels scaled to [0, 1], bright = dense (MONOCHROME1 inverted).

    8-bit images are divided by 255 like decoded JPEG/PNG; deeper ones go through their
    VOI window when they carry one and are then stretched to their own min..max.
    """
    from pydicom.pixels import apply_voi_lut

    pixels = ds.pixel_array
    if pixels.ndim == 3 and int(ds.SamplesPerPixel) == 1:
        pixels = pixels[0]  # first frame
    if pixels.ndim != 2:
        raise BadImage("not_grayscale")
    if int(ds.BitsStored) <= 8:
        x = pixels.astype(np.float32) / 255.0
    else:
        x = (apply_voi_lut(pixels, ds) if "WindowCenter" in ds else pixels).astype(np.float32)
        low, high = float(x.min()), float(x.max())
        x = (x - low) / (high - low) if high > low else np.zeros_like(x)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        x = 1.0 - x
    return x


def load(
    uri: str, base_dir: Path | None = None, access: ImageAccess | None = None
) -> Encoded | Pixels:
    """Read a CXR by URI (``file://``, an absolute path, or a path under ``base_dir``) where
    ``access`` allows (default: anywhere, with the default limits); raises ``BadImage``."""
    (item,) = read_images([uri], base_dir, access)
    if isinstance(item, BadImage):
        raise item
    return item


# Files read one after another on one read thread: a thread costs more than a small read.
READ_GROUP = 8


def read_images(
    uris: list[str], base_dir: Path | None = None, access: ImageAccess | None = None
) -> list[Encoded | Pixels | BadImage]:
    """Each URI's image, or the ``BadImage`` that says why not.

    The files are read on the read threads, ``READ_GROUP`` files to a thread, the groups
    side by side; a group gets ``read_timeout_s`` (past it, each of its files fails with
    ``read_timeout``), and a batch waits at most that long for a free thread, so a hung mount
    costs a batch a bounded time. Decoding (DICOM) happens here, as each group arrives.
    """
    access = access or UNCONFINED
    images: list[Encoded | Pixels | BadImage | None] = [None] * len(uris)
    paths: dict[int, Path] = {}
    for i, uri in enumerate(uris):
        try:
            paths[i] = _path_of(uri)
        except BadImage as exc:
            images[i] = exc
    rows = list(paths)
    groups = [rows[start : start + READ_GROUP] for start in range(0, len(rows), READ_GROUP)]
    slot_deadline = time.monotonic() + access.read_timeout_s
    waits = [
        READ_THREADS.start(
            functools.partial(_read_group, [paths[i] for i in group], base_dir, access),
            access.read_timeout_s,
            slot_deadline,
        )
        for group in groups
    ]
    for group, wait in zip(groups, waits):
        try:
            read = wait()
        except BadImage as exc:  # the group's read stalled
            read = [exc] * len(group)
        for i, data in zip(group, read):
            if isinstance(data, BadImage):
                images[i] = data
                continue
            try:
                images[i] = _decode(paths[i], data, access)
            except BadImage as exc:
                images[i] = exc
            except Exception:  # pydicom and the codecs fail in many ways
                images[i] = BadImage("unreadable_file")
    return images


def _read_group(paths: list[Path], base_dir: Path | None, access: ImageAccess) -> list:
    read: list[bytes | BadImage] = []
    try:
        roots = _real_roots(access)
    except ValueError:  # a NUL byte in a root: nothing can be under it
        return [BadImage("bad_uri")] * len(paths)
    for path in paths:
        try:
            read.append(_read_file(path, base_dir, access, roots))
        except BadImage as exc:
            read.append(exc)
    return read


def _decode(path: Path, data: bytes, access: ImageAccess) -> Encoded | Pixels:
    if path.suffix.lower() == ".dcm":
        return from_dicom(data, access)
    _check_encoded_side(data, access)
    return Encoded(data)


def preprocess_each(
    uris: list[str],
    preprocessor: CxrPreprocessor,
    base_dir: Path | None = None,
    access: ImageAccess | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Read and preprocess images by URI: (tensors [N,1,S,S], ok [N], reason by index of
    each image that failed)."""
    size = preprocessor.size
    images = np.zeros((len(uris), 1, size, size), np.float32)
    ok = np.zeros(len(uris), bool)
    reasons: dict[int, str] = {}
    for start in range(0, len(uris), preprocessor.batch_size):
        chunk = uris[start : start + preprocessor.batch_size]
        items, where = [], []
        for j, item in enumerate(read_images(chunk, base_dir, access)):
            if isinstance(item, BadImage):
                reasons[start + j] = str(item)
            else:
                items.append(item)
                where.append(start + j)
        result = preprocessor(items)
        for k, index in enumerate(where):
            images[index], ok[index] = result.tensors[k], result.ok[k]
        for k, reason in result.errors.items():
            reasons[where[k]] = reason
    return images, ok, reasons


def preprocess_uris(
    uris: list[str],
    preprocessor: CxrPreprocessor,
    base_dir: Path | None = None,
    access: ImageAccess | None = None,
):
    """Read and preprocess images by URI: (tensors [N,1,S,S], ok [N], errors by reason).

    The offline builder and the online scorer both go through here, so a bad image is
    treated alike on both sides: zeros, ``ok`` False, counted by reason. Both pass the
    settings' ``ImageAccess``.
    """
    images, ok, reasons = preprocess_each(uris, preprocessor, base_dir, access)
    errors: dict[str, int] = {}
    for reason in reasons.values():
        errors[reason] = errors.get(reason, 0) + 1
    return images, ok, errors


# --- the reference ------------------------------------------------------------------------------


def reference_preprocess(item: Encoded | Pixels, size: int = CXR_SIZE) -> np.ndarray:
    """The pipeline's transform in Pillow/NumPy: [1, size, size] float32.

    Pillow's BILINEAR resize is the same antialiased triangle filter DALI uses; DALI
    replicates edge pixels where the filter reaches past the image, so the reference pads
    with edge pixels and resizes the original box.
    """
    if isinstance(item, Encoded):
        with Image.open(io.BytesIO(item.data)) as image:
            x = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    else:
        x = np.asarray(item.array, dtype=np.float32)
    h, w = x.shape
    pad = int(math.ceil(max(h, w) / size)) + 2
    padded = Image.fromarray(np.pad(x, pad, mode="edge"), mode="F")
    resized = np.asarray(
        padded.resize((size, size), Image.BILINEAR, box=(pad, pad, pad + w, pad + h))
    )
    return ((resized - CXR_MEAN) / CXR_STD)[None].astype(np.float32)
