"""Bounded work for tenants of a real `aiaas-lab serve` on 127.0.0.1: deeply nested JSON, request
heads and bodies that are too large or stop arriving, exported graphs that would allocate without
limit, slow models and a full inference queue, and job errors without server paths."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from safetensors.torch import save
from server_fixtures import ServerProcess, start_server, upload, wait_for
from torch import nn

from aiaas_lab.engine.export import export_module

DEEP = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("bounds") / "data",
                           extra_args=["--body-timeout-s", "1", "--max-header-kb", "16",
                                       "--infer-threads", "1", "--infer-queue", "1"])
    try:
        yield process
    finally:
        process.stop()


def train_exported(client: httpx.Client, module: nn.Module, name: str, features: int = 4,
                   rows: int = 32, **hyperparameters: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    graph, weights = export_module(module, torch.randn(4, features))
    X = torch.randn(rows, features)
    data = upload(client, save({"X": X, "y": (X[:, 0] > 0).long()}))
    body = {"model": {"export": {"graph": upload(client, graph), "weights": upload(client, weights)}},
            "data": {"tensors": data}, "name": name, "hyperparameters": {"epochs": 1, **hyperparameters}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return wait_for(client, response.json()["id"])


def assert_one_line_400(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message


def row_body(features: int, rows: int = 1, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [rows, features], "datatype": "FP32",
                        "data": [0.5] * (rows * features)}], **extra}


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.fixture(scope="module")
def small_model(server: ServerProcess) -> str:
    with server.client() as client:
        job = train_exported(client, Small(), "small")
    assert job["status"] == "succeeded", job
    return "small"


# ---------------------------------------------------------------- 3. deeply nested JSON

def test_json_nested_1000_deep_is_a_400_at_every_json_endpoint(server: ServerProcess, small_model: str) -> None:
    deep_list, deep_object = "[" * DEEP + "]" * DEEP, '{"a":' * DEEP + "1" + "}" * DEEP
    job_bodies = ['%s', '{"model": %s, "data": {"builtin": "digits"}}',
                  '{"model": {"builtin": "mlp", "config": %s}, "data": {"builtin": "digits"}}',
                  '{"model": {"builtin": "mlp"}, "data": %s}', '{"model": {"builtin": "mlp"}, "data": {"builtin": %s}}',
                  '{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "hyperparameters": %s}',
                  '{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "hyperparameters": {"epochs": %s}}',
                  '{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "name": %s}',
                  '{"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": %s}',
                  '{"model": {"export": {"graph": %s, "weights": "x"}}, "data": {"builtin": "digits"}}']
    row = ",".join(["0.5"] * 4)
    infer_bodies = ['%s', '{"inputs": %s}', '{"inputs": [%s]}', '{"inputs": [{"name": %s}]}',
                    '{"inputs": [{"name": "input", "datatype": %s}]}',
                    '{"inputs": [{"name": "input", "shape": %s, "datatype": "FP32"}]}',
                    '{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": %s}]}',
                    '{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": '
                    '{"binary_data_size": %s}}]}'] + [
        prefix + ' "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [' + row + ']}]}'
        for prefix in ('{"id": %s,', '{"outputs": %s,', '{"outputs": [{"name": %s}],', '{"parameters": %s,')]
    with server.client() as client:
        for deep in (deep_list, deep_object):
            for template in job_bodies:
                response = client.post("/v1/jobs", content=template.replace("%s", deep),
                                       headers={"Content-Type": "application/json"})
                assert_one_line_400(response)
            for template in infer_bodies:
                body = template.replace("%s", deep).encode()
                assert_one_line_400(client.post(f"/v2/models/{small_model}/infer", content=body))
                # the same JSON as the binary extension's header, tensor bytes after it
                binary = client.post(f"/v2/models/{small_model}/infer", content=body + b"\0" * 16,
                                     headers={"Inference-Header-Content-Length": str(len(body))})
                assert_one_line_400(binary)
        # a graph document nested 1,000 deep, uploaded as a blob, is refused when a job names it
        graph = upload(client, ('{"format": "aiaas-export", "version": 1, "graphs": ' + deep_list + "}").encode())
        args = upload(client, ('{"format": "aiaas-export", "version": 1, "graphs": {"train": {"inputs": [], "nodes": '
                            '[{"name": "n", "target": "aten.relu.default", "args": ' + deep_list + '}], "outputs": []}, '
                            '"eval": {}}}').encode())
        weights = upload(client, save({"w": torch.zeros(1)}))
        for sha in (graph, args):
            response = client.post("/v1/jobs", json={"model": {"export": {"graph": sha, "weights": weights}},
                                                     "data": {"builtin": "digits"}})
            assert_one_line_400(response, "model.export.graph", "nested")
        # an id that is a plain string still comes back
        ok = client.post(f"/v2/models/{small_model}/infer", json=row_body(4, id="request-7"))
        assert ok.status_code == 200 and ok.json()["id"] == "request-7"
    assert "RecursionError" not in server.log() and "Traceback" not in server.log()


# ---------------------------------------------------------------- 4. heads and bodies

def test_a_safetensors_header_nested_100k_deep_is_a_400(server: ServerProcess) -> None:
    """The header was parsed with json.loads, which recursed into RecursionError: a 500."""
    header = b'{"X": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    blob = len(header).to_bytes(8, "little") + header
    with server.client() as client:
        sha = upload(client, blob)
        response = client.post("/v1/jobs", json={"model": {"builtin": "linear"}, "data": {"tensors": sha}})
        assert_one_line_400(response, "data.tensors", "safetensors", sha)


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_request_heads_are_bounded_in_size_and_time(server: ServerProcess) -> None:
    # a header streamed without end: 431, then the connection closes, long before 64 MB
    sock = _connect(server)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < 64 * 2**20:
            sock.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    reply = _read_until_closed(sock)
    assert sent < 64 * 2**20 and reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"--max-header-kb" in reply
    # a head over the limit that arrives in one piece
    sock = _connect(server)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
    # one under it is served
    sock = _connect(server)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 12_000 + b"\r\nConnection: close\r\n\r\n")
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    # a head that stops arriving: 408 after --body-timeout-s (1 s here)
    sock = _connect(server)
    start = time.monotonic()
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 < time.monotonic() - start < 10, reply[:200]


def test_a_pipelined_head_behind_an_event_stream_does_not_break_the_stream(server: ServerProcess) -> None:
    """The head timer wrote a raw 408 into the event stream still going out before it."""
    with server.client() as client:
        job = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                                            "hyperparameters": {"epochs": 300, "batch_size": 16}}).json()
        try:
            deadline = time.monotonic() + 60
            while not client.get(f"/v1/jobs/{job['id']}/events").json()["data"]:
                assert time.monotonic() < deadline, server.log()[-2000:]
                time.sleep(0.1)
            sock = _connect(server)
            sock.settimeout(0.5)
            sock.sendall(f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         f"{server.token}\r\nAccept: text/event-stream\r\n\r\n".encode())
            data = sock.recv(65536)  # the stream has started
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # the next head, not finished
            closed, deadline = False, time.monotonic() + 3  # three times --body-timeout-s
            while time.monotonic() < deadline and not closed:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                closed = not chunk
                data += chunk
            sock.close()
        finally:
            client.post(f"/v1/jobs/{job['id']}/cancel")
    assert data.startswith(b"HTTP/1.1 200 ") and b"event: run_started" in data, data[:300]
    assert b"HTTP/1.1 408" not in data and not closed, data[-500:]


def test_a_body_that_stops_arriving_gets_408_and_a_slow_steady_one_is_served(server: ServerProcess) -> None:
    sock = _connect(server)
    start = time.monotonic()
    sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"model": ')
    reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 < time.monotonic() - start < 10, reply[:300]
    assert b"--body-timeout-s" in reply
    # The timeout is per pause, not for the whole body: an upload in pieces 0.4 s apart succeeds.
    blob = save({"X": torch.randn(64, 4), "y": torch.zeros(64).long()})
    sha = hashlib.sha256(blob).hexdigest()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(blob), len(blob) // 4 + 1):
            time.sleep(0.4)
            yield blob[i:i + len(blob) // 4 + 1]

    with server.client() as client:
        response = client.put(f"/v1/data/{sha}", content=pieces())
        assert response.status_code in (200, 201), response.text


def test_a_response_sent_before_the_body_was_read_closes_a_trickling_connection(server: ServerProcess) -> None:
    """A 401 or a 404 answered before the body was read: uvicorn used to go on reading the
    announced 100,000 bytes, one every 2 s, with no bound, past --body-timeout-s 1."""
    heads = ["POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token\r\n",
             f"POST /v2/models/no-such-model/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"]
    for head, status in zip(heads, (b"401", b"404"), strict=True):
        sock = _connect(server)
        sock.settimeout(2.5)
        sock.sendall((head + "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode() + b"{")
        reply, closed = b"", False
        for _ in range(4):  # at most ~10 s of trickling
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:  # closed with our last byte unread: a reset, after the reply
                chunk = b""
            if chunk == b"":
                closed = True
                break
            reply += chunk or b""
            try:
                sock.sendall(b" ")
            except OSError:
                closed = True
                break
        sock.close()
        assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:300]
        assert closed, reply[:300]


# ---------------------------------------------------------------- 1. exported graphs' memory

class Broadcast(nn.Module):
    """(rows * 4) squared elements from a column plus a row: fine for a batch of 8, not of 4,000."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = x.reshape(-1, 1) + x.reshape(1, -1)
        return self.lin(x) + square.mean() * 0


