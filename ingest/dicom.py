"""DICOM in: headers read with pydicom, compressed frames handed on undecoded.

DALI decodes baseline JPEG and JPEG 2000 (on the GPU with nvJPEG / nvJPEG2000), so frames in
those transfer syntaxes leave here as their compressed bytes (``kind="encoded"``). Every
other syntax (uncompressed, deflated, RLE, 12-bit JPEG, lossless JPEG, JPEG-LS) is decoded
by pydicom into an array (``kind="pixels"``); the JPEG variants need ``pylibjpeg``.

Only the tags an image model needs leave this module: identifying tags (PatientName,
PatientID, PatientBirthDate, other ids) are never copied, logged or put in an error.
A file that cannot be used raises ``InvalidDicom`` with a short reason.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit

# pydicom's own warnings name the file, and MIMIC-CXR paths carry the subject id: they are
# turned into InvalidDicom reasons here instead of log lines.
logging.getLogger("pydicom").setLevel(logging.ERROR)

# Syntaxes DALI's image decoder takes as they are.
PASS_THROUGH = frozenset({JPEGBaseline8Bit, JPEG2000, JPEG2000Lossless})
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "
_EOI = b"\xff\xd9"  # JPEG EOI and JPEG 2000 EOC share the marker


class InvalidDicom(ValueError):
    """A file this module cannot use; ``reason`` is short and carries no patient data."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DicomHeader:
    transfer_syntax: str  # UID
    modality: str | None
    rows: int | None
    cols: int | None
    photometric: str | None
    view_position: str | None
    study_date: str | None  # YYYYMMDD
    study_time: str | None  # HHMMSS.fff
    bits_stored: int | None
    samples_per_pixel: int
    frames: int


@dataclass(frozen=True)
class DicomImage:
    kind: Literal["encoded", "pixels"]
    data: bytes | np.ndarray  # encoded: the first frame's compressed bytes; pixels: the array
    transfer_syntax: str
    modality: str | None
    rows: int
    cols: int
    photometric: str
    view_position: str | None
    bits_stored: int
    frames: int


def read_header(path: Path) -> DicomHeader:
    """The header tags of a DICOM file, without reading its pixel data."""
    return _header(_read(path, stop_before_pixels=True))


def read_image(path: Path) -> DicomImage:
    """A DICOM image: compressed bytes for DALI's decoder, or decoded pixels."""
    dataset = _read(path, stop_before_pixels=False)
    header = _header(dataset)
    if header.rows is None or header.cols is None or header.photometric is None:
        raise InvalidDicom("missing_attribute", "Rows/Columns/PhotometricInterpretation")
    if "PixelData" not in dataset:
        raise InvalidDicom("missing_attribute", "PixelData")
    syntax = UID(header.transfer_syntax)
    if syntax in PASS_THROUGH:
        data, kind = _first_frame(dataset, header), "encoded"
    else:
        data, kind = _pixels(dataset, header), "pixels"
    return DicomImage(
        kind=kind,
        data=data,
        transfer_syntax=header.transfer_syntax,
        modality=header.modality,
        rows=header.rows,
        cols=header.cols,
        photometric=header.photometric,
        view_position=header.view_position,
        bits_stored=header.bits_stored or 8,
        frames=header.frames,
    )


def _read(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            # Elements are parsed lazily: touch them so a cut-off file fails here.
            for _ in dataset.iterall():
                pass
    except InvalidDicomError:
        raise InvalidDicom("not_dicom", "no DICM preamble") from None
    except FileNotFoundError:
        raise InvalidDicom("missing_file") from None
    except Exception as exc:  # pydicom surfaces truncation as many exception types
        raise InvalidDicom("unreadable", type(exc).__name__) from None
    # pydicom only warns when a file ends inside an element (and may keep an empty dataset).
    if any("End of file" in str(w.message) for w in caught):
        raise InvalidDicom("truncated", "the file ends inside an element")
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", {}):
        raise InvalidDicom("missing_attribute", "TransferSyntaxUID")
    return dataset


def _header(ds: pydicom.Dataset) -> DicomHeader:
    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None

    def integer(keyword: str) -> int | None:
        value = ds.get(keyword)
        if value in (None, ""):
            return None
        try:  # a multi-valued element ([1, 2]) or text that is no number: not this file's size
            return int(value)
        except (TypeError, ValueError):
            raise InvalidDicom("invalid_attribute", keyword) from None

    return DicomHeader(
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        modality=text("Modality"),
        rows=integer("Rows"),
        cols=integer("Columns"),
        photometric=text("PhotometricInterpretation"),
        view_position=text("ViewPosition"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        bits_stored=integer("BitsStored"),
        samples_per_pixel=integer("SamplesPerPixel") or 1,
        frames=integer("NumberOfFrames") or 1,
    )


def _first_frame(ds: pydicom.Dataset, header: DicomHeader) -> bytes:
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=header.frames))
    except Exception as exc:
        raise InvalidDicom("bad_encapsulation", type(exc).__name__) from None
    if not (
        frame.startswith(_JPEG_SOI)
        or frame.startswith(_J2K_SOC)
        or frame.startswith(_JP2_SIGNATURE)
    ):
        raise InvalidDicom("bad_frame", "no JPEG/JPEG 2000 start marker")
    if _EOI not in frame[-4:]:  # a frame may be padded to even length after the marker
        raise InvalidDicom("truncated_frame", "no end marker")
    return frame


def _pixels(ds: pydicom.Dataset, header: DicomHeader) -> np.ndarray:
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        bits = int(ds.get("BitsAllocated") or 8)
        expected = header.rows * header.cols * header.samples_per_pixel * header.frames * bits // 8
        if len(ds.PixelData) < expected:
            raise InvalidDicom("truncated_pixel_data", f"{len(ds.PixelData)} of {expected} bytes")
    syntax = UID(header.transfer_syntax)
    if syntax.is_compressed and not get_decoder(syntax).is_available:
        raise InvalidDicom("no_decoder", f"{syntax.name} (install pylibjpeg)")
    try:
        return ds.pixel_array
    except Exception as exc:
        # A corrupt stream, or a variant no installed plugin handles (12-bit JPEG needs pylibjpeg).
        raise InvalidDicom("undecodable", f"{syntax.name}: {type(exc).__name__}") from None
