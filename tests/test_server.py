"""`aiaas-lab serve` as a real process on 127.0.0.1: training jobs end to end, events (paged and
Server-Sent Events with resume), models and V2 inference, cancel and the job queue, malformed
input, a truncated upload. Restart survival and tenants are in tests/test_server_restart.py and
tests/test_server_tenants.py."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from server_fixtures import (  # noqa: F401
    ServerProcess,
    aiaas_server,
    all_events,
    infer_json,
    sse_frames,
    start_server,
    upload,
    wait_for,
)
from torch import nn

from aiaas_lab.engine.data import Normalizer
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.engine.export import export_module
from aiaas_lab.engine.models import build_model


def model_info(weights: bytes) -> dict[str, Any]:
    """The "aiaas.model" metadata of a weights file."""
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(json.loads(weights[8:8 + length])["__metadata__"]["aiaas.model"])


@pytest.fixture(scope="module")
def digits_job(aiaas_server: ServerProcess) -> dict[str, Any]:
    """A finished job: the seed MLP on digits with a validation split and normalisation."""
    with aiaas_server.client() as client:
        body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": 0.2, "name": "digits-mlp",
                "hyperparameters": {"epochs": 3, "normalize": True, "seed": 3}}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job = wait_for(client, response.json()["id"])
        assert job["status"] == "succeeded", (job, aiaas_server.log())
        return job


def test_a_job_trains_registers_its_model_and_reports_engine_events(aiaas_server: ServerProcess,
                                                                     digits_job: dict[str, Any]) -> None:
    job = digits_job
    assert job["model"] == {"name": "digits-mlp", "version": 1}
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
    assert job["hyperparameters"]["seed"] == 3 and job["error"] is None
    with aiaas_server.client() as client:
        events = all_events(client, job["id"])
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        kinds = [e["event"]["type"] for e in events]
        assert kinds[0] == "run_started" and kinds[-1] == "run_ended"
        assert kinds.count("epoch_end") == 3 and kinds.count("checkpoint") == 3 and kinds.count("step") >= 3
        started, ended = events[0]["event"], events[-1]["event"]
        assert started["run_id"] == job["id"] and started["train_samples"] + started["val_samples"] == 1797
        assert ended["status"] == "completed" and ended["epochs_completed"] == 3
        last_epoch = [e["event"] for e in events if e["event"]["type"] == "epoch_end"][-1]
        assert job["metrics"] == last_epoch["metrics"] and job["metrics"]["val_accuracy"] > 0.8
        # Checkpoint paths are relative to the job: the server's layout is not the client's business.
        assert all(e["event"]["path"] == "checkpoint/checkpoint.safetensors" for e in events
                   if e["event"]["type"] == "checkpoint")

        models = client.get("/v1/models").json()["data"]
        assert models == [{"name": "digits-mlp", "version": 1, "job_id": job["id"], "created_at": models[0]["created_at"],
                           "task": "classification", "classes": None,
                           "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                           "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
                           "preprocessing": {"task": "classification", "classes": None, "columns": None,
                                             "categories": {}, "input_shape": [64], "output_size": 10}}]


def test_weights_metadata_and_v2_inference_agree_with_a_local_forward(aiaas_server: ServerProcess,
                                                                       digits_job: dict[str, Any]) -> None:
    with aiaas_server.client() as client:
        response = client.get("/v1/models/digits-mlp/weights")
        assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
        state = load(response.content)
        info = model_info(response.content)
        assert info["task"] == "classification" and info["input_shape"] == [64] and info["output_size"] == 10
        assert info["spec"]["name"] == "mlp" and len(info["normalizer"]["mean"]) == 64
        assert client.get("/v1/models/digits-mlp/weights", params={"version": 1}).content == response.content
        assert client.get("/v1/models/digits-mlp/weights", params={"version": 2}).status_code == 404

        model = build_model(info["spec"])
        model.load_state_dict(state)
        model.eval()
        normalizer = Normalizer(torch.tensor(info["normalizer"]["mean"]), torch.tensor(info["normalizer"]["std"]))
        X, y = load_builtin_dataset("digits")
        with torch.no_grad():
            expected = model(normalizer(X[:50]))

        # JSON: the server applies the normalizer itself, so clients send raw features.
        result = infer_json(client, "digits-mlp", X[:50])
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["model_name"] == "digits-mlp" and body["model_version"] == "1"
        out = body["outputs"][0]
        assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [50, 10]
        torch.testing.assert_close(torch.tensor(out["data"]).reshape(50, 10), expected, rtol=1e-4, atol=1e-4)
        assert (torch.tensor(out["data"]).reshape(50, 10).argmax(1) == y[:50]).float().mean() > 0.8
        versioned = infer_json(client, "digits-mlp", X[:50], "/versions/1").json()
        assert versioned["outputs"] == body["outputs"]

        # Binary tensor extension, both ways.
        raw = X[:50].numpy().astype("<f4").tobytes()
        header = json.dumps({"id": "r1", "inputs": [{"name": "input", "shape": [50, 64], "datatype": "FP32",
                                                     "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
        response = client.post("/v2/models/digits-mlp/infer", content=header + raw,
                               headers={"Inference-Header-Content-Length": str(len(header)),
                                        "Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        length = int(response.headers["inference-header-content-length"])
        meta = json.loads(response.content[:length])
        assert meta["id"] == "r1" and meta["outputs"][0]["parameters"]["binary_data_size"] == 50 * 10 * 4
        values = np.frombuffer(response.content[length:], dtype="<f4").reshape(50, 10)
        torch.testing.assert_close(torch.from_numpy(values.copy()), expected, rtol=1e-4, atol=1e-4)

        meta = client.get("/v2/models/digits-mlp").json()
        assert meta == {"name": "digits-mlp", "versions": ["1"], "platform": "pytorch",
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]}
        assert client.get("/v2/models/digits-mlp/ready").status_code == 200
        assert client.get("/v2/models/digits-mlp/versions/1/ready").json()["ready"] is True


def test_bad_inference_requests_get_400_with_an_error(aiaas_server: ServerProcess, digits_job: dict[str, Any]) -> None:
    good = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    cases = [
        ({"inputs": [{**good, "shape": [1, 63], "data": [0.0] * 63}]}, "[-1, 64]"),
        ({"inputs": [{**good, "datatype": "INT64"}]}, "FP32"),
        ({"inputs": [{**good, "name": "x"}]}, "'input'"),
        ({"inputs": [{**good, "data": [0.0] * 10}]}, "64 values"),
        ({"inputs": [{**good, "data": ["a"] * 64}]}, "numbers"),
        ({"inputs": [{**good, "shape": [0, 64], "data": []}]}, "shape"),
        ({"inputs": []}, "one input"),
        ({"inputs": [good, good]}, "one input"),
        ({"inputs": [good], "outputs": [{"name": "logits"}]}, "'output'"),
        ([1, 2, 3], "one input"),
    ]
    with aiaas_server.client() as client:
        for body, words in cases:
            response = client.post("/v2/models/digits-mlp/infer", json=body)
            assert response.status_code == 400 and words in response.json()["error"], (body, response.text)
        response = client.post("/v2/models/digits-mlp/infer", content=b"{oops")
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
        header = json.dumps({"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 256}}]}).encode()
        for extra, length in ((b"\0" * 100, str(len(header))), (b"\0" * 256, "99999"), (b"\0" * 256, "ten")):
            response = client.post("/v2/models/digits-mlp/infer", content=header + extra,
                                   headers={"Inference-Header-Content-Length": length})
            assert response.status_code == 400, response.text
        assert client.post("/v2/models/nope/infer", json={"inputs": [good]}).status_code == 404
        assert client.get("/v2/models/digits-mlp/versions/7").status_code == 404
        assert infer_json(client, "digits-mlp", torch.zeros(1, 64)).status_code == 200  # still serving


def test_events_page_and_stream_the_same_history(aiaas_server: ServerProcess, digits_job: dict[str, Any]) -> None:
    job_id = digits_job["id"]
    with aiaas_server.client() as client:
        history = all_events(client, job_id)
        pages, after = [], 0
        while True:
            page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 7}).json()
            pages += page["data"]
            if not page["has_more"]:
                break
            assert len(page["data"]) == 7
            after = page["data"][-1]["id"]
        assert pages == history
        frames = list(sse_frames(client, job_id))
        assert [(f["id"], f["event"], f["data"]) for f in frames] == [(e["id"], e["event"]["type"], e["event"]) for e in history]
        # Resuming: Last-Event-ID wins over ?after=, as for a reconnecting EventSource.
        resumed = list(sse_frames(client, job_id, headers={"Last-Event-ID": "10"}, after=3))
        assert [f["id"] for f in resumed] == [e["id"] for e in history[10:]]
        assert [f["id"] for f in sse_frames(client, job_id, after=5)] == [e["id"] for e in history[5:]]
        assert list(sse_frames(client, job_id, headers={"Last-Event-ID": str(len(history))})) == []


def test_live_stream_survives_a_dropped_connection(aiaas_server: ServerProcess) -> None:
    with aiaas_server.client() as client:
        job = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                                            "hyperparameters": {"epochs": 15, "batch_size": 32}}).json()
        first = list(sse_frames(client, job["id"], limit=5))  # then the connection is dropped mid-run
        assert [f["id"] for f in first] == [1, 2, 3, 4, 5]
        rest = list(sse_frames(client, job["id"], headers={"Last-Event-ID": "5"}))
        assert rest[-1]["event"] == "run_ended"
        frames = first + rest
        assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
        assert [f["data"] for f in frames] == [e["event"] for e in all_events(client, job["id"])]
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_uploaded_tensors_train_a_regression_model(aiaas_server: ServerProcess) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 5, generator=g)
    y = (X @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]])) + 0.01 * torch.randn(400, 1, generator=g)
    train, val = save({"X": X[:300], "y": y[:300]}), save({"X": X[300:], "y": y[300:]})
    with aiaas_server.client() as client:
        shas = []
        for blob in (train, val):
            sha = hashlib.sha256(blob).hexdigest()
            assert client.put(f"/v1/data/{sha}", content=blob).status_code in (200, 201)
            shas.append(sha)
        job = client.post("/v1/jobs", json={"model": {"builtin": "linear"}, "data": {"tensors": shas[0]},
                                            "val": {"tensors": shas[1]}, "name": "reg",
                                            "hyperparameters": {"epochs": 40, "lr": 0.05, "batch_size": 32}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "succeeded" and job["metrics"]["val_loss"] < 0.05, job
        entry = [m for m in client.get("/v1/models").json()["data"] if m["name"] == "reg"][0]
        assert entry["task"] == "regression" and entry["outputs"][0]["shape"] == [-1, 1]
        out = infer_json(client, "reg", X[300:310]).json()["outputs"][0]
        assert out["shape"] == [10, 1]
        torch.testing.assert_close(torch.tensor(out["data"]).reshape(10, 1), y[300:310], atol=0.3, rtol=0)


def test_a_failing_setup_fails_the_job_with_the_reason(aiaas_server: ServerProcess) -> None:
    data = save({"X": torch.randn(30, 10), "y": torch.randint(0, 3, (30,))})
    sha = hashlib.sha256(data).hexdigest()
    with aiaas_server.client() as client:
        client.put(f"/v1/data/{sha}", content=data)
        # The cnn needs square images; 10 features are not one.
        job = client.post("/v1/jobs", json={"model": {"builtin": "cnn"}, "data": {"tensors": sha}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "failed" and "square" in job["error"], job
        events = all_events(client, job["id"])
        assert [e["event"]["type"] for e in events] == ["run_ended"]
        assert events[0]["event"]["status"] == "failed" and events[0]["event"]["error"] == job["error"]
        assert client.get("/v1/models").json()["data"] == [m for m in client.get("/v1/models").json()["data"]
                                                          if m["job_id"] != job["id"]]


def test_malformed_requests_never_get_a_500(aiaas_server: ServerProcess, digits_job: dict[str, Any]) -> None:
    requests = [
        ("POST", "/v1/jobs", b"\xff\xfe garbage"), ("POST", "/v1/jobs", b"null"), ("POST", "/v1/jobs", b'"text"'),
        ("POST", "/v1/jobs", b'{"model": {"builtin": ["mlp"]}, "data": {}}'),
        ("POST", "/v1/jobs", b'{"model": {"export": {"graph": 1, "weights": null}}, "data": {"builtin": "digits"}}'),
        ("POST", "/v1/jobs", b'{"model": {"builtin": "mlp", "config": {"input_shape": "64"}}, "data": {"builtin": "digits"}}'),
        ("POST", "/v1/jobs", b'{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "hyperparameters": {"lr": 1e999}}'),
        ("POST", "/v1/jobs", b'{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": {"tensors": 5}}'),
        ("PUT", "/v1/data/" + "a" * 64, b"body"), ("PUT", "/v1/data/" + "g" * 64, b"body"),
        ("POST", "/v1/jobs/" + "x" * 5000 + "/cancel", b""), ("GET", "/v1/jobs/%00", b""),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": "1x64"}]}'),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [[[]]]}]}'),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": [1e3, 64], "datatype": "FP32"}]}'),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1], "parameters": []}]}'),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0], "parameters": {"binary_data_size": "8"}}]}'),
        ("POST", "/v2/models/digits-mlp/infer", b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": []}], "outputs": "all"}'),
        ("GET", "/v1/models/digits-mlp/weights?version=-3", b""), ("GET", "/v1/models/digits-mlp/weights?version=abc", b""),
    ]
    with aiaas_server.client() as client:
        for method, path, body in requests:
            response = client.request(method, path, content=body)
            assert 400 <= response.status_code < 500, (method, path, body, response.status_code, response.text)
            assert response.json()["error"], (method, path, body)
        assert client.get("/v1/jobs").status_code == 200
    assert "Traceback" not in aiaas_server.log()


def test_a_truncated_upload_is_not_stored(aiaas_server: ServerProcess) -> None:
    data = b"z" * 100_000
    sha = hashlib.sha256(data).hexdigest()
    with socket.create_connection(("127.0.0.1", aiaas_server.port)) as sock:
        sock.sendall(f"PUT /v1/data/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {aiaas_server.token}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:30_000])
        time.sleep(0.3)
        sock.shutdown(socket.SHUT_RDWR)
    with aiaas_server.client() as client:
        time.sleep(0.3)
        assert client.head(f"/v1/data/{sha}").status_code == 404
        assert client.put(f"/v1/data/{sha}", content=data).status_code == 201
    assert not list(aiaas_server.data_dir.joinpath("blobs").rglob("*.part"))


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("one-slot") / "data", extra_args=["--max-jobs", "1"])
    try:
        yield server
    finally:
        server.stop()


def test_cancel_stops_a_running_job_and_keeps_its_checkpoint(one_slot_server: ServerProcess) -> None:
    long_job = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                "hyperparameters": {"epochs": 500, "batch_size": 16}}
    with one_slot_server.client() as client:
        running = client.post("/v1/jobs", json=long_job).json()
        waiting = client.post("/v1/jobs", json={**long_job, "hyperparameters": {"epochs": 1}}).json()
        # Wait for the first epoch's checkpoint; one job at a time, so the second is still queued.
        for frame in sse_frames(client, running["id"]):
            if frame["event"] == "checkpoint":
                break
        assert client.get(f"/v1/jobs/{running['id']}").json()["status"] == "running"
        assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"

        t0 = time.monotonic()
        cancelled = client.post(f"/v1/jobs/{running['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and time.monotonic() - t0 < 5
        assert client.post(f"/v1/jobs/{running['id']}/cancel").json() == cancelled
        events = all_events(client, running["id"])
        ended = events[-1]["event"]
        assert ended["type"] == "run_ended" and ended["status"] == "stopped" and ended["reason"] == "cancelled"
        assert events[-2]["event"]["type"] == "checkpoint"  # the engine saved where it stopped
        checkpoint = one_slot_server.data_dir / "jobs" / running["id"] / "checkpoint" / "checkpoint.safetensors"
        assert checkpoint.exists()
        assert cancelled["model"] is None and not [m for m in client.get("/v1/models").json()["data"]
                                                   if m["job_id"] == running["id"]]

        # The freed slot goes to the queued job.
        assert wait_for(client, waiting["id"])["status"] == "succeeded"


def test_jobs_queue_beyond_max_jobs_and_cancel_while_queued(one_slot_server: ServerProcess) -> None:
    with one_slot_server.client() as client:
        first = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                                              "hyperparameters": {"epochs": 30}}).json()
        second = client.post("/v1/jobs", json={"model": {"builtin": "linear"}, "data": {"builtin": "digits"}}).json()
        assert client.get(f"/v1/jobs/{second['id']}").json()["status"] == "queued"
        cancelled = client.post(f"/v1/jobs/{second['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
        assert [e["event"]["reason"] for e in all_events(client, second["id"])] == ["cancelled before it started"]
        assert wait_for(client, first["id"])["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{second['id']}").json()["status"] == "cancelled"


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_an_exported_module_trains_serves_and_its_weights_load_locally(aiaas_server: ServerProcess) -> None:
    torch.manual_seed(0)
    module = SmallNet()
    X, y = load_builtin_dataset("digits")
    graph, weights = export_module(module, X[:8])
    with aiaas_server.client() as client:
        refs = {}
        for key, blob in (("graph", graph), ("weights", weights)):
            refs[key] = hashlib.sha256(blob).hexdigest()
            assert client.put(f"/v1/data/{refs[key]}", content=blob).status_code == 201
        job = client.post("/v1/jobs", json={"model": {"export": refs}, "data": {"builtin": "digits"}, "val": 0.2,
                                            "name": "exported", "hyperparameters": {"epochs": 4, "normalize": True}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "succeeded" and job["metrics"]["val_accuracy"] > 0.8, job
        blob = client.get("/v1/models/exported/weights").content
        module.load_state_dict(load(blob))  # the same keys as the user's own module
        module.eval()
        info = model_info(blob)
        assert info["spec"] is None and info["input_shape"] == [64]
        out = torch.tensor(infer_json(client, "exported", X[:30]).json()["outputs"][0]["data"]).reshape(30, 10)
        assert (out.argmax(1) == y[:30]).float().mean() > 0.8
        normalizer = Normalizer(torch.tensor(info["normalizer"]["mean"]), torch.tensor(info["normalizer"]["std"]))
        with torch.no_grad():
            torch.testing.assert_close(module(normalizer(X[:30])), out, rtol=1e-4, atol=1e-4)


def test_a_graph_calling_anything_but_allow_listed_aten_ops_is_refused(aiaas_server: ServerProcess) -> None:
    graph, weights = export_module(SmallNet(), torch.randn(4, 64))
    document = json.loads(graph)
    document["graphs"]["eval"]["nodes"][0]["target"] = "builtins.exec"
    tampered = json.dumps(document).encode()
    with aiaas_server.client() as client:
        refs = {"graph": hashlib.sha256(tampered).hexdigest(), "weights": hashlib.sha256(weights).hexdigest()}
        client.put(f"/v1/data/{refs['graph']}", content=tampered)
        client.put(f"/v1/data/{refs['weights']}", content=weights)
        response = client.post("/v1/jobs", json={"model": {"export": refs}, "data": {"builtin": "digits"}})
        assert response.status_code == 400
        assert "allow-listed aten operators" in response.json()["error"] and "builtins.exec" in response.json()["error"]
        response = client.post("/v1/jobs", json={"model": {"pickle": refs["weights"]}, "data": {"builtin": "digits"}})
        assert response.status_code == 400 and "--allow-code" in response.json()["error"]
