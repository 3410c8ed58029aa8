"""The models the stream scores with: one model on Triton (``TritonModel``, batches split to
its ``max_batch_size``, the chunks in flight together), or its published version in-process
with ONNX Runtime (``OnnxModel``, development; the same numbers)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from m3t.clients import triton_client
from m3t.settings import Settings

_NP_TO_TRITON = {
    np.dtype("float32"): "FP32",
    np.dtype("int64"): "INT64",
    np.dtype("uint8"): "UINT8",
}
# Triton unreachable or not answering in time: an outage, not the batch's fault.
OUTAGE_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


class TritonModel:
    """One model on Triton. Checked once (ready, I/O, max batch); a batch larger than
    ``max_batch_size`` is split and its chunks are kept in flight together."""

    def __init__(
        self, client: grpcclient.InferenceServerClient, name: str, timeout_s: float = 10.0
    ):
        if not client.is_model_ready(name):
            raise RuntimeError(f"Triton model {name!r} is not ready")
        self.client, self.name, self.timeout_s = client, name, timeout_s
        config = client.get_model_config(name, as_json=True)["config"]
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.widths = {o["name"]: int(o["dims"][-1]) for o in config["output"]}
        self.max_batch = int(config.get("max_batch_size", 0)) or 1 << 30
        versions = client.get_model_metadata(name, as_json=True).get("versions", ["?"])
        self.version = max(versions, key=lambda v: int(v) if v.isdigit() else -1)

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(arrays)
        if missing:
            raise ValueError(f"{self.name} needs inputs {sorted(missing)}")
        n = len(arrays[self.inputs[0]])
        chunks = [
            {name: arrays[name][start : start + self.max_batch] for name in self.inputs}
            for start in range(0, n, self.max_batch)
        ]
        results = self.requests(chunks)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in self.outputs}

    def requests(self, requests: list[dict[str, np.ndarray]]) -> list:
        """Each dict as one request, all in flight together: each one's result, or its error.
        A lone request is sent blocking: gRPC starts a thread for every future made while no
        other call is in flight, which at a quiet stream's one request per event cost the
        worker more CPU than building the request."""
        outputs = [grpcclient.InferRequestedOutput(o) for o in self.outputs]
        if len(requests) == 1:
            try:
                return [
                    self.client.infer(
                        self.name,
                        _tensors(requests[0]),
                        outputs=outputs,
                        client_timeout=self.timeout_s,
                    )
                ]
            except InferenceServerException as exc:
                return [exc]
        results: list = [None] * len(requests)
        done = threading.Semaphore(0)

        def callback(index, result, error):
            results[index] = error or result
            done.release()

        for index, arrays in enumerate(requests):
            self.client.async_infer(
                # tritonclient calls back with keywords: callback(result=..., error=...)
                self.name,
                _tensors(arrays),
                callback=functools.partial(callback, index),
                outputs=outputs,
                client_timeout=self.timeout_s,
            )
        for _ in requests:
            # client_timeout bounds each request; this bounds a callback that never comes.
            if not done.acquire(timeout=self.timeout_s + 5):
                raise InferenceServerException(  # an outage: Triton's, not the batch's
                    f"{self.name}: no answer from Triton within {self.timeout_s + 5:.0f}s",
                    status=OUTAGE_STATUSES[1],
                )
        return results


def _tensors(arrays: dict[str, np.ndarray]) -> list:
    tensors = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        tensor = grpcclient.InferInput(name, array.shape, _NP_TO_TRITON[array.dtype])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


class OnnxModel:
    """A published model version run in-process with ONNX Runtime: what Triton serves,
    without a server (development). Same interface as ``TritonModel``."""

    def __init__(self, repo: Path, name: str, version: str = "", threads: int = 1):
        from m3t.onnx_runtime import onnx_session

        folder = repo / name
        published = (
            sorted(
                int(v.name)
                for v in folder.iterdir()
                if v.name.isdigit() and (v / "model.onnx").exists()
            )
            if folder.is_dir()
            else []
        )
        if not published:
            raise RuntimeError(f"no published ONNX version of {name!r} in {repo}")
        self.name, self.version = name, version or str(published[-1])
        self.session = onnx_session(folder / self.version / "model.onnx", threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.widths = {o.name: int(o.shape[-1]) for o in self.session.get_outputs()}

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(
            self.outputs, {k: np.ascontiguousarray(arrays[k]) for k in self.inputs}
        )
        return dict(zip(self.outputs, values))


def open_model(settings: Settings, name: str, backend: str = "triton"):
    """``name`` on the Triton server, or its latest published version in-process."""
    if backend == "triton":
        return TritonModel(triton_client(settings), name, settings.triton.timeout_s)
    if backend == "onnx":
        return OnnxModel(settings.model_repo, name, settings.triton.model_version)
    raise ValueError(f"backend must be triton or onnx, not {backend!r}")
