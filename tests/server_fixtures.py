"""The real `aiaas-lab serve` process for tests, on 127.0.0.1 with a free port and a temp data dir.

    from server_fixtures import aiaas_server, start_server   # in any test module under tests/

`aiaas_server` (module-scoped fixture) is a running server with one random token; `start_server`
starts more (other options, a tokens file, the same data dir after a kill). Both give a
`ServerProcess`: `.url`, `.token`, `.headers()`, `.client()`, `.kill()` (SIGKILL), `.stop()`,
`.restart()` and `.log()` (the server's stderr so far).
"""

from __future__ import annotations

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

import httpx
import pytest

__all__ = ["ServerProcess", "start_server", "aiaas_server"]


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
