"""JupyterLab / Notebook 7 on 127.0.0.1 with private config dirs, and Debian's Chromium driven by
Playwright. Adapted from the shared recipe, which solved the pitfalls noted below."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)


def _require_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium; never `playwright install`)"
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI a missing browser is a failure, never a skip
    pytest.skip(message)


class Server:
    def __init__(self, url: str, token: str, root: Path, app: str) -> None:
        self.url, self.token, self.root, self.app = url, token, root, app

    def notebook_url(self, name: str) -> str:
        path = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}/{path}/{name}?token={self.token}"


def _start(app: str, base: Path) -> Iterator[Server]:
    env = dict(os.environ)
    # Private dirs keep Chromium, npm and IPython from writing to the real HOME.
    for var, d in [("JUPYTER_CONFIG_DIR", "cfg"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "run"),
                   ("IPYTHONDIR", "ipy"), ("JUPYTERLAB_SETTINGS_DIR", "set"),
                   ("JUPYTERLAB_WORKSPACES_DIR", "ws"), ("HOME", "home")]:
        (base / d).mkdir()
        env[var] = str(base / d)
    # The news pop-up covers the page; only this settings file stops it.
    settings = base / "set/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    token, url = secrets.token_hex(16), f"http://127.0.0.1:{port}"
    log = base / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", app, "--no-browser", f"--port={port}", "--port-retries=0",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
         f"--ServerApp.root_dir={base}", "--expose-app-in-browser", "--LabApp.news_url=None",
         "--LabApp.extension_manager=readonly", "--LanguageServerManager.autodetect=False"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    auth = {"Authorization": f"token {token}"}
    try:
        for _ in range(480):
            assert proc.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(urllib.request.Request(url + "/api/status", headers=auth), timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail(f"jupyter {app} did not start:\n{log.read_text()[-3000:]}")
        yield Server(url, token, base, app)
    finally:
        try:  # a graceful shutdown stops the kernels too
            urllib.request.urlopen(urllib.request.Request(url + "/api/shutdown", method="POST", headers=auth), timeout=5)
            proc.wait(20)
        except Exception:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _require_chromium()
    yield from _start("lab", tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _require_chromium()
    yield from _start("notebook", tmp_path_factory.mktemp("nb7"))


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (gitignored), to look at after a run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A Chromium page; `page.errors` collects uncaught page errors."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "c"), "XDG_CACHE_HOME": str(home / "k")},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"], viewport={"width": 1280, "height": 1000})
        try:
            pg = ctx.pages[0]
            pg.errors = []
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            yield pg
        finally:
            ctx.close()
