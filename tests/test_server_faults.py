"""Faults that must not stop the service, against a real `aiaas-lab serve` on 127.0.0.1: the
server stopped mid-job leaves no process behind, a cancel the job ignores ends in a kill, the
warm spare is refilled once, a job over its memory limit fails alone with a reason that says
memory, a store that refuses writes pauses the jobs and answers 503 until it is back, and a
failed job's error is one line without the server's paths.

Processes are found from the server's pid (psutil), never by scanning the machine."""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import subprocess
import time
from pathlib import Path

import cloudpickle
import httpx
import psutil
import pytest
from server_fixtures import (
    ServerProcess,
    alive,
    all_events,
    start_server,
    upload,
    wait_for,
    wait_gone,
)

from aiaas_lab.server._executor import CANCEL_GRACE_S

LONG_DDP = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
            "hyperparameters": {"epochs": 500, "batch_size": 16, "workers": 2}}
QUICK = {"model": {"builtin": "linear"}, "data": {"builtin": "digits"}, "hyperparameters": {"epochs": 1}}


def _runners(server: ServerProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children()
            if "aiaas_lab.server._runner" in " ".join(p.cmdline())]


def _wait_status(client: httpx.Client, job_id: str, status: str, seconds: float, log: ServerProcess) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + seconds
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] != status:
        assert time.monotonic() < deadline, (job, log.log()[-3000:])
        time.sleep(0.1)
    return job


def _wait_events(client: httpx.Client, job_id: str, kind: str, seconds: float, log: ServerProcess) -> None:
    deadline = time.monotonic() + seconds
    while not any(e["event"]["type"] == kind for e in all_events(client, job_id)):
        assert time.monotonic() < deadline, log.log()[-3000:]
        time.sleep(0.1)


def _steady_count(server: ServerProcess, expected: int, seconds: float = 30) -> None:
    """The runner count reaches `expected`, exactly one of them idle, and that one is the spare
    the server last logged starting (it prints a line per spare start). A second refill is a
    second idle runner: here, or at the next check, never a fixed wait."""
    jobs_dir = str(server.data_dir / "jobs")
    deadline = time.monotonic() + seconds
    while True:
        runners = alive(_runners(server))
        idle = [p for p in runners if not _cwd(p).startswith(jobs_dir)]  # a runner with a job is in its dir
        started = [int(pid) for pid in re.findall(r"spare runner started \(pid (\d+)\)", server.log())]
        if len(runners) == expected and len(idle) == 1 and started and idle[0].pid == started[-1]:
            return
        assert time.monotonic() < deadline, ([p.cmdline() for p in runners], started)
        time.sleep(0.1)


def _cwd(process: psutil.Process) -> str:
    try:
        return process.cwd()
    except psutil.Error:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_server_mid_ddp_job_leaves_no_process(tmp_path: Path, signum: int) -> None:
    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "1"])
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json=LONG_DDP).json()
            _wait_events(client, job["id"], "step", 120, server)
        started = psutil.Process(server.process.pid).children(recursive=True)
        assert len(started) >= 4, [p.cmdline() for p in started]  # runner, torchrun, 2 ranks (+ the spare)
        server.process.send_signal(signum)
        server.process.wait(15)
        left = wait_gone(started, 10)
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        server.stop()
    assert "Traceback" not in server.log()
    # torchrun was stopped by the runner's SIGTERM, not left to PDEATHSIG's SIGKILL
    log = (server.data_dir / "jobs" / job["id"] / "worker.log").read_text(errors="replace")
    assert re.search(r"Received (15|SIGTERM) death signal", log) and "rank 0: stopped after" in log, log[-2000:]


def _hanging_module() -> bytes:
    import torch
    from torch import nn

    class Hangs(nn.Module):  # defined here: cloudpickle sends the class by value
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import time

            if self.training:
                time.sleep(3600)  # never reaches the next step, so never sees the stop flag
            return self.linear(x)

    return cloudpickle.dumps(Hangs())


def _crashing_module() -> bytes:
    from torch import nn

    class Crashes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):  # type: ignore[no-untyped-def]
            import os
            import signal

            if self.training:
                print(f"crash-marker in {os.getcwd()}", flush=True)  # a server path, in the job's log
                os.kill(os.getpid(), signal.SIGKILL)
            return self.linear(x)

    return cloudpickle.dumps(Crashes())


