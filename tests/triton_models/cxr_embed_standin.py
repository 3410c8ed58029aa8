"""A stand-in for the ``m3t_cxr_embed`` ensemble, for tests on the CPU Triton, which has no
DALI backend: the same contract (one image's compressed bytes per request -> ``emb_cxr``),
computed by the project's DALI pipeline on the CPU and the served ``m3t_enc_cxr`` graph.
A request whose image does not decode gets an error response, as the DALI backend's would."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from features.cxr import CxrPreprocessor, Encoded


class TritonPythonModel:
    def initialize(self, args):
        encoder = Path(args["model_repository"]).parent / "m3t_enc_cxr"
        version = max(
            int(p.name)
            for p in encoder.iterdir()
            if p.name.isdigit() and (p / "model.onnx").exists()
        )
        self.session = ort.InferenceSession(
            str(encoder / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.preprocess = CxrPreprocessor(batch_size=8, device="cpu")

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "cxr_bytes").as_numpy()
            result = self.preprocess([Encoded(data[0].tobytes())])
            if not result.ok[0]:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("the image did not decode")
                    )
                )
                continue
            (embedding,) = self.session.run(["emb_cxr"], {"cxr": result.tensors})
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("emb_cxr", embedding.astype(np.float32))]
                )
            )
        return responses
