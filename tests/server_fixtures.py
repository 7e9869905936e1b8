"""The real `aiaas-lab serve` process for tests, on 127.0.0.1 with a free port and a temp data dir.

    from server_fixtures import aiaas_server, start_server   # in any test module under tests/

`aiaas_server` (module-scoped fixture) is a running server with one random token; `start_server`
starts more (other options, a tokens file, the same data dir after a kill). Both give a
`ServerProcess`: `.url`, `.token`, `.headers()`, `.client()`, `.kill()` (SIGKILL), `.stop()`,
`.restart()` and `.log()` (the server's stderr so far). Below them, the helpers every server test
module uses (upload, wait_for, all_events, sse_frames, infer_json, alive, wait_gone), so no
test module imports another.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

__all__ = ["ServerProcess", "start_server", "aiaas_server", "upload", "wait_for", "all_events", "sse_frames",
           "infer_json", "alive", "wait_gone"]


@dataclass
class ServerProcess:
    url: str
    token: str | None
    data_dir: Path
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def headers(self, token: str | None = None) -> dict[str, str]:
        token = token or self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(token), timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The server's child processes (training workers), from /proc."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(entry.name))
        return pids

    def kill(self) -> None:
        """SIGKILL, the way a crash or the OOM killer ends a server."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> ServerProcess:
        """A new server process on the same data dir and options (after kill() or stop())."""
        self.stop()
        return _launch(self.args, self.token, self.data_dir, self.log_path)


def start_server(data_dir: str | os.PathLike[str], *, token: str | None = "generate",
                 tokens_file: str | os.PathLike[str] | None = None, extra_args: Sequence[str] = (),
                 timeout: float = 90) -> ServerProcess:
    """Start `python -m aiaas_lab serve --port 0` and wait until it answers /v2/health/ready.

    `token="generate"` makes a random one; None starts without --token (give a tokens file, or
    `--insecure` in extra_args)."""
    data_dir = Path(data_dir)
    if token == "generate":
        token = "test-" + secrets.token_hex(12)
    args = ["--data-dir", str(data_dir)]
    if token:
        args += ["--token", token]
    if tokens_file is not None:
        args += ["--tokens-file", str(tokens_file)]
    args += list(extra_args)
    return _launch(args, token, data_dir, data_dir.parent / f"{data_dir.name}-server.log")


def _launch(args: list[str], token: str | None, data_dir: Path, log_path: Path | None,
            timeout: float = 90) -> ServerProcess:
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "aiaas_lab", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if log_path:
        log.close()  # type: ignore[union-attr]
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            text = log_path.read_text(errors="replace") if log_path else ""
            raise RuntimeError(f"aiaas-lab serve did not start: {line.decode(errors='replace')}{text}")
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line += os.read(process.stdout.fileno(), 4096)
    url = line.decode().split("listening on ", 1)[1].split()[0]
    server = ServerProcess(url=url, token=token, data_dir=data_dir, process=process, args=args, log_path=log_path)
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"aiaas-lab serve never became ready:\n{server.log()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def aiaas_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A running `aiaas-lab serve` with one random token, shared by the tests of one module."""
    server = start_server(tmp_path_factory.mktemp("aiaas-server") / "data")
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- helpers the server tests share

def upload(client: httpx.Client, blob: bytes) -> str:
    """PUT `blob` to /v1/data; returns its sha256."""
    sha = hashlib.sha256(blob).hexdigest()
    response = client.put(f"/v1/data/{sha}", content=blob)
    assert response.status_code in (200, 201), response.text
    return sha


def sse_frames(client: httpx.Client, job_id: str, headers: dict[str, str] | None = None,
               limit: int | None = None, timeout: float = 120, after: int | None = None) -> Iterator[dict[str, Any]]:
    """Parse the job's event stream into {"id", "event", "data"} frames."""
    params = {} if after is None else {"after": after}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout, params=params,
                       headers={"Accept": "text/event-stream", **(headers or {})}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, Any] = {}
        count = 0
        for line in response.iter_lines():
            if line == "":
                if frame:
                    yield frame
                    count += 1
                    if limit is not None and count >= limit:
                        return
                frame = {}
            elif line.startswith(":"):
                continue
            else:
                key, _, value = line.partition(": ")
                frame[key] = int(value) if key == "id" else (json.loads(value) if key == "data" else value)


def wait_for(client: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job so far, page after page."""
    out: list[dict[str, Any]] = []
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": len(out), "limit": 1000}).json()
        out += page["data"]
        if not page["has_more"]:
            return out


def infer_json(client: httpx.Client, name: str, X: Any, path: str = "") -> httpx.Response:
    """POST the tensor `X` to the model's V2 infer endpoint as JSON."""
    body = {"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
    return client.post(f"/v2/models/{name}{path}/infer", json=body)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (a zombie is not)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Poll until none of `procs` runs or `seconds` pass; returns those left."""
    deadline = time.monotonic() + seconds
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