class Fill(nn.Module):
    """A tensor of 2**20 * 2**10 elements per row of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.full((x.shape[0] * 2**20, 2**10), 0.0).sum()


def test_exported_graphs_cannot_allocate_past_the_bound(server: ServerProcess) -> None:
    with server.client() as client:
        # sizes written into the graph: refused at upload
        graph, weights = export_module(Small(), torch.randn(4, 4))
        document = json.loads(graph)
        node = document["graphs"]["train"]["nodes"][0]
        document["graphs"]["train"]["nodes"].insert(0, {"name": "bomb", "target": "aten.zeros.default",
                                                        "args": [[2**20, 2**20]], "kwargs": {}})
        assert node["name"] != "bomb"
        refs = {"graph": upload(client, json.dumps(document).encode()), "weights": upload(client, weights)}
        response = client.post("/v1/jobs", json={"model": {"export": refs}, "data": {"builtin": "digits"}})
        assert_one_line_400(response, "model.export.graph", "1,099,511,627,776", "MAX_ELEMENTS")
        # sizes computed from the input: training fails with the reason, the server lives on
        job = train_exported(client, Fill(), "fill")
        assert job["status"] == "failed" and "MAX_ELEMENTS" in job["error"] and "full" in job["error"], job
        # a model within bounds for its training batches, but not for a large inference batch
        job = train_exported(client, Broadcast(), "broadcast", batch_size=8)
        assert job["status"] == "succeeded", job
        assert client.post("/v2/models/broadcast/infer", json=row_body(4, rows=8)).status_code == 200
        message = assert_one_line_400(client.post("/v2/models/broadcast/infer", json=row_body(4, rows=4000)),
                                      "MAX_ELEMENTS", "[16000, 16000]")
        assert "256,000,000" in message
        assert client.get("/v2/health/live").status_code == 200
    assert server.process.poll() is None


class HiddenCopies(nn.Module):
    """A (N, N, 1, 1) output, but matmul broadcasts its batch dimensions by copying both operands
    to (N * N, 64) before a bmm: 2 GB hidden at N = 2048 that the nodes' outputs do not show."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        product = torch.matmul(x.view(n, 1, 1, 64), x.view(1, n, 64, 1))
        return self.lin(x) + product.mean() * 0


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.view(x.shape[0], 1, 8, 8))).flatten(1))