@pytest.mark.slow
def test_cancel_kills_a_job_that_ignores_it_and_the_spare_is_refilled_once(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "2", "--allow-code"])
    try:
        with server.client() as client:
            _steady_count(server, 1)  # the warm spare
            # Two launches back to back: each takes a runner, and only one spare comes back.
            jobs = [client.post("/v1/jobs", json=QUICK).json() for _ in range(2)]
            assert all(wait_for(client, j["id"])["status"] == "succeeded" for j in jobs)
            _steady_count(server, 1)

            sha = upload(client, _hanging_module())
            job = client.post("/v1/jobs", json={"model": {"pickle": sha}, "data": {"builtin": "digits"}}).json()
            _wait_status(client, job["id"], "running", 60, server)
            _steady_count(server, 2)  # the hanging job's runner and the refilled spare
            hung = [p for p in _runners(server)]
            t0 = time.monotonic()
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
            final = _wait_status(client, job["id"], "cancelled", CANCEL_GRACE_S + 20, server)
            assert CANCEL_GRACE_S - 1 <= time.monotonic() - t0 < CANCEL_GRACE_S + 20
            assert final["error"] is None
            assert all_events(client, job["id"])[-1]["event"]["status"] == "stopped"
            _steady_count(server, 1)
            assert len(alive(hung)) == 1  # the killed runner is gone, the spare is the one left

            # The server goes on: the next job runs (on the spare) and a new spare replaces it.
            assert wait_for(client, client.post("/v1/jobs", json=QUICK).json()["id"])["status"] == "succeeded"
            _steady_count(server, 1)
            assert "ignored its cancel" in server.log()

            # A runner that dies: the tenant reads one line, without the server's paths or its log.
            sha = upload(client, _crashing_module())
            crashed = wait_for(client, client.post("/v1/jobs", json={"model": {"pickle": sha},
                                                                    "data": {"builtin": "digits"}}).json()["id"])
            assert crashed["status"] == "failed"
            error = crashed["error"]
            assert "killed by SIGKILL" in error and "\n" not in error, error
            assert str(tmp_path) not in error and "crash-marker" not in error, error
            ended = all_events(client, crashed["id"])[-1]["event"]
            assert ended["error"] == error
            assert "crash-marker" in server.log()  # the operator still sees what the job printed
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_job_over_its_memory_limit_fails_alone_with_a_memory_reason(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "1", "--job-memory-mb", "1024"])
    try:
        with server.client() as client:
            # ~400 M float weights (1.6 GB), within what the server accepts, past the 1 GB limit.
            big = {"model": {"builtin": "mlp", "config": {"hidden": [65536, 3000, 65536]}},
                   "data": {"builtin": "digits"}}
            created = client.post("/v1/jobs", json=big)
            assert created.status_code == 201, created.text
            job = wait_for(client, created.json()["id"])
            assert job["status"] == "failed", job
            assert "out of memory" in job["error"] and "1024 MB" in job["error"] and "\n" not in job["error"], job
            assert "allocat" in job["error"].split("--job-memory-mb", 1)[1].lower(), job  # the original reason too
            assert client.get("/v2/health/ready").status_code == 200
            assert wait_for(client, client.post("/v1/jobs", json=QUICK).json()["id"])["status"] == "succeeded"
    finally:
        server.stop()


