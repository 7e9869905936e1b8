"""A server with a tokens file (two tenants), --allow-code and a 1 MB upload limit, as a real
process: tenants never see each other's blobs, jobs, events or models; models sent as code
(cloudpickle) train and serve only here; a worker that dies fails its job with the reason."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import httpx
import pytest
import torch
from server_fixtures import ServerProcess, start_server
from torch import nn

# The server cannot import this test module: its classes must travel by value, as a notebook's do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ALICE, ALICE_2, BOB = "alice-" + "a" * 20, "alice-second-" + "b" * 20, "bob-" + "c" * 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("tenants")
    tokens = root / "tokens.txt"
    tokens.write_text(f"# token tenant\n{ALICE} alice\n{ALICE_2} alice\n\n{BOB} bob\n")
    server = start_server(root / "data", token=None, tokens_file=tokens,
                          extra_args=["--allow-code", "--max-upload-mb", "1"])
    try:
        yield server
    finally:
        server.stop()


def wait_for(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def upload(client: httpx.Client, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    assert client.put(f"/v1/data/{sha}", content=data).status_code in (200, 201)
    return sha


class Gate(nn.Module):
    """A data-dependent branch: torch.export cannot capture it, cloudpickle can send it."""

    def __init__(self) -> None:
        super().__init__()
        self.small, self.large = nn.Linear(64, 10), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.abs().mean() < 100 else self.large(x)


class Crash(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            os._exit(7)  # the worker process dies mid-training
        return self.layer(x)


def test_tenants_see_only_their_own_things(server: ServerProcess) -> None:
    alice, alice_2, bob = server.client(ALICE), server.client(ALICE_2), server.client(BOB)
    with alice, alice_2, bob:
        body = {"model": {"builtin": "linear"}, "data": {"builtin": "digits"}, "name": "shared-name",
                "hyperparameters": {"epochs": 2}}
        jobs = {"alice": alice.post("/v1/jobs", json=body).json(), "bob": bob.post("/v1/jobs", json=body).json()}
        again = alice_2.post("/v1/jobs", json=body).json()  # alice's second token: the same tenant
        for client, job in ((alice, jobs["alice"]), (bob, jobs["bob"]), (alice, again)):
            assert wait_for(client, job["id"])["status"] == "succeeded"
        assert wait_for(alice, jobs["alice"]["id"])["model"] == {"name": "shared-name", "version": 1}
        assert wait_for(alice, again["id"])["model"] == {"name": "shared-name", "version": 2}
        assert wait_for(bob, jobs["bob"]["id"])["model"] == {"name": "shared-name", "version": 1}  # versions per tenant

        assert {j["id"] for j in alice_2.get("/v1/jobs").json()["data"]} == {jobs["alice"]["id"], again["id"]}
        assert [j["id"] for j in bob.get("/v1/jobs").json()["data"]] == [jobs["bob"]["id"]]
        for path in (f"/v1/jobs/{jobs['alice']['id']}", f"/v1/jobs/{jobs['alice']['id']}/events"):
            assert bob.get(path).status_code == 404
        assert bob.post(f"/v1/jobs/{jobs['alice']['id']}/cancel").status_code == 404
        assert [(m["name"], m["version"]) for m in bob.get("/v1/models").json()["data"]] == [("shared-name", 1)]
        assert bob.get("/v2/models/shared-name").json()["versions"] == ["1"]
        assert bob.get("/v2/models/shared-name/versions/2").status_code == 404
        assert bob.get("/v1/models/shared-name/weights", params={"version": 2}).status_code == 404
        assert alice.get("/v2/models/shared-name").json()["versions"] == ["1", "2"]

        sha = upload(alice, b"alice's data")
        assert alice_2.head(f"/v1/data/{sha}").status_code == 200
        assert bob.head(f"/v1/data/{sha}").status_code == 404
        refused = bob.post("/v1/jobs", json={**body, "data": {"tensors": sha}})
        assert refused.status_code == 400 and "has not been uploaded" in refused.json()["error"]


def test_uploads_over_the_limit_get_413(server: ServerProcess) -> None:
    with server.client(ALICE) as client:
        big = os.urandom(1024 * 1024 + 1)
        sha = hashlib.sha256(big).hexdigest()
        response = client.put(f"/v1/data/{sha}", content=big)
        assert response.status_code == 413 and "1 MB" in response.json()["error"]
        response = client.put(f"/v1/data/{sha}", content=iter([big[:600_000], big[600_000:]]))  # chunked
        assert response.status_code == 413
        assert client.head(f"/v1/data/{sha}").status_code == 404
        assert client.put(f"/v1/data/{hashlib.sha256(big[:1000]).hexdigest()}", content=big[:1000]).status_code == 201


def test_a_module_sent_as_code_trains_and_serves_with_allow_code(server: ServerProcess) -> None:
    with server.client(ALICE) as client:
        sha = upload(client, cloudpickle.dumps(Gate()))
        job = client.post("/v1/jobs", json={"model": {"pickle": sha}, "data": {"builtin": "digits"}, "name": "gate",
                                            "hyperparameters": {"epochs": 6, "normalize": True}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "succeeded" and job["metrics"]["accuracy"] > 0.8, job
        from aiaas_lab.engine.datasets import load_builtin_dataset

        X, y = load_builtin_dataset("digits")
        body = {"inputs": [{"name": "input", "shape": [40, 64], "datatype": "FP32", "data": X[:40].reshape(-1).tolist()}]}
        out = client.post("/v2/models/gate/infer", json=body).json()["outputs"][0]
        assert (torch.tensor(out["data"]).reshape(40, 10).argmax(1) == y[:40]).float().mean() > 0.8


def test_a_worker_that_dies_fails_its_job_with_the_reason(server: ServerProcess) -> None:
    with server.client(BOB) as client:
        sha = upload(client, cloudpickle.dumps(Crash()))
        job = client.post("/v1/jobs", json={"model": {"pickle": sha}, "data": {"builtin": "digits"}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "failed" and "exited unexpectedly (exit code 7)" in job["error"], job
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        assert events[0]["event"]["type"] == "run_started" and events[-1]["event"]["type"] == "run_ended"
        # Bad bytes sent as a pickle fail the job with the reason, not the worker with a traceback.
        job = client.post("/v1/jobs", json={"model": {"pickle": upload(client, b"not a pickle")},
                                            "data": {"builtin": "digits"}}).json()
        job = wait_for(client, job["id"])
        assert job["status"] == "failed" and "cloudpickle payload" in job["error"], job
