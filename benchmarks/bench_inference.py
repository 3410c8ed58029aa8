"""Model inference: M3T-LM in PyTorch eager beside ONNX Runtime and Triton, by batch size.

The model is built with its default hyperparameters (``trainer.model.M3TConfig`` for the
feature set's width and vocabulary) and random weights: speed does not depend on the
weights. Inputs are valid random batches (``trainer.export.example_inputs``). ONNX
Runtime runs the graph ``trainer.export`` exports; Triton runs whatever model
``settings.triton.model_name`` the server has loaded (its own weights, the same shapes),
or the column is recorded as missing with the reason. TensorRT is measured where its
builder and a GPU exist, and recorded as missing otherwise.

PyTorch and ONNX Runtime get the same number of threads, one by default: on a shared
machine with few cores, more OpenMP threads make eager PyTorch wait for a descheduled thread
in every parallel region, while one thread stays steady.

Each repeat runs at least ``min_items`` examples (up to 32 calls at small batches), so
small batches are not timed by a single millisecond call.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness as h
from m3t.settings import Settings

EAGER, ONNX, TRITON = "PyTorch eager", "ONNX Runtime", "Triton (gRPC)"
# The model's batching as published before #19: a request waited 0.5 ms for company.
TRITON_DELAYED = "Triton (gRPC), 0.5 ms queue delay"


def build(threads: int):
    """The model (eval mode), its graph description and the input specs."""
    import torch

    from features import definitions as fd
    from features import model_inputs as mi
    from trainer.export import FULL_MODEL, graphs
    from trainer.model import M3TConfig, build_model

    torch.set_num_threads(threads)
    model = build_model(M3TConfig(n_features=fd.N_NUMERIC, vocab_size=fd.VOCAB_SIZE), seed=0).eval()
    shapes = {s.name: s.shape for s in mi.input_specs(fd.N_NUMERIC)}
    graph = graphs(model, shapes)[FULL_MODEL]
    return model, graph


def repeated(call, batch: int, min_items: int, max_calls: int = 32):
    """A function that runs ``call`` enough times to cover ``min_items`` examples (at most
    ``max_calls`` times), and the number of examples it covers."""
    calls = min(max_calls, max(1, math.ceil(min_items / batch)))

    def run():
        for _ in range(calls):
            call()

    return run, calls * batch


def split(inputs: dict[str, np.ndarray], max_batch: int) -> list[dict[str, np.ndarray]]:
    """A batch cut into requests the served model accepts (its ``max_batch_size``)."""
    n = len(next(iter(inputs.values())))
    step = max_batch or n
    return [{k: v[i : i + step] for k, v in inputs.items()} for i in range(0, n, step)]


def eager_call(model, inputs: dict, names):
    import torch

    tensors = [torch.from_numpy(inputs[n]) for n in names]

    def call():
        with torch.inference_mode():
            model(*tensors)

    return call


def onnx_call(session, inputs: dict, output_names):
    return lambda: session.run(output_names, inputs)


def triton_scorer(settings: Settings):
    """(scorer, input specs) for the served model, or (None, reason)."""
    from features import model_inputs as mi
    from stream.scoring import ModelScorer

    try:
        scorer = ModelScorer(settings, settings.triton.model_name)
    except Exception as exc:  # not running, or the model is not loaded: a recorded gap
        return (
            None,
            f"model {settings.triton.model_name!r} not ready on Triton at "
            f"{settings.triton.grpc_url}: "
            f"{type(exc).__name__}: {str(exc)[:200]}",
        )
    meta = scorer.net.client.get_model_metadata(settings.triton.model_name, as_json=True)
    dtypes = {"FP32": np.dtype("float32"), "INT64": np.dtype("int64")}
    specs = tuple(
        mi.TensorSpec(i["name"], dtypes[i["datatype"]], tuple(int(d) for d in i["shape"][1:]))
        for i in meta["inputs"]
    )
    return scorer, specs


def delayed_latency(settings: Settings, call, n: int = 200) -> dict:
    """Batch-1 latency with the served model's queue delay of before #19, then as published."""
    delay = {"max_queue_delay_microseconds": 500}
    with h.triton_batching(settings, delay, (settings.triton.model_name,)):
        latency = h.latency_summary(h.time_calls(call, n))
    return {"case": "M3T-LM latency", "variant": TRITON_DELAYED, "batch": 1, **latency}


