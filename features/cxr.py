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

Images are read by URI (``load``, ``read_images``) only where an ``ImageAccess`` allows:
under its roots (real paths: no ``..`` or symlink leads out), regular files only (a FIFO or
a device is refused without being read), at most ``max_bytes``, each read given
``read_timeout_s`` (a stalled network mount fails the image, not the scorer). DICOM headers
are checked (rows, columns, frames) before any pixel is decoded, and a deflated data set is
inflated to at most ``max_bytes``. Every refusal is a ``BadImage`` whose message is a short,
stable reason (``REASONS``), never a path.

``reference_preprocess`` is the same transform in Pillow/NumPy, for tests.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from features.model_inputs import CXR_SIZE
from m3t.settings import ImageSettings, Settings

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


class BadImage(ValueError):
    """An image that cannot be used; its message is one of ``REASONS``."""


# Every reason a BadImage carries: short, stable (they label metrics), never a path.
REASONS = (
    "unsupported_uri_scheme",  # not file:// (or file://localhost), nor a plain path
    "bad_uri",  # a path the OS cannot take (a NUL byte, a name too long)
    "outside_image_roots",  # its real path is not under a configured root
    "not_found",  # nothing there (yet: it may still be on its way)
    "not_a_regular_file",  # a directory, FIFO, socket or device
    "too_large",  # over max_bytes (as a file or inflated), a side over max_side, a pixel bomb
    "too_many_frames",  # a DICOM with more than max_frames frames
    "read_timeout",  # the read did not finish within read_timeout_s
    "unreadable_file",  # any other read or DICOM parsing failure
    "not_grayscale",
    "bad_pixels",
    "empty",
    "unreadable_header",
    "truncated_jpeg",
    "unsupported_format",
    "decode_failed",
)
# Reasons that may clear up by themselves: the file may still land, the mount recover.
TRANSIENT = frozenset({"not_found", "read_timeout"})


@dataclass(frozen=True)
class ImageAccess:
    """Where chest X-rays may be read from, and how much of one: ``Settings.images``.

    ``roots`` None reads any path: only for callers that vouch for the path themselves (tests,
    benchmarks on known files). Everything that reads URIs from events or cohorts passes
    ``ImageAccess.from_settings``.
    """

    roots: tuple[Path, ...] | None
    max_bytes: int
    read_timeout_s: float
    max_side: int
    max_frames: int

    @classmethod
    def from_images(
        cls, images: ImageSettings, roots: tuple[Path, ...] | None = None
    ) -> ImageAccess:
        return cls(
            roots=tuple(Path(r) for r in roots) if roots is not None else None,
            max_bytes=images.max_bytes,
            read_timeout_s=images.read_timeout_s,
            max_side=images.max_side,
            max_frames=images.max_frames,
        )

    @classmethod
    def from_settings(cls, settings: Settings, extra_roots: tuple[Path, ...] = ()) -> ImageAccess:
        """The settings' image roots (``Settings.image_roots``) and limits; ``extra_roots``
        are added (the cohort folder an operator names to the offline builder)."""
        return cls.from_images(settings.images, (*settings.image_roots, *extra_roots))


# Default limits, no roots: the settings' defaults (nothing here reads the environment).
UNCONFINED = ImageAccess.from_images(ImageSettings())


# --- reads that may stall -------------------------------------------------------------------

T = TypeVar("T")


class TimedCalls:
    """Runs calls that may block (file reads: a hung network mount, a stalled disk) on daemon
    threads, at most ``threads`` at once, and waits for each until a deadline: a call that
    does not finish by then raises ``BadImage("read_timeout")`` and is abandoned (its thread
    keeps its slot until the call returns, if ever, so stuck calls cannot pile up threads).
    """

    def __init__(self, threads: int = 8):
        self._slots = threading.BoundedSemaphore(threads)

    def start(
        self, call: Callable[[], T], timeout_s: float, slot_deadline: float | None = None
    ) -> Callable[[], T]:
        """Start ``call``; returns ``wait()``, which gives its result or raises what it raised,
        or ``BadImage("read_timeout")`` once ``timeout_s`` have passed since it started.

        A free thread is waited for until ``slot_deadline`` (a ``time.monotonic()`` value;
        default ``timeout_s`` from now): if every thread is stuck, so would this call be."""
        now = time.monotonic()
        slot_deadline = now + timeout_s if slot_deadline is None else slot_deadline
        if not self._slots.acquire(timeout=max(0.0, slot_deadline - now)):
            return _timed_out
        box: list = []
        finished = threading.Event()
        deadline = time.monotonic() + timeout_s

        def run() -> None:
            try:
                box.append((True, call()))
            except BaseException as exc:  # handed to the waiting caller
                box.append((False, exc))
            finally:
                self._slots.release()
                finished.set()

        try:
            threading.Thread(target=run, name="m3t-image-read", daemon=True).start()
        except RuntimeError:  # no thread to be had: as good as stuck
            self._slots.release()
            return _timed_out

        def wait() -> T:
            if not finished.wait(max(0.0, deadline - time.monotonic())):
                raise BadImage("read_timeout")
            ok, value = box[0]
            if ok:
                return value
            raise value

        return wait

    def call(self, call: Callable[[], T], timeout_s: float) -> T:
        return self.start(call, timeout_s)()


