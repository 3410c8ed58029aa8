"""The GPU benchmarks, as one script for a lent GPU machine (one call, under 10 minutes).

    python benchmarks/gpu.py [--quick] [--out DIR] [--budget-s 480]
    python benchmarks/gpu.py --dry-run      # no GPU: the same code on the CPU at tiny sizes

That machine has Python 3.12, torch (CUDA), torchvision (nvJPEG), numpy and onnxruntime,
and no DALI, TensorRT or registry access, so this script needs nothing else from the
project than ``trainer.model``, ``features.model_inputs``/``definitions`` and
``benchmarks.harness`` (plots are drawn later with ``m3t bench show`` where matplotlib is).

Measured, with the method of ``benchmarks.harness`` (warm-up, repeats, median/min/max):

* M3T-LM (default hyperparameters, random weights) examples/s by batch size, for fp32,
  fp16 and bf16 weights and inputs, in eager mode, replayed as a CUDA graph, and compiled
  with ``torch.compile``; batch-1 latency p50/p95/p99; the largest difference of each
  variant's outputs from fp32 eager on the same batch;
* chest X-ray decode + preprocess (resize to 128, normalise) images/s: Pillow + NumPy on
  the CPU beside nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) + torch on the GPU,
  by batch size, on the real samples where ``--images`` has them (re-encoded as JPEG),
  otherwise on synthetic radiograph-sized JPEGs.

* the project's DALI pipeline (``features.cxr.CxrPreprocessor``) with ``device="gpu"``
  (nvJPEG through ``fn.decoders.image(device="mixed")``, resize and normalise on the GPU)
  beside the same pipeline on the CPU and its Pillow/NumPy reference, by batch size, on the
  samples as stored (PNG files, the JPEG frame of an 8-bit DICOM), the samples re-encoded as
  JPEG, and pydicom-decoded pixels; each output's largest difference from the reference;
  and the GPU pipeline serialized for Triton's DALI backend, deserialized and run.

A time budget stops starting new measurements once spent and records what was skipped.
DALI is not in that machine's image: carry its wheels (README, Performance).
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import harness as h

DTYPES = ("fp32", "fp16", "bf16")
MODES = ("eager", "cuda-graph", "compile")
CXR_SIZE, CXR_MEAN, CXR_STD = 128, 0.5, 0.25


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# --- M3T-LM -----------------------------------------------------------------------------------


def build_model(device: str):
    from features import definitions as fd
    from trainer.model import M3TConfig
    from trainer.model import build_model as build

    return (
        build(M3TConfig(n_features=fd.N_NUMERIC, vocab_size=fd.VOCAB_SIZE), seed=0)
        .eval()
        .to(device)
    )


def make_inputs(batch: int, device: str, dtype, seed: int = 0):
    """Valid random inputs in the model's order: 0/1 masks, left-aligned token rows."""
    import torch

    from features import definitions as fd
    from features import model_inputs as mi

    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in mi.input_specs(fd.N_NUMERIC):
        shape = (batch, *spec.shape)
        if spec.dtype == np.int64:
            tokens = torch.randint(1, fd.VOCAB_SIZE, shape, generator=g)
            lengths = torch.randint(0, shape[1] + 1, (batch, 1), generator=g)
            x = torch.where(torch.arange(shape[1]) < lengths, tokens, torch.zeros_like(tokens))
        elif spec.name in (mi.NUMERIC_MASK, mi.MODALITY_MASK):
            x = (torch.rand(shape, generator=g) < 0.7).to(dtype)
        else:
            x = torch.randn(shape, generator=g).to(dtype)
        out.append(x.to(device))
    return out


