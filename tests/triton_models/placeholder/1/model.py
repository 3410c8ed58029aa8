"""Stand-in scorer for the tests' walking skeleton: a fixed formula, not a trained model."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.outputs = ("los_remaining_days", "mortality_prob")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                summary = pb_utils.get_input_tensor_by_name(request, "summary").as_numpy()
                age, observations = summary[:, 0:1], summary[:, 1:2]
                los = (2.0 + 0.05 * age + 0.1 * observations).astype(np.float32)
                logit = -6.0 + 0.05 * age + 0.02 * observations
                risk = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("los_remaining_days", los),
                            pb_utils.Tensor("mortality_prob", risk),
                        ]
                    )
                )
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
