"""Triton Python-backend model that runs its version's ``model.onnx`` with ONNX Runtime.

Publishing copies this file into each version folder as ``model.py`` when the repository
is published with ``--backend python`` (CPU hosts: the Triton bundled with nvidia-pytriton
has only the Python backend). On GPU hosts the same folder is served by Triton's
onnxruntime backend instead, and this file is not used.

It imports nothing from the project, so the model runs in any Triton Python stub whose
interpreter has numpy and onnxruntime. The config is parsed once in ``initialize``;
``execute`` runs all requests of a dynamic batch as one ONNX Runtime call and returns one
response per request, with an error set on the response of any malformed request.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]
        ]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]
        ]
        self.dims = {t["name"]: tuple(int(d) for d in t["dims"]) for t in config["input"]}
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # Work that may wait (explanations) takes only the CPU the other models leave idle.
        os.nice(int(params.get("nice", "0")))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        path = (
            Path(args["model_repository"])
            / args["model_version"]
            / params.get("onnx_file", "model.onnx")
        )
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _read(self, request):
        """The request's inputs, or a message saying what is wrong with them."""
        arrays = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, f"missing input {name!r}"
            array = tensor.as_numpy()
            if array.dtype != dtype or tuple(array.shape[1:]) != self.dims[name]:
                return None, (
                    f"input {name!r} is {array.dtype}{list(array.shape)}, "
                    f"expected {np.dtype(dtype)}[batch, {', '.join(map(str, self.dims[name]))}]"
                )
            arrays[name] = array
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            return None, "inputs disagree on the batch size"
        return arrays, None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, batches = [], []
        for i, request in enumerate(requests):
            arrays, error = self._read(request)
            if error:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                good.append(i)
                batches.append(arrays)
        if good:
            try:
                merged = {
                    name: np.concatenate([b[name] for b in batches]) for name, _ in self.inputs
                }
                results = self.session.run([name for name, _ in self.outputs], merged)
            except Exception as exc:  # noqa: BLE001 -- every failure must reach its client; ORT's
                # messages name tensors and shapes, never values, so no patient data leaks
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(
                            f"ONNX Runtime failed: {type(exc).__name__}: {exc}"
                        )
                    )
                return responses
            start = 0
            for i, arrays in zip(good, batches):
                stop = start + len(next(iter(arrays.values())))
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(result[start:stop]).astype(dtype))
                    for (name, dtype), result in zip(self.outputs, results)
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses

    def finalize(self):
        self.session = None
