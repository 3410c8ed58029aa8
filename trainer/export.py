"""Export M3T-LM to ONNX (checked against PyTorch) and build TensorRT engines from it.

Six graphs are exported, each with a dynamic batch axis and tensor names from
``features.model_inputs``, so serving can run the whole model or the encoders and the
fusion head separately:

    m3t_lm           the full model: the six inputs -> los_remaining_days, mortality_prob
    m3t_enc_numeric  numeric, numeric_mask -> emb_numeric
    m3t_enc_notes    notes_radiology, notes_discharge -> emb_notes_radiology, emb_notes_discharge
    m3t_enc_cxr      cxr -> emb_cxr
    m3t_fusion       the four embeddings + modality_mask -> los_remaining_days, mortality_prob
    m3t_rescore      numeric, numeric_mask, the cached note and X-ray embeddings,
                     modality_mask -> los_remaining_days, mortality_prob
                     (encoder + fusion in one call)
    m3t_explain      m3t_rescore's inputs -> its outputs and mortality_contributions: what
                     each feature group and modality added (``trainer.explain``)

Each ONNX graph is run with ONNX Runtime on a batch of a size other than the one it was
traced with, and compared with eager PyTorch; above ``tolerance`` (1e-4 in fp32) export
fails with ``ParityError``. TensorRT engines are built from the same ONNX files; where the
TensorRT builder is not installed that step raises ``TensorRTUnavailable``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from features import model_inputs as mi
from m3t.onnx_runtime import onnx_session
from trainer import data as D
from trainer.explain import explain_model
from trainer.model import M3TLM, Rescore, note_embedding_name

OPSET = 17
FP32_TOLERANCE = 1e-4
FULL_MODEL = "m3t_lm"
PART_MODELS = (
    "m3t_enc_numeric",
    "m3t_enc_notes",
    "m3t_enc_cxr",
    "m3t_fusion",
    "m3t_rescore",
    "m3t_explain",
)
MODELS = (FULL_MODEL,) + PART_MODELS


class ExportError(RuntimeError):
    """Export could not produce a faithful graph."""


class ParityError(ExportError):
    """An exported graph's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class Graph:
    """One servable graph: its module and the specs of its inputs and outputs."""

    name: str
    module: nn.Module
    inputs: tuple[mi.TensorSpec, ...]
    outputs: tuple[mi.TensorSpec, ...]
    # Work that may wait for the rest (explanations): on CPU hosts it runs at the lowest
    # priority, on what the scoring leaves idle.
    background: bool = False


def input_specs_for(input_shapes: dict[str, tuple[int, ...]]) -> tuple[mi.TensorSpec, ...]:
    """The model inputs' specs, with F, note length and X-ray side taken from the data."""
    specs = mi.input_specs(
        n_numeric=input_shapes[mi.NUMERIC][0],
        note_tokens=input_shapes[mi.NOTES_RADIOLOGY][0],
        cxr_size=input_shapes[mi.CXR][-1],
    )
    return specs


def graphs(model: M3TLM, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, Graph]:
    f32 = np.dtype("float32")
    emb = model.config.emb_dim
    specs = {s.name: s for s in input_specs_for(input_shapes)}
    emb_numeric = mi.TensorSpec(mi.EMB_NUMERIC, f32, (emb,))
    emb_notes = tuple(
        mi.TensorSpec(note_embedding_name(s), f32, (emb,)) for s in ("radiology", "discharge")
    )
    emb_cxr = mi.TensorSpec(mi.EMB_CXR, f32, (emb,))
    outputs = mi.output_specs()
    pick = lambda *names: tuple(specs[n] for n in names)  # noqa: E731
    explain = explain_model(model.numeric, model.fusion, specs[mi.NUMERIC].shape[0])
    return {
        FULL_MODEL: Graph(FULL_MODEL, model, tuple(specs.values()), outputs),
        "m3t_enc_numeric": Graph(
            "m3t_enc_numeric", model.numeric, pick(mi.NUMERIC, mi.NUMERIC_MASK), (emb_numeric,)
        ),
        "m3t_enc_notes": Graph(
            "m3t_enc_notes", model.notes, pick(mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE), emb_notes
        ),
        "m3t_enc_cxr": Graph("m3t_enc_cxr", model.cxr, pick(mi.CXR), (emb_cxr,)),
        "m3t_fusion": Graph(
            "m3t_fusion",
            model.fusion,
            (emb_numeric, *emb_notes, emb_cxr, specs[mi.MODALITY_MASK]),
            outputs,
        ),
        "m3t_rescore": Graph(
            "m3t_rescore",
            Rescore(model.numeric, model.fusion),
            (*pick(mi.NUMERIC, mi.NUMERIC_MASK), *emb_notes, emb_cxr, specs[mi.MODALITY_MASK]),
            outputs,
        ),
        "m3t_explain": Graph(
            "m3t_explain",
            explain,
            (*pick(mi.NUMERIC, mi.NUMERIC_MASK), *emb_notes, emb_cxr, specs[mi.MODALITY_MASK]),
            (*outputs, mi.TensorSpec(mi.CONTRIBUTIONS, f32, (explain.n_contributions,))),
            background=True,
        ),
    }


