"""Chest X-rays: decode and preprocess, images/s, Pillow/pydicom + NumPy beside DALI (CPU).

On the real images in ``settings.data_dir/cxr-samples``, read into memory first so disk
is not measured:

* ``encoded``: PNG files and the JPEG frames of 8-bit DICOMs (``features.cxr.load``
  hands those over undecoded): Pillow decode + NumPy resize/normalise
  (``features.cxr.reference_preprocess``) against the DALI pipeline
  (``features.cxr.CxrPreprocessor``) at several batch sizes;
* ``pixels``: high-bit-depth DICOMs that pydicom must decode (JPEG 2000, uncompressed):
  the pydicom decode itself, then the preprocessing of its pixels in each library.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import harness as h
from m3t.settings import Settings

PIL = "Pillow/pydicom + NumPy"
DALI = "DALI CPU"


def sample_files(settings: Settings) -> list[Path]:
    folder = Path(settings.data_dir) / "cxr-samples"
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm")
    )
    if not files:
        raise FileNotFoundError(f"no chest X-ray samples in {folder}")
    return files


def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def run(
    settings: Settings,
    *,
    images: int = 64,
    batches: tuple[int, ...] = (1, 8, 32),
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
) -> h.Result:
    """Each measured call preprocesses ``images`` images (the samples, cycled)."""
    from features import cxr

    result = h.Result(
        "cxr",
        {
            "images": images,
            "batches": list(batches),
            "repeats": repeats,
            "warmup": warmup,
            "dali_threads": threads,
            "size": cxr.CXR_SIZE,
        },
    )
    started = time.perf_counter()
    files = sample_files(settings)
    loaded = {}
    for path in files:
        try:
            loaded[path] = cxr.load(str(path))
        except cxr.BadImage as exc:
            result.missing[path.name] = f"unreadable sample ({exc})"
    groups = {
        "encoded": [x for x in loaded.values() if isinstance(x, cxr.Encoded)],
        "pixels": [x for x in loaded.values() if isinstance(x, cxr.Pixels)],
    }
    result.params["samples"] = {k: len(v) for k, v in groups.items()}
    dicoms = [p for p in loaded if p.suffix.lower() == ".dcm"]
    if dicoms:
        decoded = h.measure(
            lambda: [cxr.load(str(p)) for p in dicoms], len(dicoms), warmup=0, repeats=repeats
        )
        result.rows.append({"case": "read DICOM", "variant": "pydicom", **decoded})

    for kind, samples in groups.items():
        if not samples:
            continue
        work = _cycle(samples, images)
        baseline = h.measure(
            lambda: [cxr.reference_preprocess(x) for x in work],
            images,
            warmup=warmup,
            repeats=repeats,
        )
        result.rows.append({"case": kind, "variant": PIL, **baseline})
        for batch in batches:
            try:
                pipeline = cxr.CxrPreprocessor(batch_size=batch, device="cpu", num_threads=threads)
                dali = h.measure(lambda: pipeline(work), images, warmup=warmup, repeats=repeats)
            except ImportError as exc:  # DALI not installed
                result.missing[DALI] = f"nvidia-dali not importable: {exc}"
                break
            result.rows.append({"case": kind, "variant": DALI, "batch": batch, **dali})
            result.comparisons.append(
                h.ratio(
                    f"{kind} images/s at batch {batch}",
                    DALI,
                    PIL,
                    dali["items_per_s"],
                    baseline["items_per_s"],
                )
            )
            if kind == "encoded" and batch == 1:
                result.breakdown_ms["cxr decode+preprocess (1 image)"] = 1000 / dali["items_per_s"]
    result.seconds = time.perf_counter() - started
    return result
