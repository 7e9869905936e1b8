"""A real MLServer serving aiaas-lab models, for tests/test_mlserver_compat.py and bench/serve.py.

MLServer 1.7 pins Starlette < 0.47 (through FastAPI), older than the aiaas-lab server needs, so it
never goes into the project's environment: it gets its own virtual environment under the
project's (`.venv/mlserver-env`, ignored by git and removed by `make clean`), created on first
use (about a minute). That environment also sees the project's packages, after its own, so
MLServer runs the very same torch and model code as the aiaas-lab server.

Pitfall handled here: MLServer's default worker pool crashes with uvloop 0.23 ("There is no
current event loop"), so `parallel_workers` is 0 (inference in the server process).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import httpx

MLSERVER_SPEC = "mlserver==1.7.1"
ENV_DIR = Path(sys.prefix) / "mlserver-env"

# The runtime MLServer loads from the model folder: an aiaas-lab weights file (safetensors with
# "aiaas.model" metadata, as GET /v1/models/{name}/weights returns it) rebuilt with the same
# build_model, with the normalizer applied before the forward pass, as the aiaas-lab server does.
RUNTIME = '''
import json

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from safetensors import safe_open
from safetensors.torch import load_file

from aiaas_lab.engine.models import build_model


class AiaasModel(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        path = self.settings.parameters.uri
        with safe_open(path, framework="pt") as f:
            info = json.loads(f.metadata()["aiaas.model"])
        self._net = build_model(info["spec"])
        self._net.load_state_dict(load_file(path))
        self._net.eval()
        norm = info.get("normalizer")
        self._norm = (torch.tensor(norm["mean"]), torch.tensor(norm["std"])) if norm else None
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(np.asarray(NumpyCodec.decode_input(payload.inputs[0]), dtype=np.float32))
        if self._norm is not None:
            x = (x - self._norm[0]) / self._norm[1]
        with torch.no_grad():
            out = self._net(x).numpy()
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output("output", out)])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlserver_executable() -> Path:
    """The `mlserver` command of the dedicated environment, creating it on first use."""
    ready = ENV_DIR / ".aiaas-ready"
    exe = ENV_DIR / "bin" / "mlserver"
    if ready.exists() and exe.exists():
        return exe
    venv.EnvBuilder(with_pip=True, clear=True).create(ENV_DIR)
    subprocess.run([str(ENV_DIR / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    MLSERVER_SPEC], check=True)
    # Added after the install, so pip never saw (and never changed) the project's packages.
    site_packages = subprocess.run([str(ENV_DIR / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    project = sysconfig.get_paths()["purelib"]
    Path(site_packages, "zz_aiaas_lab_project.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    ready.write_text(MLSERVER_SPEC + "\n")
    return exe


def write_repository(root: Path, models: dict[str, bytes], *, port: int, declare_io: bool = True) -> Path:
    """An MLServer model repository serving each weights blob under its name."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_endpoint": None,
                "parallel_workers": 0, "debug": False}
    (root / "settings.json").write_text(json.dumps(settings))
    for name, weights in models.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "weights.safetensors").write_bytes(weights)
        (folder / "aiaas_runtime.py").write_text(RUNTIME)
        model: dict[str, object] = {"name": name, "implementation": "aiaas_runtime.AiaasModel",
                                    "parameters": {"uri": str(folder / "weights.safetensors"), "version": "1"}}
        if declare_io:
            info = _weights_info(weights)
            features = math.prod(int(d) for d in info["input_shape"])  # type: ignore[union-attr]
            model["inputs"] = [{"name": "input", "datatype": "FP32", "shape": [-1, features]}]
            model["outputs"] = [{"name": "output", "datatype": "FP32", "shape": [-1, int(info["output_size"])]}]
        (folder / "model-settings.json").write_text(json.dumps(model))
    return root


def _weights_info(blob: bytes) -> dict[str, object]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(json.loads(blob[8:8 + size])["__metadata__"]["aiaas.model"])


def start_mlserver(root: Path, port: int, names: list[str], *, cpu: str | None = None,
                   timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """Start MLServer on `root` (pinned to CPU list `cpu` with taskset) and wait until every model
    in `names` is ready."""
    command = [str(mlserver_executable()), "start", str(root)]
    if cpu is not None:
        command = ["taskset", "-c", cpu, *command]
    log = open(root / "mlserver.log", "wb")  # noqa: SIM115 - kept open for the process's lifetime
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"MLServer exited with {process.returncode}:\n{(root / 'mlserver.log').read_text()[-3000:]}")
        try:
            if all(httpx.get(f"{url}/v2/models/{n}/ready", timeout=2).status_code == 200 for n in names):
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"MLServer not ready in {timeout} s:\n{(root / 'mlserver.log').read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
