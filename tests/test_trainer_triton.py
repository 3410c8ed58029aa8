"""The real Triton server loads the published M3T-LM models and returns PyTorch's numbers."""

import shutil

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from features import model_inputs as mi
from tests.tiny_model import publish_tiny
from trainer.export import MODELS, example_inputs
from trainer.publish import load_in_triton

pytestmark = pytest.mark.services


def _infer(client, graph, inputs):
    request = []
    for spec in graph.inputs:
        tensor = grpcclient.InferInput(
            spec.name, list(inputs[spec.name].shape), spec.triton_dtype.removeprefix("TYPE_")
        )
        tensor.set_data_from_numpy(inputs[spec.name])
        request.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(s.name) for s in graph.outputs]
    result = client.infer(graph.name, request, outputs=outputs, client_timeout=30)
    return [result.as_numpy(s.name) for s in graph.outputs]


@pytest.fixture(scope="module")
def served(settings, tmp_path_factory):
    """A small M3T-LM shaped like the repository's configs, published and loaded."""
    import tritonclient.grpc as grpc

    onnx_dir = tmp_path_factory.mktemp("onnx")
    model, all_graphs, published = publish_tiny(settings.model_repo, onnx_dir, 50, seed=0)
    assert load_in_triton(settings) == {name: True for name in MODELS}
    client = grpc.InferenceServerClient(settings.triton.grpc_url)
    for name in MODELS:
        assert client.is_model_ready(name, published[name].name), (
            f"{name} {published[name].name} is not served"
        )
    yield model, all_graphs, client
    client.close()
    # The session's deployed model (tests/conftest.py) is served again for the tests after.
    for version in published.values():
        shutil.rmtree(version)
    assert all(load_in_triton(settings).values())


@pytest.mark.parametrize("name", MODELS)
def test_triton_returns_pytorch_numbers(served, name):
    model, all_graphs, client = served
    graph = all_graphs[name]
    inputs = example_inputs(graph.inputs, 5, vocab_size=50, seed=11)
    with torch.no_grad():
        want = graph.module(*(torch.from_numpy(inputs[s.name]) for s in graph.inputs))
    want = want if isinstance(want, tuple) else (want,)
    got = _infer(client, graph, inputs)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert np.max(np.abs(g - w.numpy())) <= 1e-4


def test_triton_encoders_then_fusion_equal_the_full_model(served):
    _, g, client = served
    x = example_inputs(g["m3t_lm"].inputs, 4, vocab_size=50, seed=12)
    (emb_numeric,) = _infer(client, g["m3t_enc_numeric"], x)
    emb_radiology, emb_discharge = _infer(client, g["m3t_enc_notes"], x)
    (emb_cxr,) = _infer(client, g["m3t_enc_cxr"], x)
    names = [s.name for s in g["m3t_fusion"].inputs]
    fused = _infer(
        client,
        g["m3t_fusion"],
        dict(zip(names, [emb_numeric, emb_radiology, emb_discharge, emb_cxr, x[mi.MODALITY_MASK]])),
    )
    whole = _infer(client, g["m3t_lm"], x)
    assert all(np.allclose(f, w, atol=1e-5) for f, w in zip(fused, whole))


def test_a_malformed_request_fails_alone(served):
    _, g, client = served
    graph = g["m3t_enc_cxr"]
    bad = grpcclient.InferInput(mi.CXR, [1, 1, 3, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer(graph.name, [bad], client_timeout=30)
    assert _infer(client, graph, example_inputs(graph.inputs, 2, seed=1))[0].shape[0] == 2


def test_concurrent_requests_batched_together_each_get_their_own_rows(served):
    from concurrent.futures import Future

    _, g, client = served
    graph = g["m3t_lm"]
    requests = [
        example_inputs(graph.inputs, size, vocab_size=50, seed=20 + size)
        for size in (1, 3, 2, 5, 1, 4)
    ]
    futures = []
    for inputs in requests:
        tensors = []
        for spec in graph.inputs:
            t = grpcclient.InferInput(
                spec.name, list(inputs[spec.name].shape), spec.triton_dtype.removeprefix("TYPE_")
            )
            t.set_data_from_numpy(inputs[spec.name])
            tensors.append(t)
        future = Future()
        client.async_infer(
            graph.name, tensors, lambda result, error, f=future: f.set_result((result, error))
        )
        futures.append(future)
    for inputs, future in zip(requests, futures):
        result, error = future.result(timeout=30)
        assert error is None, error
        with torch.no_grad():
            want = graph.module(*(torch.from_numpy(inputs[s.name]) for s in graph.inputs))
        for spec, w in zip(graph.outputs, want):
            assert np.max(np.abs(result.as_numpy(spec.name) - w.numpy())) <= 1e-4