def test_hidden_copies_inside_composite_ops_count_against_the_bound(server: ServerProcess) -> None:
    with server.client() as client:
        # within bounds for its training batches of 8, refused for an inference batch of 2048
        job = train_exported(client, HiddenCopies(), "hidden", features=64, batch_size=8)
        assert job["status"] == "succeeded", job
        assert client.post("/v2/models/hidden/infer", json=row_body(64, rows=8)).status_code == 200
        assert_one_line_400(client.post("/v2/models/hidden/infer", json=row_body(64, rows=2048)),
                            "MAX_ELEMENTS", "[2048, 2048, 1, 64]")
        # and a training batch of 2048 fails with the reason
        job = train_exported(client, HiddenCopies(), "hidden-big", features=64, rows=2048, batch_size=2048)
        assert job["status"] == "failed" and "MAX_ELEMENTS" in job["error"], job
        # ordinary graphs are not caught: an MLP and a CNN on a batch of 2048
        for name, module in (("mlp64", nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))),
                             ("cnn64", SmallCNN())):
            job = train_exported(client, module, name, features=64, rows=2048, batch_size=2048)
            assert job["status"] == "succeeded", job
            response = client.post(f"/v2/models/{name}/infer", json=row_body(64, rows=2048))
            assert response.status_code == 200, response.text[:300]
    assert server.process.poll() is None


def test_a_damaged_model_file_is_a_503_with_the_reason_in_the_log(server: ServerProcess) -> None:
    """A truncated model.safetensors raises SafetensorError (not OSError): it used to be a 500."""
    with server.client() as client:
        job = train_exported(client, Small(), "damaged")
        assert job["status"] == "succeeded", job
        weights = server.data_dir / "jobs" / job["id"] / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:40])
        response = client.post("/v2/models/damaged/infer", json=row_body(4))
        assert response.status_code == 503, (response.status_code, response.text[:300])
        message = response.json()["error"]
        assert "damaged" in message and "\n" not in message and str(server.data_dir) not in message, message
    assert "'damaged' version 1 could not be loaded: SafetensorError" in server.log()