def example_inputs(specs, batch: int, vocab_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs: masks are 0/1, token rows are left-aligned with random lengths."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = (batch, *spec.shape)
        if spec.dtype == np.int64:
            tokens = rng.integers(1, max(vocab_size, 2), size=shape)
            lengths = rng.integers(0, shape[1] + 1, size=batch)
            tokens[np.arange(shape[1]) >= lengths[:, None]] = 0
            out[spec.name] = tokens.astype(np.int64)
        elif spec.name in (mi.NUMERIC_MASK, mi.MODALITY_MASK):
            out[spec.name] = (rng.random(shape) < 0.7).astype(np.float32)
        else:
            out[spec.name] = rng.normal(size=shape).astype(np.float32)
    return out


def _torch_outputs(graph: Graph, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = graph.module(*(torch.from_numpy(inputs[s.name]) for s in graph.inputs))
    result = result if isinstance(result, tuple) else (result,)
    return [r.numpy() for r in result]


def export_graph(graph: Graph, path: Path, vocab_size: int) -> Path:
    example = example_inputs(graph.inputs, batch=2, vocab_size=vocab_size)
    names = [s.name for s in graph.inputs] + [s.name for s in graph.outputs]
    with warnings.catch_warnings():
        # The exporter warns that an LSTM traced at batch 2 may not run at other batch sizes;
        # onnx_parity runs every graph at batch 1 and 7 and fails if that were so.
        # Tracer warnings about Python-side shape checks are covered by the same parity runs.
        warnings.filterwarnings(
            "ignore", message="Exporting a model to ONNX with a batch_size other than 1"
        )
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is chosen on purpose (the dynamo one needs onnxscript).
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(graph, path, example, names)
    _declare_output_shapes(path, graph.outputs)
    onnx.checker.check_model(str(path))
    return path


def _declare_output_shapes(path: Path, outputs: tuple[mi.TensorSpec, ...]) -> None:
    """Output widths the tracer left unknown (after a reshape of the batch axis, as in
    ``m3t_explain``) written from the specs, so the graph declares what its config does."""
    model = onnx.load(str(path))
    specs = {s.name: s for s in outputs}
    changed = False
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(list(dims)[1:], specs[value.name].shape):
            if not dim.HasField("dim_value"):
                dim.dim_value, changed = size, True
    if changed:
        onnx.save(model, str(path))


def _export(graph: Graph, path: Path, example: dict[str, np.ndarray], names: list[str]) -> None:
    torch.onnx.export(
        graph.module.eval(),
        tuple(torch.from_numpy(example[s.name]) for s in graph.inputs),
        str(path),
        input_names=[s.name for s in graph.inputs],
        output_names=[s.name for s in graph.outputs],
        dynamic_axes={name: {0: "batch"} for name in names},
        opset_version=OPSET,
        dynamo=False,  # the TorchScript exporter: no onnxscript dependency, LSTM supported
    )


def onnx_parity(
    graph: Graph, path: Path, vocab_size: int, batches: tuple[int, ...] = (1, 7), seed: int = 1
) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on fresh batches whose sizes
    differ from the traced one (2), which also proves the batch axis is dynamic."""
    session, worst = onnx_session(path), 0.0
    for batch in batches:
        inputs = example_inputs(graph.inputs, batch, vocab_size, seed)
        got = session.run([s.name for s in graph.outputs], inputs)
        want = _torch_outputs(graph, inputs)
        worst = max(worst, *(float(np.max(np.abs(g - w))) for g, w in zip(got, want)))
    return worst


def export_onnx(
    model: M3TLM,
    input_shapes: dict[str, tuple[int, ...]],
    out_dir: Path,
    tolerance: float = FP32_TOLERANCE,
    names: tuple[str, ...] = MODELS,
) -> dict[str, dict]:
    """Exports the graphs to ``out_dir/<name>.onnx``; returns {name: {path, max_abs_diff}}.

    Raises ``ParityError`` naming every graph whose difference exceeds ``tolerance``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    vocab = model.config.vocab_size
    report = {}
    for name, graph in graphs(model, input_shapes).items():
        if name not in names:
            continue
        path = export_graph(graph, out_dir / f"{name}.onnx", vocab)
        report[name] = {"path": str(path), "max_abs_diff": onnx_parity(graph, path, vocab)}
    (out_dir / "parity.json").write_text(json.dumps(report, indent=2))
    failed = {n: r["max_abs_diff"] for n, r in report.items() if not r["max_abs_diff"] <= tolerance}
    if failed:
        raise ParityError(f"ONNX differs from PyTorch above {tolerance:g}: {failed}")
    return report


def onnx_io(path: Path) -> dict[str, list[tuple[str, int, tuple]]]:
    """The graph's inputs and outputs as (name, ONNX elem type, dims; dynamic dims as -1)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append((v.name, t.elem_type, dims))
        return out

    initializers = {i.name for i in graph.initializer}
    return {
        "inputs": describe(v for v in graph.input if v.name not in initializers),
        "outputs": describe(graph.output),
    }


# --- TensorRT --------------------------------------------------------------------------


class TensorRTUnavailable(ExportError):
    """The TensorRT builder (Python package ``tensorrt``) is not installed on this host."""


def require_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` saying why it cannot be used."""
    return _tensorrt()


def _tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415  (optional: only GPU hosts have the builder)
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed here: engines can only be built on a GPU host with the "
            "TensorRT builder (pip install 'm3t-stream[tensorrt]' from NVIDIA's index, or "
            f"NVIDIA's Triton/TensorRT container). Import error: {exc}"
        ) from exc
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable("the installed tensorrt package is runtime-only (no Builder)")
    return trt


def _entropy_calibrator(trt, batches: list[dict[str, np.ndarray]], cache: Path):
    """An ``IInt8EntropyCalibrator2`` fed with batches drawn from the training data."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches, self.position, self.device = batches, 0, {}

        def get_batch_size(self):
            return len(next(iter(self.batches[0].values())))

        def get_batch(self, names):
            if self.position >= len(self.batches):
                return None
            batch = self.batches[self.position]
            self.position += 1
            self.device = {n: torch.from_numpy(batch[n]).cuda() for n in names}
            return [int(self.device[n].data_ptr()) for n in names]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def training_patients(run_dir: Path) -> np.ndarray:
    """The run's training patients (``RUN/split.json``): INT8 calibration draws only these."""
    path = Path(run_dir) / "split.json"
    if not path.exists():
        raise ExportError(f"{path} not found: INT8 calibration needs the run's split")
    return np.asarray(json.loads(path.read_text())["train"], dtype=np.int64)


def calibration_data(
    dataset: D.Dataset, patients: np.ndarray, rows: int = 512, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-row model inputs of up to ``rows`` examples of ``patients`` (the training
    patients), drawn with ``seed``; X-rays gathered only for the rows drawn."""
    eligible = np.flatnonzero(np.isin(dataset.arrays["subject_id"], patients))
    if len(eligible) == 0:
        raise ExportError("no example of the run's training patients in the dataset")
    chosen = np.sort(np.random.default_rng(seed).permutation(eligible)[:rows])
    return {name: D.rows(dataset, name, chosen) for name in D.INPUTS}


def calibration_batches(
    tensors: dict[str, np.ndarray], specs, batch: int = 32, n_batches: int = 16, seed: int = 0
):
    """Random training rows for INT8 calibration, as ``[{input name: array}]``."""
    n = len(next(iter(tensors.values())))
    rows = np.random.default_rng(seed).permutation(n)[: batch * n_batches]
    return [
        {
            s.name: np.ascontiguousarray(tensors[s.name][rows[i : i + batch]]).astype(s.dtype)
            for s in specs
        }
        for i in range(0, len(rows) - batch + 1, batch)
    ]


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    specs: tuple[mi.TensorSpec, ...],
    fp16: bool = True,
    int8: bool = False,
    calibration: list[dict[str, np.ndarray]] | None = None,
    max_batch: int = 64,
    opt_batch: int = 16,
    workspace_gib: float = 2.0,
) -> Path:
    """Builds a serialized TensorRT engine (``.plan``) with one dynamic-batch profile."""
    trt = _tensorrt()
    if int8 and not calibration:
        raise ExportError("INT8 needs calibration batches from the training data")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for spec in specs:
        profile.set_shape(
            spec.name, (1, *spec.shape), (opt_batch, *spec.shape), (max_batch, *spec.shape)
        )
    config.add_optimization_profile(profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(
            trt, calibration, Path(engine_path).with_suffix(".calib")
        )
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above)"
        )
    Path(engine_path).write_bytes(bytes(serialized))
    return Path(engine_path)


def run_engine(engine_path: Path, inputs: dict[str, np.ndarray], output_names) -> list[np.ndarray]:
    """Runs a TensorRT engine once on CUDA (I/O buffers are torch CUDA tensors)."""
    trt = _tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    device = {name: torch.from_numpy(array).cuda() for name, array in inputs.items()}
    for name, tensor in device.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    outputs = {}
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.empty(
            shape, dtype=dtypes[engine.get_tensor_dtype(name)], device="cuda"
        )
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT execution of {engine_path} failed")
    stream.synchronize()
    return [outputs[n].float().cpu().numpy() for n in output_names]


def engine_parity(graph: Graph, engine_path: Path, vocab_size: int, batch: int = 7) -> float:
    inputs = example_inputs(graph.inputs, batch, vocab_size, seed=1)
    got = run_engine(engine_path, inputs, [s.name for s in graph.outputs])
    want = _torch_outputs(graph, inputs)
    return float(max(np.max(np.abs(g - w)) for g, w in zip(got, want)))


def export_tensorrt(
    model: M3TLM,
    input_shapes: dict[str, tuple[int, ...]],
    onnx_dir: Path,
    out_dir: Path,
    fp16: bool = True,
    int8: bool = False,
    calibration_data: dict[str, np.ndarray] | None = None,
    tolerance: float = 2e-2,
    max_batch: int = 64,
) -> dict[str, dict]:
    """Engines ``out_dir/<name>.plan`` for every exported ONNX graph, each parity-checked.

    The default tolerance (2e-2 abs) is for FP16; INT8 needs a looser one (e.g. 0.1).
    """
    _tensorrt()  # fail before any work where TensorRT is missing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    report = {}
    for name, graph in graphs(model, input_shapes).items():
        onnx_path = Path(onnx_dir) / f"{name}.onnx"
        if not onnx_path.exists():
            raise ExportError(f"{onnx_path} not found: export ONNX first")
        calibration = None
        if int8:
            if calibration_data is None:
                raise ExportError("INT8 needs calibration data (the training split)")
            if all(s.name in calibration_data for s in graph.inputs):
                calibration = calibration_batches(calibration_data, graph.inputs)
            else:  # embeddings (the fusion head's inputs) come from the encoders
                calibration = [
                    dict(zip([s.name for s in graph.inputs], _tensors_through_encoders(model, b)))
                    for b in calibration_batches(
                        calibration_data, graphs(model, input_shapes)[FULL_MODEL].inputs
                    )
                ]
        engine = build_engine(
            onnx_path, out_dir / f"{name}.plan", graph.inputs, fp16, int8, calibration, max_batch
        )
        report[name] = {
            "path": str(engine),
            "max_abs_diff": engine_parity(graph, engine, model.config.vocab_size),
        }
    (out_dir / "parity.json").write_text(json.dumps(report, indent=2))
    failed = {n: r["max_abs_diff"] for n, r in report.items() if not r["max_abs_diff"] <= tolerance}
    if failed:
        raise ParityError(f"TensorRT differs from PyTorch above {tolerance:g}: {failed}")
    return report


def _tensors_through_encoders(model: M3TLM, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        inputs = [torch.from_numpy(batch[s.name]) for s in mi.input_specs(1)]
        embs = model.embeddings(*inputs[:5])
    return [e.numpy() for e in embs] + [batch[mi.MODALITY_MASK]]
