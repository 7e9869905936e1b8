"""`aiaas-lab serve` options as an operator types them, on a real server process: --insecure,
--host, and the refusal to serve without a token by accident."""

from __future__ import annotations

import subprocess
import sys

import httpx
import psutil
import pytest

from server_fixtures import start_server

pytestmark = pytest.mark.slow


def _listening(pid: int) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_serving_without_a_token_is_refused_unless_insecure(tmp_path):
    done = subprocess.run([sys.executable, "-m", "aiaas_lab", "serve", "--port", "0", "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("aiaas-lab serve: error: no token given") and "--insecure" in message, done.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything
    empty = subprocess.run([sys.executable, "-m", "aiaas_lab", "serve", "--port", "0", "--token", "",
                            "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60, check=False)
    assert empty.returncode == 2 and "--token: a token cannot be empty" in empty.stderr


def test_insecure_serves_without_a_token(tmp_path):
    server = start_server(tmp_path / "data", token=None, extra_args=["--insecure"])
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:  # no Authorization header at all
            assert client.get("/v1/jobs").status_code == 200
            assert client.get("/v2").status_code == 200
            assert client.get("/v1/jobs/job-nope").status_code == 404  # looked up, not refused (401)
            assert client.head("/v1/data/" + "0" * 64).status_code == 404
        assert "warning" not in server.log()  # on this machine only: nothing to warn about
    finally:
        server.stop()


def test_host_is_the_address_it_binds(tmp_path):
    server = start_server(tmp_path / "data", extra_args=["--host", "127.0.0.1"])
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert _listening(server.process.pid) == {("127.0.0.1", server.port)}
        assert httpx.get(server.url + "/v1/jobs", headers=server.headers(), timeout=10).status_code == 200
    finally:
        server.stop()
    # Another loopback address (still this machine only) shows the option is used, not the default,
    # and an --insecure server bound beyond 127.0.0.1 says so.
    server = start_server(tmp_path / "data2", token=None, extra_args=["--host", "127.0.0.2", "--insecure"])
    try:
        assert server.url.startswith("http://127.0.0.2:")
        assert _listening(server.process.pid) == {("127.0.0.2", server.port)}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{server.port}/v2/health/ready", timeout=5)
        assert "warning: --insecure on 127.0.0.2" in server.log()
    finally:
        server.stop()


def test_unknown_command_and_bad_options_are_one_message():
    done = subprocess.run([sys.executable, "-m", "aiaas_lab", "serv"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "aiaas-lab: unknown command 'serv'; expected demo or serve"
    bad = subprocess.run([sys.executable, "-m", "aiaas_lab", "serve", "--insecure", "--max-jobs", "0"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "aiaas-lab serve: error: --max-jobs: expected a whole number >= 1, but found 0"