def test_job_memory_mb_is_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "aiaas_lab", "serve", "--insecure", "--data-dir", str(tmp_path),
                          "--job-memory-mb", "100"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--job-memory-mb" in out.stderr and "1024" in out.stderr and "100" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_store_that_refuses_writes_pauses_jobs_and_answers_503_until_it_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = tmp_path / "store-fault"
    monkeypatch.setenv("AIAAS_LAB_FAULT_STORE", str(fault))  # the server's writes fail while it exists
    server = start_server(tmp_path / "data", extra_args=["--max-jobs", "1"])
    try:
        with server.client() as client:
            long = {"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                    "hyperparameters": {"epochs": 400, "batch_size": 16, "log_every": 1}}
            job = client.post("/v1/jobs", json=long).json()
            _wait_events(client, job["id"], "step", 60, server)
            runner = next(p for p in _runners(server) if _cwd(p).endswith(job["id"]))  # the job's process
            fault.touch()
            deadline = time.monotonic() + 20
            while (ready := client.get("/v2/health/ready")).status_code == 200:
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.1)
            assert ready.status_code == 503 and ready.json()["ready"] is False
            refused = client.post("/v1/jobs", json=QUICK)
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit(), refused.text
            assert "storage" in refused.json()["error"]
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 503
            paused = client.get(f"/v1/jobs/{job['id']}").json()
            assert paused["status"] == "running"  # reads still work; the job waits, it is not lost
            assert alive([runner]) and _cwd(runner).endswith(job["id"])  # the same process, waiting
            before = len(all_events(client, job["id"]))

            fault.unlink()
            deadline = time.monotonic() + 20
            while client.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.1)
            deadline = time.monotonic() + 30
            while len(all_events(client, job["id"])) <= before:  # the same job goes on where it waited
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.1)
            assert alive([runner])
            second = client.post("/v1/jobs", json=QUICK)
            assert second.status_code == 201, second.text
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
            assert wait_for(client, job["id"], 60)["status"] == "cancelled"
            assert wait_for(client, second.json()["id"], 120)["status"] == "succeeded"  # scheduling resumed
            events = [e["event"] for e in all_events(client, job["id"])]
            # No step lost or repeated across the outage (log_every 1: each step reports), one run
            steps = [e["step"] for e in events if e["type"] == "step"]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1, steps
            assert [e["type"] for e in events].count("run_started") == 1
            assert events[-1]["type"] == "run_ended"
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_ready_recovers_when_the_store_is_back_with_no_job_running(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a waiting job's executor used to probe the store: with none, ready stayed 503."""
    fault = tmp_path / "store-fault"
    monkeypatch.setenv("AIAAS_LAB_FAULT_STORE", str(fault))
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            fault.touch()
            refused = client.post("/v1/jobs", json=QUICK)
            assert refused.status_code == 503 and "storage" in refused.json()["error"], refused.text
            assert client.get("/v2/health/ready").status_code == 503
            # an upload the disk refuses (full, read-only) is a 503 to retry too, never a 500
            blob = b"bytes for a disk that is full"
            upload = client.put(f"/v1/data/{hashlib.sha256(blob).hexdigest()}", content=blob)
            assert upload.status_code == 503 and upload.headers["Retry-After"].isdigit(), upload.text
            assert "No space left on device" in upload.json()["error"] and str(tmp_path) not in upload.text
            fault.unlink()
            deadline = time.monotonic() + 10
            while (ready := client.get("/v2/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, (ready.text, server.log()[-2000:])
                time.sleep(0.1)
            assert ready.json()["ready"] is True
            assert client.post("/v1/jobs", json=QUICK).status_code == 201
            assert client.put(f"/v1/data/{hashlib.sha256(blob).hexdigest()}", content=blob).status_code == 201
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def _misleading_module() -> bytes:
    from torch import nn

    class PrintsMemoryError(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):  # type: ignore[no-untyped-def]
            import sys

            print("MemoryError: a line the model printed, not what failed", file=sys.stderr, flush=True)
            raise ValueError("the model refused its input, see /opt/secret-dir/inputs/rows.txt")

    return cloudpickle.dumps(PrintsMemoryError())


def test_a_failure_is_reported_from_its_own_error_without_absolute_paths(tmp_path: Path) -> None:
    """The log's tail used to decide: any job whose log said MemoryError was "out of memory",
    and only the server's known paths were taken out of the tenant's text."""
    server = start_server(tmp_path / "data", extra_args=["--allow-code"])
    try:
        with server.client() as client:
            sha = upload(client, _misleading_module())
            job = wait_for(client, client.post("/v1/jobs", json={"model": {"pickle": sha},
                                                                "data": {"builtin": "digits"}}).json()["id"])
    finally:
        server.stop()
    error = job["error"]
    assert job["status"] == "failed" and "refused its input" in error, job
    assert "out of memory" not in error and "/opt/secret-dir" not in error and "<path>/rows.txt" in error, error
    assert "MemoryError: a line the model printed" in server.log()  # the operator still sees it


def _hanging_forward_module(marker: Path) -> bytes:
    from torch import nn

    class HangsInInference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)
            self.marker = str(marker)

        def forward(self, x):  # type: ignore[no-untyped-def]
            import pathlib
            import time

            if float(x[0, 0]) == 12345.0:  # the test's inference request, never training data
                pathlib.Path(self.marker).touch()
                time.sleep(600)  # a forward pass that never ends
            return self.linear(x)

    return cloudpickle.dumps(HangsInInference())


def test_ctrl_c_ends_the_server_while_a_forward_pass_hangs(tmp_path: Path) -> None:
    """Inference threads used to be ThreadPoolExecutor's, which the interpreter joins at exit."""
    import threading

    marker = tmp_path / "forward-started"
    server = start_server(tmp_path / "data", extra_args=["--allow-code"])
    try:
        with server.client() as client:
            sha = upload(client, _hanging_forward_module(marker))
            job = wait_for(client, client.post("/v1/jobs", json={"model": {"pickle": sha}, "name": "hangs",
                                                                "data": {"builtin": "digits"}}).json()["id"])
            assert job["status"] == "succeeded", job

        def infer() -> None:
            with server.client(timeout=120) as own, contextlib.suppress(httpx.TransportError):
                own.post("/v2/models/hangs/infer", json={"inputs": [{"name": "input", "shape": [1, 64],
                                                                     "datatype": "FP32", "data": [12345.0] * 64}]})

        threading.Thread(target=infer, daemon=True).start()
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()[-2000:]
            time.sleep(0.05)
        server.process.send_signal(signal.SIGINT)
        try:
            code = server.process.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        assert code is not None, "the server did not exit within 30 s of Ctrl-C"
    finally:
        server.stop()
