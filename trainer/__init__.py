"""M3T-LM: model, training, evaluation, ONNX/TensorRT export and Triton publishing
(see README.md)."""
