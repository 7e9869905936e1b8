"""Restart survival: SIGKILL the server in the middle of a job and start it again on the same
data dir. The job resumes from its checkpoint, nothing acknowledged is lost, and no job stays
running forever (one interrupted too often, or cancelled while the server was down, ends)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save
from server_fixtures import start_server

from aiaas_lab.server import ServerConfig, create_app
from aiaas_lab.server._executor import MAX_LAUNCHES


def _events(client: httpx.Client, job_id: str) -> list[dict]:  # type: ignore[type-arg]
    out: list[dict] = []  # type: ignore[type-arg]
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": len(out), "limit": 1000}).json()
        out += page["data"]
        if not page["has_more"]:
            return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_sigkill_mid_job_then_restart_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 32, generator=g)
    data = save({"X": X, "y": (X[:, :4].sum(1) > 0).long()})
    sha = hashlib.sha256(data).hexdigest()
    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "1"])
    try:
        with server.client() as client:
            assert client.put(f"/v1/data/{sha}", content=data).status_code == 201
            job = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"tensors": sha}, "val": 0.2,
                                                "name": "survivor", "hyperparameters": {"epochs": 20, "batch_size": 32}}).json()
            queued = client.post("/v1/jobs", json={"model": {"builtin": "linear"}, "data": {"builtin": "digits"}}).json()
            deadline = time.monotonic() + 120
            while True:  # until the second epoch's checkpoint is stored
                events = _events(client, job["id"])
                if any(e["event"]["type"] == "checkpoint" and e["event"]["epoch"] >= 2 for e in events):
                    break
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            workers = server.worker_pids()
            assert workers
        server.kill()
        acknowledged = events  # everything the server had answered before it died
        time.sleep(1)
        assert not [pid for pid in workers if _alive(pid)], "training workers outlived the killed server"

        server = server.restart()
        with server.client() as client:
            assert client.head(f"/v1/data/{sha}").status_code == 200
            deadline = time.monotonic() + 180
            while (final := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            assert final["status"] == "succeeded", final
            history = _events(client, job["id"])
            assert history[:len(acknowledged)] == acknowledged
            assert [e["id"] for e in history] == list(range(1, len(history) + 1))
            starts = [e["event"] for e in history if e["event"]["type"] == "run_started"]
            assert len(starts) == 2 and starts[0]["start_epoch"] == 0 and starts[1]["start_epoch"] >= 2
            ended = history[-1]["event"]
            assert ended["type"] == "run_ended" and ended["status"] == "completed" and ended["epochs_completed"] == 20
            epochs = [e["event"]["epoch"] for e in history if e["event"]["type"] == "epoch_end"]
            assert epochs[-1] == 20
            # Only what the server never acknowledged can be missing: an epoch whose events were
            # still in the pipe when it died, while its checkpoint was already on disk.
            acked = max([e["event"]["epoch"] for e in acknowledged if e["event"]["type"] == "epoch_end"])
            assert set(range(1, 21)) - set(epochs) <= set(range(acked + 1, starts[1]["start_epoch"] + 1))
            assert final["model"] == {"name": "survivor", "version": 1} and final["metrics"]["val_accuracy"] > 0.7

            while (second := client.get(f"/v1/jobs/{queued['id']}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            assert second["status"] == "succeeded"
            assert {m["name"] for m in client.get("/v1/models").json()["data"]} == {"survivor", queued["id"]}
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_sigkill_mid_two_worker_job_leaves_no_process_then_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    import psutil

    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "1"])
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                                                "name": "ddp-survivor",
                                                "hyperparameters": {"epochs": 12, "batch_size": 16, "workers": 2,
                                                                    "seed": 3}}).json()
            deadline = time.monotonic() + 180
            while True:  # until rank 0 reported the second epoch's checkpoint
                events = _events(client, job["id"])
                if any(e["event"]["type"] == "checkpoint" and e["event"]["epoch"] >= 2 for e in events):
                    break
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
        started = psutil.Process(server.process.pid).children(recursive=True)
        assert len(started) >= 4, [p.cmdline() for p in started]  # runner, torchrun, 2 ranks (+ spare)
        server.kill()
        acknowledged = events
        deadline = time.monotonic() + 20
        while (left := [p for p in started if _alive(p.pid) and p.is_running()]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, [(p.pid, p.cmdline()) for p in left]

        server = server.restart()
        with server.client() as client:
            deadline = time.monotonic() + 240
            while (final := client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            assert final["status"] == "succeeded", (final, server.log()[-3000:])
            history = _events(client, job["id"])
            assert history[:len(acknowledged)] == acknowledged
            assert [e["id"] for e in history] == list(range(1, len(history) + 1))
            starts = [e["event"] for e in history if e["event"]["type"] == "run_started"]
            assert len(starts) == 2 and starts[0]["start_epoch"] == 0 and starts[1]["start_epoch"] >= 2, starts
            ended = history[-1]["event"]
            assert ended["status"] == "completed" and ended["epochs_completed"] == 12
            assert final["model"] == {"name": "ddp-survivor", "version": 1}
    finally:
        server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_jobs_left_running_by_a_dead_server_end_when_they_cannot_resume(tmp_path: Path) -> None:
    token = {"secret-token": "t"}
    body = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}}

    async def run(max_jobs: int, work):  # type: ignore[no-untyped-def]
        app = create_app(ServerConfig(data_dir=tmp_path, tokens=token, max_jobs=max_jobs, threads_per_job=1))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         headers={"Authorization": "Bearer secret-token"}) as client:
                return await work(client)

    async def submit(client: httpx.AsyncClient) -> list[str]:
        return [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(2)]

    interrupted, cancelled = await run(0, submit)
    # What a server killed mid-run leaves behind: running jobs, one interrupted too often
    # already, one whose cancel was recorded but never reached its worker.
    with sqlite3.connect(tmp_path / "aiaas.sqlite3") as db:
        db.execute("UPDATE jobs SET status = 'running', attempts = ? WHERE id = ?", (MAX_LAUNCHES, interrupted))
        db.execute("UPDATE jobs SET status = 'running', attempts = 1, cancel_requested = 1 WHERE id = ?", (cancelled,))

    async def settle(client: httpx.AsyncClient) -> list[dict]:  # type: ignore[type-arg]
        import anyio

        with anyio.fail_after(30):
            while True:
                jobs = [(await client.get(f"/v1/jobs/{i}")).json() for i in (interrupted, cancelled)]
                if all(j["status"] != "running" for j in jobs):
                    events = [(await client.get(f"/v1/jobs/{i}/events")).json()["data"] for i in (interrupted, cancelled)]
                    return jobs + events
                await anyio.sleep(0.05)

    first, second, first_events, second_events = await run(1, settle)
    assert first["status"] == "failed" and f"stopped {MAX_LAUNCHES} times" in first["error"]
    assert second["status"] == "cancelled"
    assert [e["event"]["type"] for e in first_events] == ["run_ended"]
    assert second_events[-1]["event"]["status"] == "stopped"