# ---------------------------------------------------------------- 2. slow models, full queue

class Slow(nn.Module):
    """About a second of matrix products per forward pass, whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.ones(2048, 2048)
        for _ in range(3):
            a = (a @ a) * (1 / 2048)
        return self.lin(x) + a[0, 0] * 0


def test_a_slow_model_runs_off_the_event_loop_and_a_full_queue_is_503(server: ServerProcess) -> None:
    with server.client(timeout=120) as client:
        job = train_exported(client, Slow(), "slow", rows=4, batch_size=4)
        assert job["status"] == "succeeded", job
        results: list[httpx.Response] = []

        def call() -> None:
            with server.client(timeout=120) as own:
                results.append(own.post("/v2/models/slow/infer", json=row_body(4)))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        # While forward passes run (one thread, --infer-threads 1), the loop answers at once.
        latencies = []
        while any(t.is_alive() for t in threads):
            start = time.monotonic()
            assert client.get("/v2/health/live").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
        for thread in threads:
            thread.join()
    statuses = sorted(r.status_code for r in results)
    # one running and one waiting (--infer-queue 1) are admitted; the others are told to retry
    assert statuses.count(200) >= 2 and 503 in statuses, statuses
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "--infer-queue" in busy.json()["error"]
    assert len(latencies) >= 3 and max(latencies) < 0.5, latencies


# ---------------------------------------------------------------- 5. errors without server paths

@pytest.mark.slow
def test_a_failed_distributed_job_tells_the_tenant_no_server_paths(server: ServerProcess) -> None:
    """A rank that fails used to hand the tenant torchrun's log tail: hosts, pids, file paths."""
    graph, _ = export_module(Small(), torch.randn(4, 4))
    with server.client() as client:
        X = torch.randn(32, 4)
        refs = {"graph": upload(client, graph), "weights": upload(client, save({"lin.weight": torch.zeros(2, 4)}))}
        response = client.post("/v1/jobs", json={"model": {"export": refs},
                                                 "data": {"tensors": upload(client, save({"X": X, "y": (X[:, 0] > 0).long()}))},
                                                 "hyperparameters": {"epochs": 1, "workers": 2}})
        assert response.status_code == 201, response.text
        job = wait_for(client, response.json()["id"])
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).text
    assert job["status"] == "failed" and "lin.bias" in job["error"], job
    for text in (job["error"], events):
        assert str(server.data_dir) not in text and str(server.data_dir.resolve()) not in text
        assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", text), text[:500]
        assert "host" not in text and "Traceback" not in text and socket.gethostname() not in text


# ---------------------------------------------------------------- built-in models' inference memory

def test_inference_rows_are_bounded_by_what_each_row_makes_the_model_hold(server: ServerProcess) -> None:
    """A built-in MLP 65,536 wide (the widest a job may ask for) holds ~131k values per row: a
    request whose rows would make the forward pass hold more than MAX_TOTAL_ELEMENTS is a 400
    saying how many rows fit, before any of it runs; a request within the bound is served."""
    from aiaas_lab.engine.export_limits import MAX_TOTAL_ELEMENTS

    with server.client(timeout=120) as client:
        job = client.post("/v1/jobs", json={"model": {"builtin": "mlp", "config": {"hidden": [65536]}},
                                            "data": {"builtin": "digits"}, "name": "wide",
                                            "hyperparameters": {"epochs": 1, "batch_size": 256}}).json()
        assert wait_for(client, job["id"])["status"] == "succeeded"
        per_row = 64 + 65536 * 2 + 10  # input, Linear and ReLU outputs, the last Linear's
        fits = MAX_TOTAL_ELEMENTS // per_row

        def infer(rows: int) -> httpx.Response:
            raw = np.zeros((rows, 64), dtype="<f4").tobytes()
            header = orjson.dumps({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32",
                                               "parameters": {"binary_data_size": len(raw)}}],
                                   "outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
            return client.post("/v2/models/wide/infer", content=header + raw,
                               headers={"Inference-Header-Content-Length": str(len(header)),
                                        "Content-Type": "application/octet-stream"})

        refused = infer(fits + 1)
        assert refused.status_code == 400, refused.text
        assert f"expected at most {fits} rows" in refused.json()["error"] and "smaller requests" in refused.json()["error"]
        assert infer(16).status_code == 200
