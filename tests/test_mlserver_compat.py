"""Our V2 client against a real MLServer (its own process and virtual environment, see
mlserver_env.py) serving a tiny digits model: `predict(..., backend=URL)` must give what the same
model gives locally, in the JSON protocol MLServer speaks."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import save

import aiaas_lab
from aiaas_lab import AiaasError, BadArgument
from aiaas_lab._api import preprocessing_of
from aiaas_lab.engine.checkpoint import state_dict_to_safetensors
from aiaas_lab.client.client import AsyncClient, Client
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.engine.models import build_model, model_spec

from mlserver_env import free_port, start_mlserver, stop, write_repository

pytestmark = pytest.mark.slow


def _weights(net: torch.nn.Module, spec: dict, normalizer) -> bytes:
    """The model as the aiaas-lab server's weights endpoint returns it."""
    info = {"task": "classification", "classes": None, "input_shape": spec["config"]["input_shape"],
            "output_size": spec["config"]["output_size"], "spec": spec,
            "normalizer": {"mean": normalizer.mean.tolist(), "std": normalizer.std.tolist()}}
    return save(state_dict_to_safetensors(net.state_dict()), metadata={"aiaas.model": json.dumps(info)})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    X, y = load_builtin_dataset("digits")
    spec = model_spec("mlp", (64,), 10)
    spec["config"]["hidden"] = [16]
    torch.manual_seed(0)
    net = build_model(spec)
    aiaas_lab.train(net, (X, y), epochs=3, normalize=True, seed=0, progress=False)
    weights = _weights(net, spec, preprocessing_of(net).normalizer)
    root = tmp_path_factory.mktemp("mlserver")
    port = free_port()
    # "tiny" declares its inputs and outputs in its metadata; "bare" declares nothing, as many
    # V2 deployments do, so the client must fall back on the protocol's defaults.
    write_repository(root / "repo", {"tiny": weights}, port=port)
    write_repository(root / "repo", {"bare": weights}, port=port, declare_io=False)
    process = start_mlserver(root / "repo", port, ["tiny", "bare"])
    try:
        yield f"http://127.0.0.1:{port}", net, X
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


def test_server_info_says_mlserver_without_binary_extension(served) -> None:
    url, _, _ = served
    with Client(url, token=None) as client:
        info = client.server_info()
        assert info["name"] == "mlserver"
        assert "binary_tensor_data" not in info.get("extensions", [])
        assert client.ready() is True


@pytest.mark.parametrize("name", ["tiny", "bare"])
def test_predict_on_mlserver_matches_local(served, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url, net, X = served
    monkeypatch.delenv("AIAAS_TOKEN", raising=False)
    rows = X[:300]
    remote = aiaas_lab.predict(name, rows, backend=url, batch_size=128)  # three requests
    local = aiaas_lab.predict(net, rows)
    assert remote.shape == (300, 10) and remote.dtype == torch.float32
    torch.testing.assert_close(remote, local, atol=1e-4, rtol=1e-4)
    labels = aiaas_lab.predict(name, rows, backend=url, classes=True)
    assert torch.equal(labels, local.argmax(dim=1))


def test_async_client_infers_on_mlserver(served) -> None:
    url, net, X = served

    async def run() -> torch.Tensor:
        async with AsyncClient(url) as client:
            outs = await asyncio.gather(*(client.infer("tiny", X[i:i + 50]) for i in range(0, 200, 50)))
        return torch.cat(outs)

    torch.testing.assert_close(asyncio.run(run()), aiaas_lab.predict(net, X[:200]), atol=1e-4, rtol=1e-4)


def test_unknown_model_on_mlserver_is_one_clear_error(served) -> None:
    url, _, X = served
    with pytest.raises(BadArgument) as info:
        aiaas_lab.predict("no-such-model", X[:3], backend=url)
    message = str(info.value)
    assert message.startswith("MODEL: expected a model served at " + url)
    assert "'no-such-model'" in message and "\n" not in message


def test_forcing_binary_on_a_server_without_it_is_an_aiaas_error(served) -> None:
    url, _, X = served
    with Client(url) as client, pytest.raises(AiaasError, match=r"POST /v2/models/tiny/infer \(5\d\d\)"):
        client.infer("tiny", X[:2], binary=True)
