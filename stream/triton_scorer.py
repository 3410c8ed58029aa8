"""A scorer for a Triton model that takes the batch's arrays as they are (no X-ray decode):
the walking skeleton's placeholder, or the served model in benchmarks."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from features import model_inputs as mi
from m3t.settings import Settings
from stream.scoring import TritonModel


class TritonScorer:
    """Fails fast if the model is not ready (``TritonModel`` checks it once)."""

    def __init__(self, settings: Settings, model_name: str):
        self.client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        self.net = TritonModel(self.client, model_name, settings.triton.timeout_s)
        self.model = f"{model_name}:{self.net.version}"
        self.max_batch = self.net.max_batch

    def score(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = self.net.infer(inputs)
        return out[mi.LOS_DAYS].reshape(-1), out[mi.MORTALITY].reshape(-1)

    def close(self) -> None:
        self.client.close()
