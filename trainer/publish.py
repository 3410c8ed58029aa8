"""Publish exported M3T-LM graphs as a new version in the Triton model repository.

Layout (Triton's repository format; one folder per model, numbered versions):

    model_repo/<model>/config.pbtxt     generated from features.model_inputs specs; committed
    model_repo/<model>/<v>/model.onnx   the graph (python and onnxruntime backends)
    model_repo/<model>/<v>/model.py     the Python-backend runner (backend=python only)
    model_repo/<model>/<v>/model.plan   the TensorRT engine (backend=tensorrt only)
    model_repo/<model>/<v>/m3t.json     provenance: run, features, parity
    model_repo/m3t_lm/<v>/model_card.{json,md}  the model card (trainer.model_card)

The six models (``m3t_lm``, ``m3t_enc_numeric``, ``m3t_enc_notes``, ``m3t_enc_cxr``,
``m3t_fusion``, ``m3t_rescore``) are published together under one version number (one more than the
highest existing version of any of them), so encoders and fusion head of the same
training run share a version. A version folder is never overwritten: it is staged under a
dot-name and renamed into place, and creating an existing version fails.

``config.pbtxt`` belongs to the model, not the version, so it is rewritten on publish;
when the new config would change a model that already has versions (other inputs, dtypes
or backend), publishing stops with ``PublishError`` instead of breaking those versions.

Backends: ``python`` (default; CPU, the Triton bundled with nvidia-pytriton, ONNX Runtime
inside the Python backend), ``onnxruntime`` (Triton's ``onnxruntime_onnx`` platform) and
``tensorrt`` (``tensorrt_plan``; needs engines from ``trainer.export.export_tensorrt``).

Chest X-rays on Triton (``publish_cxr_pipeline``, for Triton builds with the DALI backend,
such as NVIDIA's container; the CPU Triton here has only the Python backend)::

    model_repo/m3t_cxr_preprocess/<v>/model.dali   features.cxr's pipeline, serialized
    model_repo/m3t_cxr_embed/config.pbtxt          ensemble: image bytes -> m3t_cxr_preprocess
                                                   -> m3t_enc_cxr -> emb_cxr

One request per image (``[1, n_bytes]``); the DALI model's dynamic batcher joins requests
of different lengths (``allow_ragged_batch``) into one decode batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from features import model_inputs as mi
from m3t.clients import triton_admin_headers, triton_client
from m3t.settings import Settings
from trainer.export import FULL_MODEL, MODELS, Graph
from trainer.model_card import card_bytes

BACKENDS = ("python", "onnxruntime", "tensorrt")
PYTHON_MODEL = Path(__file__).with_name("triton_onnx_model.py")
# A background graph's stub process on a CPU host: the lowest CPU priority.
BACKGROUND_NICE = 19


class PublishError(RuntimeError):
    """Publishing would overwrite or break what the repository already serves."""


@dataclass(frozen=True)
class Batching:
    """Triton scheduling for every published model (tune from benchmarks/)."""

    # The stream worker sends micro-batches of up to 256 admissions: one execution each
    # rather than four chunks run one after another. No queue delay: a request runs at once
    # when the instance is free, and requests batch only while it is busy (a lone worker's
    # request would otherwise wait out the delay every time).
    max_batch_size: int = 256
    preferred_batch_size: tuple[int, ...] = (64, 256)
    max_queue_delay_microseconds: int = 0
    instances: int = 1
    intra_op_threads: int = 1  # ONNX Runtime threads per instance (python backend)

    def __post_init__(self):
        if self.max_batch_size < 1 or self.instances < 1:
            raise ValueError("max_batch_size and instances must be >= 1")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_size):
            raise ValueError(
                f"preferred_batch_size {self.preferred_batch_size} must lie in [1, max_batch_size]"
            )


def model_config(
    graph: Graph, backend: str = "python", batching: Batching = Batching()
) -> mc.ModelConfig:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = mc.ModelConfig(name=graph.name, max_batch_size=batching.max_batch_size)
    if backend == "python":
        config.backend = "python"
        config.parameters["intra_op_threads"].string_value = str(batching.intra_op_threads)
        if graph.background:
            config.parameters["nice"].string_value = str(BACKGROUND_NICE)
    else:
        config.platform = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    for spec in graph.inputs:
        config.input.add(
            name=spec.name, data_type=mc.DataType.Value(spec.triton_dtype), dims=spec.shape
        )
    for spec in graph.outputs:
        config.output.add(
            name=spec.name, data_type=mc.DataType.Value(spec.triton_dtype), dims=spec.shape
        )
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
    kind = mc.ModelInstanceGroup.KIND_CPU if backend == "python" else mc.ModelInstanceGroup.KIND_GPU
    config.instance_group.add(kind=kind, count=batching.instances)
    return config


def config_text(config: mc.ModelConfig) -> str:
    header = (
        "# Generated by `m3t export publish` from features/model_inputs.py; do not edit by hand.\n"
    )
    return header + text_format.MessageToString(config)


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(repo: Path, names=MODELS) -> int:
    return 1 + max((v for name in names for v in versions(Path(repo) / name)), default=0)


def write_config(repo: Path, graph: Graph, backend: str, batching: Batching) -> Path:
    """Writes ``<repo>/<model>/config.pbtxt``; refuses to change one that has versions."""
    return _write_config(repo, model_config(graph, backend, batching))


def _write_config(repo: Path, new: mc.ModelConfig, header: str | None = None) -> Path:
    folder = Path(repo) / new.name
    path = folder / "config.pbtxt"
    if path.exists() and versions(folder):
        old = read_config(path)
        signature = lambda c: (c.backend, c.platform, list(c.input), list(c.output))  # noqa: E731
        if signature(old) != signature(new):
            raise PublishError(
                f"{new.name}: the new model's inputs/outputs/backend differ from {path}, which "
                f"serves versions {versions(folder)}; "
                "publish under a fresh repository or remove them"
            )
    folder.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".config.{uuid.uuid4().hex}.pbtxt")
    text = config_text(new) if header is None else header + text_format.MessageToString(new)
    staged.write_text(text)
    os.replace(staged, path)  # atomic: Triton never reads half a config
    return path


def _stage_version(folder: Path, version: int, files: dict[str, Path | bytes]) -> Path:
    """Writes ``folder/<version>`` from ``files`` (a file to copy, or the bytes), staged and
    renamed: never overwrites."""
    staging = folder / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copy2(source, staging / name)
        else:
            (staging / name).write_bytes(source)
    target = folder / str(version)
    if target.exists():
        shutil.rmtree(staging)
        raise PublishError(f"{target} already exists; versions are never overwritten")
    staging.rename(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def publish(
    graphs: dict[str, Graph],
    onnx_dir: Path,
    repo: Path,
    backend: str = "python",
    batching: Batching = Batching(),
    engine_dir: Path | None = None,
    provenance: dict | None = None,
    card: dict | None = None,
) -> dict[str, Path]:
    """Publishes every graph as version ``next_version(repo)``; returns {model: version dir}.
    ``card`` (``trainer.model_card.build_card``) goes into the full model's version folder."""
    repo = Path(repo)
    if backend == "tensorrt" and engine_dir is None:
        raise PublishError("backend tensorrt needs engines: run `m3t export tensorrt` first")
    sources = {}
    for name in graphs:
        artefact = (
            (Path(engine_dir) / f"{name}.plan")
            if backend == "tensorrt"
            else Path(onnx_dir) / f"{name}.onnx"
        )
        if not artefact.exists():
            raise PublishError(f"{artefact} not found: export first")
        sources[name] = artefact
    for graph in graphs.values():
        write_config(repo, graph, backend, batching)
    version = next_version(repo, tuple(graphs))
    published = {}
    for name, artefact in sources.items():
        files: dict[str, Path | bytes] = {
            "model.plan" if backend == "tensorrt" else "model.onnx": artefact
        }
        if backend == "python":
            files["model.py"] = PYTHON_MODEL
        files["m3t.json"] = json.dumps(
            {
                "model": name,
                "version": version,
                "backend": backend,
                "sha256": _sha256(artefact),
                **(provenance or {}),
            },
            indent=2,
        ).encode()
        if card is not None and name == FULL_MODEL:
            files.update(card_bytes({**card, "version": version}))
        published[name] = _stage_version(repo / name, version, files)
    return published


