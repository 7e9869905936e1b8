"""Triton's own HTTP client (tritonclient[http]) against our server, in JSON and binary modes:
what any Open Inference Protocol client should be able to do with aiaas-lab's /v2."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load
from server_fixtures import ServerProcess, aiaas_server  # noqa: F401  (fixture)

from aiaas_lab.engine.data import Normalizer
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.engine.models import build_model

try:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError as exc:
    # A developer without the extra gets a skip; CI, which installs it, must not pass by skipping.
    if os.environ.get("CI"):
        raise ImportError(f"tritonclient[http] is needed in CI (pip install -e '.[test]'): {exc}") from exc
    pytest.skip(f"tritonclient[http] is not installed: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def trained(aiaas_server: ServerProcess) -> dict[str, Any]:
    with aiaas_server.client() as client:
        job = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "name": "digits",
                                            "hyperparameters": {"epochs": 3, "normalize": True}}).json()
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, aiaas_server.log()
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        weights = client.get("/v1/models/digits/weights").content
    (length,) = struct.unpack("<Q", weights[:8])
    info = json.loads(json.loads(weights[8:8 + length])["__metadata__"]["aiaas.model"])
    model = build_model(info["spec"])
    model.load_state_dict(load(weights))
    model.eval()
    normalizer = Normalizer(torch.tensor(info["normalizer"]["mean"]), torch.tensor(info["normalizer"]["std"]))
    return {"model": model, "normalizer": normalizer}


@pytest.fixture
def triton(aiaas_server: ServerProcess) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(url=aiaas_server.url.removeprefix("http://"))
    try:
        yield client
    finally:
        client.close()


def test_health_and_metadata(triton: Any, aiaas_server: ServerProcess, trained: dict[str, Any]) -> None:
    auth = aiaas_server.headers()
    assert triton.is_server_live() and triton.is_server_ready()  # no token needed for health
    metadata = triton.get_server_metadata(headers=auth)
    assert metadata["name"] == "aiaas-lab" and "binary_tensor_data" in metadata["extensions"]
    assert triton.is_model_ready("digits", headers=auth) and triton.is_model_ready("digits", "1", headers=auth)
    assert not triton.is_model_ready("missing", headers=auth)
    model = triton.get_model_metadata("digits", headers=auth)
    assert model["platform"] == "pytorch" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    with pytest.raises(InferenceServerException, match="bearer token"):
        triton.get_server_metadata(headers={"Authorization": "Bearer wrong"})


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_json_and_binary(triton: Any, aiaas_server: ServerProcess, trained: dict[str, Any],
                               binary_in: bool, binary_out: bool) -> None:
    X, y = load_builtin_dataset("digits")
    batch = X[:37].numpy().astype(np.float32)
    inp = httpclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("output", binary_data=binary_out)
    result = triton.infer("digits", [inp], outputs=[out], headers=aiaas_server.headers(), request_id="42")
    logits = result.as_numpy("output")
    assert logits.shape == (37, 10) and logits.dtype == np.float32
    with torch.no_grad():
        expected = trained["model"](trained["normalizer"](X[:37])).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert result.get_response()["model_name"] == "digits" and result.get_response()["id"] == "42"
    # tritonclient's default (no outputs named) asks for binary outputs; that works too.
    default = triton.infer("digits", [inp], model_version="1", headers=aiaas_server.headers()).as_numpy("output")
    np.testing.assert_allclose(default, expected, rtol=1e-4, atol=1e-4)


def test_errors_reach_the_client_as_messages(triton: Any, aiaas_server: ServerProcess, trained: dict[str, Any]) -> None:
    wrong = httpclient.InferInput("input", [2, 63], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 63), np.float32))
    with pytest.raises(InferenceServerException, match=r"expected \[-1, 64\]"):
        triton.infer("digits", [wrong], headers=aiaas_server.headers())
    ints = httpclient.InferInput("input", [2, 64], "INT64")
    ints.set_data_from_numpy(np.zeros((2, 64), np.int64))
    with pytest.raises(InferenceServerException, match="FP32"):
        triton.infer("digits", [ints], headers=aiaas_server.headers())
    good = httpclient.InferInput("input", [1, 64], "FP32")
    good.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        triton.infer("nope", [good], headers=aiaas_server.headers())
