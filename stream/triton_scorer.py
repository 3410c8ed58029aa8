"""Scoring through the real Triton server (tritonclient gRPC)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from m3t.settings import Settings

_NP_TO_TRITON = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}


class TritonScorer:
    """Sends named input arrays to one model; fails fast if the model is not ready."""

    def __init__(self, settings: Settings, model_name: str, outputs=("los_days", "mortality_prob")):
        self.client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        self.model_name = model_name
        self.outputs = outputs
        self.timeout_s = settings.triton.timeout_s
        if not self.client.is_model_ready(model_name):
            raise RuntimeError(f"Triton model {model_name!r} is not ready at {settings.triton.grpc_url}")
        meta = self.client.get_model_metadata(model_name, as_json=True)
        self.model = f"{model_name}:{max(meta.get('versions', ['?']))}"
        self.max_batch = int(self.client.get_model_config(model_name, as_json=True)["config"].get("max_batch_size", 0))

    def score(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(next(iter(inputs.values())))
        if self.max_batch and n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds {self.model_name}'s max_batch_size {self.max_batch}")
        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = grpcclient.InferInput(name, array.shape, _NP_TO_TRITON[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = self.client.infer(
            self.model_name, tensors,
            outputs=[grpcclient.InferRequestedOutput(o) for o in self.outputs],
            client_timeout=self.timeout_s,
        )
        los, mortality = (result.as_numpy(o).reshape(n) for o in self.outputs)
        return los, mortality

    def close(self) -> None:
        self.client.close()