# --- chest X-rays through Triton's DALI backend ------------------------------------------------

CXR_PREPROCESS, CXR_EMBED = "m3t_cxr_preprocess", "m3t_cxr_embed"
CXR_PIPELINE_INPUT = "input"  # the pipeline's external source: Triton's input must bear its name
CXR_BYTES = "cxr_bytes"
_CXR_HEADER = "# Generated by `m3t export dali` from features/cxr.py; do not edit by hand.\n"


def cxr_pipeline_configs(
    enc_cxr: mc.ModelConfig, device: str = "gpu", batching: Batching = Batching()
) -> tuple[mc.ModelConfig, mc.ModelConfig]:
    """(the DALI preprocessing model, the bytes -> embedding ensemble), shaped after the
    served X-ray encoder's config."""
    (tensor,) = enc_cxr.input
    (embedding,) = enc_cxr.output
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    dali = mc.ModelConfig(
        name=CXR_PREPROCESS, backend="dali", max_batch_size=batching.max_batch_size
    )
    dali.input.add(
        name=CXR_PIPELINE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True
    )
    # The DALI backend hands out the pipeline's outputs in order: one, named as the encoder's input.
    dali.output.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
    dali.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_size)
    dali.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
    dali.instance_group.add(kind=kind, count=batching.instances)

    ensemble = mc.ModelConfig(
        name=CXR_EMBED, platform="ensemble", max_batch_size=batching.max_batch_size
    )
    ensemble.input.add(name=CXR_BYTES, data_type=mc.TYPE_UINT8, dims=[-1])
    ensemble.output.add(
        name=embedding.name, data_type=embedding.data_type, dims=list(embedding.dims)
    )
    first = ensemble.ensemble_scheduling.step.add(model_name=CXR_PREPROCESS, model_version=-1)
    first.input_map[CXR_PIPELINE_INPUT] = CXR_BYTES
    first.output_map[tensor.name] = "cxr_tensor"
    second = ensemble.ensemble_scheduling.step.add(model_name=enc_cxr.name, model_version=-1)
    second.input_map[tensor.name] = "cxr_tensor"
    second.output_map[embedding.name] = embedding.name
    return dali, ensemble