def cuda_graph(model, inputs):
    """Capture one forward at these shapes; returns a function that replays it."""
    import torch

    static = [x.clone() for x in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm up kernels (cuDNN picks its algorithms) outside the capture
            model(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        outputs = model(*static)

    def replay():
        graph.replay()
        return outputs

    return replay


def sync(device: str) -> None:
    """Wait for the GPU's queued work (timings must include it); nothing to wait for on a CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def synchronized(call, device: str):
    def run():
        out = call()
        sync(device)
        return out

    return run


def model_benchmarks(
    result: h.Result,
    batches,
    repeats: int,
    min_items: int,
    budget: Budget,
    modes=MODES,
    reference: dict | None = None,
    device: str = "cuda",
    dtypes=DTYPES,
) -> None:
    """Every (mode, dtype, batch), fp32 eager first: ``reference`` keeps its outputs per
    batch so each other variant's accuracy is measured on the same inputs."""
    import torch

    torch.backends.cudnn.benchmark = True
    reference = {} if reference is None else reference
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for mode in modes:
        for name in dtypes:
            model = build_model(device).to(torch_dtypes[name])
            for lstm in (m for m in model.modules() if isinstance(m, torch.nn.LSTM)):
                lstm.flatten_parameters()  # .to(dtype) leaves cuDNN's weights in pieces
            run_model = torch.compile(model, dynamic=True) if mode == "compile" else model
            for batch in batches:
                label = f"{mode} {name}"
                if budget.left() < 0:
                    result.missing[f"{label}, batch {batch}"] = "time budget spent"
                    continue
                if mode == "cuda-graph" and device != "cuda":
                    result.missing[f"{label}, batch {batch}"] = "CUDA graphs need a CUDA device"
                    continue
                inputs = make_inputs(batch, device, torch_dtypes[name], seed=batch)
                try:
                    call = (
                        cuda_graph(model, inputs)
                        if mode == "cuda-graph"
                        else functools.partial(run_model, *inputs)
                    )
                    result.rows.append(
                        _measure_model(
                            call, label, name, mode, batch, repeats, min_items, reference, device
                        )
                    )
                except (
                    Exception
                ) as exc:  # one variant failing (e.g. compile) must not lose the rest
                    result.missing[f"{label}, batch {batch}"] = (
                        f"{type(exc).__name__}: {str(exc)[:300]}"
                    )
            del model, run_model
            if device == "cuda":
                torch.cuda.empty_cache()


def _measure_model(call, label, dtype, mode, batch, repeats, min_items, reference, device) -> dict:
    import torch

    with torch.inference_mode():
        los, mortality = (t.float() for t in call())  # the first call also compiles / captures
        sync(device)
        if dtype == "fp32" and mode == "eager":
            reference[batch] = (los.clone(), mortality.clone())
        diff = None
        if batch in reference:
            diff = max(
                float((los - reference[batch][0]).abs().max()),
                float((mortality - reference[batch][1]).abs().max()),
            )
        calls = min(64, max(1, math.ceil(min_items / batch)))

        def many():
            for _ in range(calls):
                call()
            sync(device)

        row = {
            "case": "M3T-LM",
            "variant": label,
            "batch": batch,
            "dtype": dtype,
            "mode": mode,
            "device": device,
            "max_abs_diff_vs_fp32_eager": diff,
            **h.measure(many, calls * batch, warmup=1, repeats=repeats),
        }
        if batch == 1:
            row.update(h.latency_summary(h.time_calls(synchronized(call, device), 100, warmup=5)))
    return row


def model_ratios(result: h.Result, batches) -> None:
    rate = {
        (r["variant"], r["batch"]): r["items_per_s"]
        for r in result.rows
        if r.get("case") == "M3T-LM"
    }
    for batch in batches:
        base = rate.get(("eager fp32", batch))
        for variant in (
            "cuda-graph fp32",
            "compile fp32",
            "eager fp16",
            "eager bf16",
            "cuda-graph fp16",
            "cuda-graph bf16",
        ):
            if base and (variant, batch) in rate:
                result.comparisons.append(
                    h.ratio(
                        f"M3T-LM examples/s at batch {batch}",
                        variant,
                        "eager fp32",
                        rate[variant, batch],
                        base,
                    )
                )


# --- chest X-rays: nvJPEG -------------------------------------------------------------------------


def jpeg_samples(folder: Path | None, count: int) -> tuple[list[bytes], str]:
    """JPEG bytes: the real samples (PNG/JPEG files re-encoded as JPEG quality 90) if
    ``folder`` has any, otherwise synthetic 2048x2048 radiograph-like images."""
    from PIL import Image

    images, source = [], "synthetic 2048x2048 grayscale"
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if folder and folder.is_dir()
        else []
    )
    if files:
        source = f"{len(files)} real samples from {folder} (re-encoded as JPEG q90)"
        for path in files:
            with Image.open(path) as img:
                images.append(_jpeg(img.convert("L")))
    else:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[-1:1:2048j, -1:1:2048j]
        for i in range(4):
            body = np.exp(-(x**2 / 0.5 + y**2 / 0.8)) * 180 + 30 * np.sin(8 * y + i)
            pixels = np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)
            images.append(_jpeg(Image.fromarray(pixels, "L")))
    return [images[i % len(images)] for i in range(count)], source