def tensorrt_gap() -> str:
    """Why TensorRT is not measured here (it needs its builder and a CUDA GPU)."""
    from trainer.export import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return "not installed (the TensorRT builder does not install from PyPI here)"
    import torch

    if not torch.cuda.is_available():
        return "installed, but there is no CUDA GPU here"
    return (
        "installed with a GPU: build an engine with `m3t export tensorrt` and time it with trtexec"
    )


def run(
    settings: Settings,
    *,
    batches: tuple[int, ...] = (1, 4, 16, 64, 256, 1024),
    repeats: int = 3,
    warmup: int = 1,
    min_items: int = 256,
    threads: int = 1,
    triton: bool = True,
) -> h.Result:
    from m3t.onnx_runtime import onnx_session
    from trainer.export import example_inputs, export_graph

    result = h.Result(
        "inference",
        {
            "batches": list(batches),
            "repeats": repeats,
            "warmup": warmup,
            "min_items_per_repeat": min_items,
            "threads": threads,
        },
    )
    started = time.perf_counter()
    model, graph = build(threads)
    vocab = model.config.vocab_size
    in_names = [s.name for s in graph.inputs]
    out_names = [s.name for s in graph.outputs]
    result.params["model"] = {
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(
            export_graph(graph, Path(tmp) / "m3t_lm.onnx", vocab), threads=threads
        )
    scorer, triton_specs = triton_scorer(settings) if triton else (None, "not requested")
    if scorer is None:
        result.missing[TRITON] = triton_specs
    result.missing["TensorRT"] = tensorrt_gap()

    try:
        for batch in batches:
            inputs = example_inputs(graph.inputs, batch, vocab_size=vocab, seed=batch)
            calls = {
                EAGER: eager_call(model, inputs, in_names),
                ONNX: onnx_call(session, inputs, out_names),
            }
            notes = {}
            if scorer is not None:
                requests = split(
                    example_inputs(triton_specs, batch, vocab_size=2, seed=batch),
                    scorer.net.max_batch,
                )
                calls[TRITON] = lambda requests=requests: [scorer.score(r) for r in requests]
                if len(requests) > 1:
                    notes[TRITON] = (
                        f"{len(requests)} requests of max_batch_size {scorer.net.max_batch}, "
                        "in turn"
                    )
            rates = {}
            for variant, call in calls.items():
                fn, items = repeated(call, batch, min_items)
                measured = h.measure(fn, items, warmup=warmup, repeats=repeats)
                row = {"case": "M3T-LM", "variant": variant, "batch": batch, **measured}
                result.rows.append({**row, "note": notes[variant]} if variant in notes else row)
                rates[variant] = measured["items_per_s"]
                if batch == 1:
                    latency = h.latency_summary(h.time_calls(call, 50))
                    result.rows.append(
                        {"case": "M3T-LM latency", "variant": variant, "batch": 1, **latency}
                    )
                    result.breakdown_ms[f"inference, {variant}"] = latency["p50_ms"]
            if batch == 1 and scorer is not None:
                result.rows.append(delayed_latency(settings, calls[TRITON]))
                result.comparisons.append(
                    h.ratio(
                        "p50 latency at batch 1",
                        TRITON,
                        TRITON_DELAYED,
                        result.breakdown_ms[f"inference, {TRITON}"],
                        result.rows[-1]["p50_ms"],
                    )
                )
            result.comparisons.append(
                h.ratio(f"examples/s at batch {batch}", ONNX, EAGER, rates[ONNX], rates[EAGER])
            )
            if TRITON in rates:
                result.comparisons.append(
                    h.ratio(
                        f"examples/s at batch {batch}", TRITON, ONNX, rates[TRITON], rates[ONNX]
                    )
                )
    finally:
        if scorer is not None:
            scorer.close()
    result.seconds = time.perf_counter() - started
    return result