def publish_cxr_pipeline(
    repo: Path, device: str = "gpu", batching: Batching = Batching(), num_threads: int = 4
) -> dict[str, Path]:
    """Serializes features.cxr's pipeline as a new version of ``m3t_cxr_preprocess`` and
    writes the ``m3t_cxr_embed`` ensemble; returns {model: folder written}."""
    from features.cxr import serialized_pipeline

    repo = Path(repo)
    encoder = repo / "m3t_enc_cxr" / "config.pbtxt"
    if not encoder.exists():
        raise PublishError(
            f"{encoder} not found: the ensemble feeds the X-ray encoder, publish the model first"
        )
    dali, ensemble = cxr_pipeline_configs(read_config(encoder), device, batching)
    (tensor,) = dali.output
    if tuple(tensor.dims[1:]) != (mi.CXR_SIZE, mi.CXR_SIZE):
        raise PublishError(
            f"m3t_enc_cxr takes {list(tensor.dims)}, the pipeline makes {mi.CXR_SIZE}x{mi.CXR_SIZE}"
        )
    pipeline = serialized_pipeline(device, batching.max_batch_size, num_threads)
    _write_config(repo, dali, _CXR_HEADER)
    folder = repo / CXR_PREPROCESS
    version = 1 + max(versions(folder), default=0)
    provenance = {
        "model": CXR_PREPROCESS,
        "version": version,
        "backend": "dali",
        "device": device,
        "sha256": hashlib.sha256(pipeline).hexdigest(),
        "source": "features/cxr.py",
    }
    published = {
        CXR_PREPROCESS: _stage_version(
            folder,
            version,
            {"model.dali": pipeline, "m3t.json": json.dumps(provenance, indent=2).encode()},
        )
    }
    _write_config(repo, ensemble, _CXR_HEADER)
    (repo / CXR_EMBED / "1").mkdir(exist_ok=True)  # an ensemble still needs a version folder
    published[CXR_EMBED] = repo / CXR_EMBED
    return published


def load_in_triton(settings: Settings, names=MODELS, timeout_s: float = 60.0) -> dict[str, bool]:
    """Asks the settings' Triton (model control mode explicit) to (re)load the models, with
    the admin key its model-repository API asks for; returns readiness per model. Loading
    picks up the newest version under the default policy."""
    from tritonclient.utils import InferenceServerException

    client = triton_client(settings)
    headers = triton_admin_headers(settings)
    try:
        ready = {}
        for name in names:
            try:
                client.load_model(name, headers=headers, client_timeout=timeout_s)
                ready[name] = client.is_model_ready(name)
            except InferenceServerException as exc:
                raise PublishError(
                    f"Triton at {settings.triton.grpc_url} could not load {name}: {exc.message()}"
                ) from exc
        return ready
    finally:
        client.close()