def _jpeg(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def pil_preprocess(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        x = (
            np.asarray(img.convert("L").resize((CXR_SIZE, CXR_SIZE), Image.BILINEAR), np.float32)
            / 255.0
        )
    return ((x - CXR_MEAN) / CXR_STD)[None]


def nvjpeg_preprocess(encoded: list):
    """Decode a batch on the GPU (nvJPEG), resize (antialiased bilinear) and normalise."""
    import torch
    from torch.nn import functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device="cuda")
    resized = [
        F.interpolate(img[None].float(), size=(CXR_SIZE, CXR_SIZE), mode="bilinear", antialias=True)
        for img in decoded
    ]
    out = (torch.cat(resized) / 255.0 - CXR_MEAN) / CXR_STD
    torch.cuda.synchronize()
    return out


def cxr_benchmarks(
    result: h.Result,
    folder: Path | None,
    images: int,
    batches,
    repeats: int,
    budget: Budget,
    device: str = "cuda",
) -> None:
    import torch

    data, source = jpeg_samples(folder, images)
    result.params["cxr_images"] = source
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    pil = h.measure(lambda: [pil_preprocess(d) for d in data], len(data), warmup=1, repeats=repeats)
    result.rows.append(
        {"case": "CXR decode+preprocess", "variant": "Pillow + NumPy (CPU, 1 thread)", **pil}
    )
    for batch in batches:
        if budget.left() < 0 or device != "cuda":
            result.missing[f"nvJPEG, batch {batch}"] = (
                "time budget spent" if device == "cuda" else "needs CUDA"
            )
            continue
        chunks = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
        try:
            gpu = h.measure(
                lambda: [nvjpeg_preprocess(c) for c in chunks],
                len(tensors),
                warmup=1,
                repeats=repeats,
            )
        except Exception as exc:  # keep what was measured; say why this one was not
            result.missing[f"nvJPEG, batch {batch}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        result.rows.append(
            {
                "case": "CXR decode+preprocess",
                "variant": "nvJPEG + torch (GPU)",
                "batch": batch,
                **gpu,
            }
        )
        result.comparisons.append(
            h.ratio(
                f"CXR images/s at batch {batch}",
                "nvJPEG + torch (GPU)",
                "Pillow + NumPy",
                gpu["items_per_s"],
                pil["items_per_s"],
            )
        )


# --- chest X-rays: the project's DALI pipeline --------------------------------------------------


def dali_samples(folder: Path | None, count: int) -> dict[str, list]:
    """The inputs of ``features.cxr`` by kind: as stored (PNG, DICOM JPEG frames), re-encoded
    as JPEG (what nvJPEG decodes on the GPU), and pixels pydicom decoded; each cycled to
    ``count``."""
    from features import cxr

    stored, pixels = [], []
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
        if folder and folder.is_dir()
        else []
    )
    for path in files:
        try:
            item = cxr.load(str(path))
        except cxr.BadImage:  # e.g. JPEG 2000 without a pydicom decoder there
            continue
        (stored if isinstance(item, cxr.Encoded) else pixels).append(item)
    jpegs, _ = jpeg_samples(folder, count)
    groups = {
        "as stored": stored,
        "JPEG q90": [cxr.Encoded(d) for d in jpegs],
        "DICOM pixels": pixels,
    }
    return {
        kind: [items[i % len(items)] for i in range(count)]
        for kind, items in groups.items()
        if items
    }


def _max_diff(result, reference: list[np.ndarray]) -> float:
    return float(max(np.abs(result.tensors[i] - ref).max() for i, ref in enumerate(reference)))