def _timed_out():
    raise BadImage("read_timeout")


_READS = TimedCalls()


def call_with_timeout(call: Callable[[], T], timeout_s: float) -> T:
    """``call()`` on the image-read threads; ``BadImage("read_timeout")`` after ``timeout_s``."""
    return _READS.call(call, timeout_s)


# --- reading a file under the roots ------------------------------------------------------------


def _path_of(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://host/...: not this machine's file
            raise BadImage("unsupported_uri_scheme")
        return Path(unquote(parsed.path))
    if parsed.scheme != "":
        raise BadImage("unsupported_uri_scheme")
    return Path(uri)


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _check_stat(st: os.stat_result, access: ImageAccess) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_a_regular_file")
    if st.st_size > access.max_bytes:
        raise BadImage("too_large")


def _real_roots(access: ImageAccess) -> list[str] | None:
    return None if access.roots is None else [os.path.realpath(r) for r in access.roots]


def _resolve(
    path: Path, base_dir: Path | None, access: ImageAccess, roots: list[str] | None = None
) -> tuple[str, list[str] | None]:
    """``path``'s real path (relative: under ``base_dir``), once it is under a root and a
    regular file within ``max_bytes``; and the roots' real paths (``roots``, if given)."""
    try:
        roots = _real_roots(access) if roots is None else roots
        if not path.is_absolute() and base_dir is not None:
            if roots is not None and not _inside(os.path.realpath(base_dir), roots):
                raise BadImage("outside_image_roots")
            path = Path(base_dir) / path
        real = os.path.realpath(path)
        if roots is not None and not _inside(real, roots):
            raise BadImage("outside_image_roots")
        # stat first: a device or FIFO is refused without even being opened.
        _check_stat(os.stat(real), access)
        return real, roots
    except BadImage:  # a ValueError too
        raise
    except ValueError:  # a NUL byte in the path
        raise BadImage("bad_uri") from None
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None


def _read_file(
    path: Path, base_dir: Path | None, access: ImageAccess, roots: list[str] | None = None
) -> bytes:
    """The bytes of ``path`` (relative: under ``base_dir``), where ``access`` allows.
    Everything that touches the file system is in here, so it runs under the read timeout."""
    real, roots = _resolve(path, base_dir, access, roots)
    try:
        # O_NONBLOCK: should a FIFO have been put there since, opening it does not wait for
        # a writer; O_NOFOLLOW: nor may a symlink have been.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None
    try:
        _check_stat(os.fstat(fd), access)
        if roots is not None:
            # What was opened, whatever happened to the path between the check and the open.
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened) and not _inside(os.readlink(opened), roots):
                raise BadImage("outside_image_roots")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, access.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > access.max_bytes:  # it grew since fstat
                raise BadImage("too_large")
        return b"".join(chunks)
    except BadImage:
        raise
    except OSError as exc:
        raise BadImage(_os_reason(exc)) from None
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "not_found"
    if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return "not_a_regular_file"
    if exc.errno == errno.ELOOP:  # a symlink swapped in after the check
        return "outside_image_roots"
    if exc.errno == errno.ENAMETOOLONG:
        return "bad_uri"
    return "unreadable_file"


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


def check_uri(uri: str, base_dir: Path | None = None, access: ImageAccess | None = None) -> None:
    """Raises ``BadImage`` where ``uri`` can never be read under ``access``: another scheme,
    outside the roots, not a regular file, over ``max_bytes``. Nothing is read, only
    resolved and stat'ed (within ``read_timeout_s``). A file not there yet, or a stat that
    stalls, passes: it may still land (the scorer retries those)."""
    access = access or UNCONFINED
    path = _path_of(uri)
    try:
        call_with_timeout(
            functools.partial(_resolve, path, base_dir, access), access.read_timeout_s
        )
    except BadImage as exc:
        if str(exc) not in TRANSIENT:
            raise


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
        _READS.start(
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
