"""Triton's model control is behind the admin key: the bundled server refuses loads, unloads
and its other restricted APIs without the key's header, over gRPC and over HTTP (asked by
tritonclient and by raw HTTP requests, not through the project's helpers), while health and
inference stay open."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from m3t.clients import TRITON_ADMIN_GRPC_HEADER, TRITON_ADMIN_HEADER
from m3t.credentials import triton_admin_key
from m3t.services.process import ServiceError
from m3t.services.triton_server import TritonServer

pytestmark = pytest.mark.services

MODEL = "placeholder"  # the tests' stand-in model, loaded at start (tests/conftest.py)


@pytest.fixture
def grpc(settings):
    client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
    yield client
    client.load_model(MODEL, headers={TRITON_ADMIN_GRPC_HEADER: triton_admin_key(settings)})
    client.close()


@pytest.fixture
def http(settings):
    with httpx.Client(base_url=f"http://{settings.triton.http_url}", timeout=30) as client:
        yield client
        client.post(
            f"/v2/repository/models/{MODEL}/load",
            headers={TRITON_ADMIN_HEADER: triton_admin_key(settings)},
        )


def refused_over_grpc(call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as refusal:
        call(*args, **kwargs)
    return refusal.value.message()


def infer_over_grpc(client) -> np.ndarray:
    summary = np.array([[50.0, 10.0]], dtype=np.float32)
    tensor = grpcclient.InferInput("summary", list(summary.shape), "FP32")
    tensor.set_data_from_numpy(summary)
    return client.infer(MODEL, [tensor]).as_numpy("los_remaining_days")


def test_over_grpc_loads_and_unloads_need_the_key(settings, grpc):
    secret = triton_admin_key(settings)
    key, wrong = {TRITON_ADMIN_GRPC_HEADER: secret}, {TRITON_ADMIN_GRPC_HEADER: "x" * 43}
    unprefixed = {TRITON_ADMIN_HEADER: secret}  # HTTP's name: gRPC wants Triton's prefix
    for headers in (None, wrong, unprefixed, {"authorization": secret}):
        message = refused_over_grpc(grpc.unload_model, MODEL, headers=headers)
        assert f"expecting header '{TRITON_ADMIN_GRPC_HEADER}'" in message
        assert secret not in message
        assert grpc.is_model_ready(MODEL)  # refused: still served
        refused_over_grpc(grpc.get_model_repository_index, headers=headers)

    grpc.unload_model(MODEL, headers=key)
    assert not grpc.is_model_ready(MODEL)
    refused_over_grpc(grpc.load_model, MODEL)
    refused_over_grpc(grpc.load_model, MODEL, headers=wrong)
    assert not grpc.is_model_ready(MODEL)
    grpc.load_model(MODEL, headers=key)
    assert grpc.is_model_ready(MODEL)
    names = {m.name for m in grpc.get_model_repository_index(headers=key).models}
    assert MODEL in names


def test_over_grpc_health_and_inference_need_no_key(grpc):
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
    assert grpc.get_model_metadata(MODEL).name == MODEL
    assert grpc.get_model_config(MODEL).config.name == MODEL  # the worker checks a model's I/O
    np.testing.assert_allclose(infer_over_grpc(grpc)[:, 0], [2.0 + 0.05 * 50 + 0.1 * 10])


def test_over_grpc_logging_and_shared_memory_need_the_key(settings, grpc):
    key = {TRITON_ADMIN_GRPC_HEADER: triton_admin_key(settings)}
    refused_over_grpc(grpc.get_log_settings)
    refused_over_grpc(grpc.update_log_settings, {"log_verbose_level": 1})
    refused_over_grpc(grpc.get_trace_settings)
    refused_over_grpc(grpc.get_system_shared_memory_status)
    refused_over_grpc(grpc.register_system_shared_memory, "r", "/m3t-probe", 64)
    assert grpc.get_log_settings(headers=key, as_json=True)["settings"]
    assert grpc.get_system_shared_memory_status(headers=key, as_json=True) == {}


def test_over_http_loads_and_unloads_need_the_key(settings, http):
    key = {TRITON_ADMIN_HEADER: triton_admin_key(settings)}
    unload, load = f"/v2/repository/models/{MODEL}/unload", f"/v2/repository/models/{MODEL}/load"
    ready = f"/v2/models/{MODEL}/ready"
    for headers in ({}, {TRITON_ADMIN_HEADER: "not-the-key-" + "x" * 20}):
        refused = http.post(unload, headers=headers)
        assert refused.status_code == 403, refused.text
        assert key[TRITON_ADMIN_HEADER] not in refused.text
        assert http.get(ready).status_code == 200
        assert http.post("/v2/repository/index", headers=headers).status_code == 403

    assert http.post(unload, headers=key).status_code == 200
    assert http.get(ready).status_code == 400  # not ready
    assert http.post(load).status_code == 403
    assert http.get(ready).status_code == 400
    assert http.post(load, headers=key).status_code == 200
    assert http.get(ready).status_code == 200
    index = http.post("/v2/repository/index", headers=key)
    assert index.status_code == 200 and MODEL in {m["name"] for m in index.json()}


def test_over_http_health_and_inference_need_no_key_and_the_rest_does(settings, http):
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    summary = {"name": "summary", "shape": [1, 2], "datatype": "FP32", "data": [50, 10]}
    request = {"inputs": [summary]}
    answer = http.post(f"/v2/models/{MODEL}/infer", json=request)
    assert answer.status_code == 200, answer.text
    los = next(o for o in answer.json()["outputs"] if o["name"] == "los_remaining_days")
    assert los["data"] == pytest.approx([2.0 + 0.05 * 50 + 0.1 * 10])
    assert http.get(f"/v2/models/{MODEL}/config").status_code == 200

    key = {TRITON_ADMIN_HEADER: triton_admin_key(settings)}
    for method, path in (
        ("GET", "/v2/logging"),
        ("POST", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("POST", "/v2/systemsharedmemory/region/r/register"),
    ):
        body = {"log_file": "/tmp/m3t-probe.log"} if path == "/v2/logging" else None
        assert http.request(method, path, json=body).status_code == 403, (method, path)
    assert http.get("/v2/logging", headers=key).status_code == 200


def test_the_services_health_check_reads_the_index_with_the_key(settings):
    ok, detail = TritonServer(settings).probe()
    assert ok and MODEL in detail


def with_triton(settings, **changes):
    return settings.model_copy(update={"triton": settings.triton.model_copy(update=changes)})


def test_an_external_server_is_asked_with_the_configured_key(settings):
    # The session's server stands in for one an operator runs, configured with the same key.
    key = SecretStr(triton_admin_key(settings))
    assert TritonServer(with_triton(settings, launcher="external", admin_key=key)).health().healthy
    other = SecretStr("another-key-" + "x" * 20)
    refused = TritonServer(with_triton(settings, launcher="external", admin_key=other)).health()
    assert not refused.healthy and TRITON_ADMIN_GRPC_HEADER in refused.detail


def test_a_key_triton_cannot_take_whole_is_refused_before_it_starts(settings):
    for key in ("short", "a:b,c=" + "x" * 20, "spaces in " + "x" * 20):
        server = TritonServer(with_triton(settings, admin_key=SecretStr(key)))
        with pytest.raises(ServiceError, match="M3T_TRITON__ADMIN_KEY"):
            server.prepare()


def test_the_key_is_in_no_log(settings):
    key = triton_admin_key(settings)
    log = TritonServer(settings).log_file.read_text(errors="replace")
    assert log and key not in log