def dali_benchmarks(
    result: h.Result,
    folder: Path | None,
    images: int,
    batches,
    repeats: int,
    budget: Budget,
    device: str = "cuda",
    cpu_threads: int = 8,
) -> None:
    try:
        from features import cxr
    except ImportError as exc:
        result.missing["DALI"] = f"features.cxr not importable: {exc}"
        return
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        result.missing["DALI"] = f"nvidia-dali not importable (carry its wheels): {exc}"
        return
    result.params["dali_cpu_threads"] = cpu_threads
    samples = dali_samples(folder, images)
    result.params["dali_samples"] = {kind: len(items) for kind, items in samples.items()}
    devices = ("cpu", "gpu") if device == "cuda" else ("cpu",)
    for kind, items in samples.items():
        reference = [cxr.reference_preprocess(x) for x in items]
        ref = h.measure(
            lambda: [cxr.reference_preprocess(x) for x in items],
            len(items),
            warmup=1,
            repeats=repeats,
        )
        result.rows.append(
            {
                "case": f"DALI pipeline, {kind}",
                "variant": "Pillow/NumPy reference (1 thread)",
                **ref,
            }
        )
        for batch in batches:
            rates = {}
            for where in devices:
                label = f"DALI {where.upper()} ({cpu_threads} threads)"
                if budget.left() < 0:
                    result.missing[f"{label}, {kind}, batch {batch}"] = "time budget spent"
                    continue
                try:
                    # The same CPU threads for both: the GPU pipeline's decoder uses them for PNG.
                    pipeline = cxr.CxrPreprocessor(
                        batch_size=batch, device=where, num_threads=cpu_threads
                    )
                    out = pipeline(items)  # the outputs checked below, and the warm-up
                    rate = h.measure(lambda: pipeline(items), len(items), warmup=0, repeats=repeats)
                except Exception as exc:  # keep what was measured; say why this one was not
                    result.missing[f"{label}, {kind}, batch {batch}"] = (
                        f"{type(exc).__name__}: {str(exc)[:300]}"
                    )
                    continue
                result.rows.append(
                    {
                        "case": f"DALI pipeline, {kind}",
                        "variant": label,
                        "batch": batch,
                        **rate,
                        "failed_images": int((~out.ok).sum()),
                        "max_abs_diff_vs_reference": _max_diff(out, reference),
                    }
                )
                result.comparisons.append(
                    h.ratio(
                        f"{kind} images/s at batch {batch}",
                        label,
                        "Pillow/NumPy reference",
                        rate["items_per_s"],
                        ref["items_per_s"],
                    )
                )
                rates[where] = (label, rate["items_per_s"])
            if len(rates) == 2:
                (cpu_label, cpu_rate), (gpu_label, gpu_rate) = rates["cpu"], rates["gpu"]
                result.comparisons.append(
                    h.ratio(
                        f"{kind} images/s at batch {batch}",
                        gpu_label,
                        cpu_label,
                        gpu_rate,
                        cpu_rate,
                    )
                )
    if device == "cuda" and "JPEG q90" in samples:
        result.params["dali_serialized_gpu_pipeline"] = _serialized_check(
            cxr, samples["JPEG q90"][:32]
        )


def _serialized_check(cxr, items: list) -> dict:
    """What Triton's DALI backend would load: the GPU pipeline, serialized, deserialized and
    run, against the in-process pipeline on the same images."""
    try:
        from nvidia.dali import Pipeline

        blob = cxr.serialized_pipeline("gpu", batch_size=len(items))
        pipe = Pipeline.deserialize(serialized_pipeline=blob, batch_size=len(items), device_id=0)
        pipe.build()
        pipe.feed_input("input", [np.frombuffer(x.data, np.uint8) for x in items])
        (out,) = pipe.run()
        out = out.as_cpu()
        direct = cxr.CxrPreprocessor(batch_size=len(items), device="gpu")(items)
        diff = max(
            float(np.abs(np.array(out[i]) - direct.tensors[i]).max()) for i in range(len(items))
        )
        return {"bytes": len(blob), "images": len(items), "max_abs_diff_vs_in_process": diff}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run(result: h.Result, args, device: str) -> None:
    """Everything, in an order that keeps the most for a short budget: compiling is slow
    and may fail, so it goes last."""
    budget, reference = Budget(args.budget_s), {}
    if device == "cuda":
        repeats, min_items, images = (3, 256, 64) if args.quick else (5, 1024, 128)
        dtypes, modes = args.dtypes, tuple(m for m in args.modes if m != "compile")
    else:  # --dry-run: the same code at the smallest sizes, fp32 eager on the CPU
        repeats, min_items, images, dtypes, modes = 1, 1, 2, ("fp32",), ("eager",)
    result.params.update(
        repeats=repeats, min_items_per_repeat=min_items, cxr_image_count=images, device=device
    )
    if "model" not in args.skip:
        model_benchmarks(
            result, args.batches, repeats, min_items, budget, modes, reference, device, dtypes
        )
    if "cxr" not in args.skip:
        cxr_benchmarks(result, args.images, images, (1, 8, 32, 128), repeats, budget, device)
    if "dali" not in args.skip:
        dali_benchmarks(
            result,
            args.images,
            images,
            (1, 32, 128) if device == "cuda" else (1, 2),
            repeats,
            budget,
            device,
        )
    if "model" not in args.skip and device == "cuda" and "compile" in args.modes:
        model_benchmarks(
            result,
            args.batches,
            repeats,
            min_items,
            budget,
            ("compile",),
            reference,
            device,
            dtypes,
        )
    if "model" not in args.skip:
        model_ratios(result, args.batches)


# --- the script -----------------------------------------------------------------------------------


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="m3t-stream GPU benchmarks (one call, results as JSON)."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=h.RESULTS_DIR,
        help="results folder (default benchmarks/results)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: run the script's code on the CPU at tiny sizes and write the result",
    )
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="stop starting measurements after this"
    )
    parser.add_argument(
        "--batches",
        type=lambda s: tuple(int(b) for b in s.split(",")),
        default=None,
        help="model batch sizes, comma-separated (default 1,16,64,256,1024; quick 1,64,1024)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=h.PROJECT_ROOT.parent / "shared" / "data" / "cxr-samples",
        help="folder of real chest X-ray PNG/JPEG samples (synthetic images if absent)",
    )
    parser.add_argument(
        "--dtypes",
        type=lambda s: tuple(s.split(",")),
        default=DTYPES,
        help="model dtypes, comma-separated, from fp32,fp16,bf16 (fp32 is the accuracy reference)",
    )
    parser.add_argument(
        "--modes",
        type=lambda s: tuple(s.split(",")),
        default=MODES,
        help="model modes, comma-separated, from eager,cuda-graph,compile "
        "(eager fp32 is the reference)",
    )
    parser.add_argument(
        "--skip", choices=("model", "cxr", "dali"), action="append", default=[], help="skip a part"
    )
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = (1, 64, 1024) if args.quick else (1, 16, 64, 256, 1024)
    if not args.batches or min(args.batches) < 1 or max(args.batches) > 4096:
        parser.error("--batches must be sizes between 1 and 4096")
    if not set(args.dtypes) <= set(DTYPES):
        parser.error(f"--dtypes must be among {','.join(DTYPES)}")
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes must be among {','.join(MODES)}")
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    result = h.Result(
        "gpu",
        {
            "quick": args.quick,
            "batches": list(args.batches),
            "budget_s": args.budget_s,
            "dry_run": args.dry_run,
        },
    )
    started = time.perf_counter()
    import torch

    if args.dry_run:
        args.batches = (1, 2)
        result.params["batches"] = list(args.batches)
        run(result, args, "cpu")
        result.missing["GPU"] = (
            "--dry-run: the script's own code ran on the CPU at tiny sizes; nothing on a GPU"
        )
    elif not torch.cuda.is_available():
        print(
            "error: no CUDA device is visible to torch: this script measures the GPU path "
            "(use --dry-run to check it without one; `m3t bench` measures the CPU)",
            file=sys.stderr,
        )
        return 2
    else:
        try:
            run(result, args, "cuda")
        except (
            Exception
        ) as exc:  # a device run is scarce: save whatever was measured, and why it stopped
            result.missing["aborted"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    result.seconds = time.perf_counter() - started
    paths = h.save(result, args.out)
    print(h.markdown(result))
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
