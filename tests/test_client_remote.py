"""`aiaas_lab.train(..., backend=URL)` and `aiaas_lab.predict(..., backend=URL)` against the real
server process: the same arguments, progress and `TrainResult` as local training, the model sent
in the safest form that works, the weights loaded back, and one clear error per failure."""

from __future__ import annotations

import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

import aiaas_lab
from aiaas_lab import AiaasError, BadArgument, Client, StopSignal
from aiaas_lab._api import preprocessing_of
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.launch.remote import RemoteRun

from server_fixtures import ServerProcess, aiaas_server, start_server  # noqa: F401 - the fixture


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 24)
        self.out = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class Branchy(nn.Module):
    """A Python branch on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class SmallBatchesOnly(nn.Module):
    """Fine on the two samples checked before training; raises on a real batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 8:
            raise RuntimeError(f"batch of {x.shape[0]} is too large for this model")
        return self.linear(x)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_builtin_dataset("digits")


@pytest.fixture(scope="module")
def code_server(tmp_path_factory: pytest.TempPathFactory):
    """A second server whose operator allows models sent as code."""
    server = start_server(tmp_path_factory.mktemp("aiaas-code") / "data", extra_args=["--allow-code", "--max-jobs", "1",
                                                                                      "--max-upload-mb", "1"])
    try:
        yield server
    finally:
        server.stop()


def test_builtin_model_on_builtin_data(aiaas_server: ServerProcess, digits, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    X, y = digits
    result = aiaas_lab.train("mlp", "digits", epochs=2, val=0.2, normalize=True, seed=0, name="api-mlp",
                             backend=aiaas_server.url, token=aiaas_server.token, progress="text")
    out = capsys.readouterr().out
    assert f"on {aiaas_server.url}: model sent as the built-in 'mlp'; the built-in 'digits' data." in out
    assert "completed after 2 epochs" in out  # the same text progress as local training
    assert aiaas_server.token not in out
    assert result.status == "completed" and result.model_name == "api-mlp" and result.job_id.startswith("job-")
    assert [row["epoch"] for row in result.history] == [1, 2] and "val_accuracy" in result.history[-1]
    assert result.hyperparameters["epochs"] == 2 and result.hyperparameters["normalize"] is True
    assert isinstance(result.model, nn.Sequential) and preprocessing_of(result.model).normalizer is not None
    # the weights came back: predicting here (with the normalizer) matches predicting there
    local = aiaas_lab.predict(result.model, X[:100])
    remote = aiaas_lab.predict(result.model, X[:100], backend=aiaas_server.url, token=aiaas_server.token)
    torch.testing.assert_close(local, remote, atol=1e-5, rtol=1e-5)
    by_name = aiaas_lab.predict("api-mlp", (X[:100], y[:100]), classes=True, backend=aiaas_server.url,
                                token=aiaas_server.token)
    assert torch.equal(by_name, local.argmax(dim=1))
    assert (by_name == y[:100]).float().mean() > 0.5


def test_user_module_travels_as_an_export_graph_and_trains_in_place(aiaas_server: ServerProcess, digits,  # noqa: F811
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    X, y = digits
    labels = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[y.numpy()]
    torch.manual_seed(0)
    net = TwoLayer()
    before = net.hidden.weight.detach().clone()
    result = aiaas_lab.train(net, (X.numpy(), labels), epochs=3, batch_size=32, seed=1, normalize=True,
                             backend=aiaas_server.url, token=aiaas_server.token, progress=False)
    assert result.status == "completed" and result.model is net
    assert not torch.equal(before, net.hidden.weight)  # trained weights loaded into the user's module
    assert result.classes == sorted(set(labels.tolist())) == preprocessing_of(net).classes
    torch.testing.assert_close(aiaas_lab.predict(net, X[:50]),
                               aiaas_lab.predict(net, X[:50], backend=aiaas_server.url, token=aiaas_server.token),
                               atol=1e-5, rtol=1e-5)
    assert result.history[-1]["accuracy"] > 0.5
    # the same data again: the server has it, so nothing is uploaded
    aiaas_lab.train(TwoLayer(), (X.numpy(), labels), epochs=1, backend=aiaas_server.url, token=aiaas_server.token,
                    progress="text", callbacks=[])
    out = capsys.readouterr().out
    assert "model sent as a torch.export graph (no code runs on the server); data already on the server" in out


def test_a_module_export_cannot_capture_is_refused_without_allow_code(aiaas_server: ServerProcess, digits) -> None:  # noqa: F811
    X, y = digits
    with pytest.raises(AiaasError) as info:
        aiaas_lab.train(Branchy(), (X, y), epochs=1, backend=aiaas_server.url, token=aiaas_server.token,
                        progress=False)
    message = str(info.value)
    assert message.startswith(f"MODEL: Branchy cannot be sent to the server at {aiaas_server.url}. "
                              "torch.export could not capture Branchy")
    assert "no Python branch on a tensor's values" in message and "--allow-code" in message
    assert aiaas_server.token not in message


def test_a_module_travels_as_code_where_the_server_allows_it(code_server: ServerProcess, digits,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    X, y = digits
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # as for a class defined in a notebook
    try:
        net = Branchy()
        result = aiaas_lab.train(net, (X, y), epochs=2, backend=code_server.url, token=code_server.token,
                                 progress="text")
        failed = aiaas_lab.train(SmallBatchesOnly(), (X, y), epochs=2, backend=code_server.url,
                                 token=code_server.token, progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert "model sent as code (cloudpickle), as the server allows with --allow-code" in capsys.readouterr().out
    assert result.status == "completed" and result.model is net
    # a job that fails on the server returns like a failed local run, with the server's error text
    assert failed.status == "failed" and failed.history == []
    assert "RuntimeError: batch of 64 is too large for this model" in failed.error
    assert "error: RuntimeError: batch of 64" in repr(failed)


def test_a_job_that_fails_before_training_is_one_clear_error(code_server: ServerProcess, digits) -> None:
    X, y = digits
    # pickled by reference (this test module is not importable on the server): the job cannot start
    with pytest.raises(AiaasError) as info:
        aiaas_lab.train(Branchy(), (X, y), epochs=1, backend=code_server.url, token=code_server.token,
                        progress=False)
    message = str(info.value)
    assert "failed on the server at" in message and "before training started:" in message
    assert "test_client_remote" in message  # the server's reason: the module it could not import


def test_stop_signal_cancels_the_job_on_the_server(aiaas_server: ServerProcess) -> None:  # noqa: F811
    stop = StopSignal()
    seen: list[str] = []

    def stop_after_first_epoch(event) -> None:  # noqa: ANN001
        seen.append(event.type)
        if event.type == "epoch_end":
            stop.request("stop requested")

    result = aiaas_lab.train("mlp", "digits", epochs=500, backend=aiaas_server.url, token=aiaas_server.token,
                             progress=False, callbacks=[stop_after_first_epoch], stop=stop)
    assert result.status == "stopped" and 1 <= len(result.history) < 500
    assert seen[0] == "run_started" and seen[-1] == "run_ended"
    with Client(aiaas_server.url, aiaas_server.token) as c:
        assert c.get_job(result.job_id)["status"] == "cancelled"


def test_background_training_returns_a_handle(aiaas_server: ServerProcess) -> None:  # noqa: F811
    run = aiaas_lab.train("linear", "digits", epochs=2, backend=aiaas_server.url, token=aiaas_server.token,
                          progress=False, background=True)
    assert isinstance(run, RemoteRun) and run.status in ("starting", "running", "completed")
    result = run.wait(120)
    assert result is run.result and run.status == "completed" and result.job_id == run.job_id
    assert aiaas_server.token not in repr(run)

    long = aiaas_lab.train("mlp", "digits", epochs=500, backend=aiaas_server.url, token=aiaas_server.token,
                           progress=False, background=True)
    epochs = threading.Event()
    deadline = time.monotonic() + 60
    with Client(aiaas_server.url, aiaas_server.token) as c:
        while not epochs.is_set() and time.monotonic() < deadline:
            if c.get_job(long.job_id)["status"] == "running":
                epochs.set()
            time.sleep(0.1)
    long.stop()
    stopped = long.wait(60)
    assert stopped.status == "stopped" and long.status == "stopped"
    assert repr(long).startswith(f"RemoteRun: stopped (job {long.job_id} on {aiaas_server.url})\nTrainResult: stopped")


def test_clear_errors(aiaas_server: ServerProcess, digits, tmp_path) -> None:  # noqa: F811
    X, y = digits
    url, token = aiaas_server.url, aiaas_server.token
    with pytest.raises(AiaasError, match=r"^Cannot reach the server at http://127\.0\.0\.1:1 after 4 attempts"):
        aiaas_lab.train("mlp", "digits", backend="http://127.0.0.1:1", token=token, progress=False)
    with pytest.raises(AiaasError, match="rejected the token"):
        aiaas_lab.train("mlp", "digits", backend=url, token="not-the-token", progress=False)
    with pytest.raises(BadArgument, match=r"^--checkpoint: expected no --checkpoint with --backend"):
        aiaas_lab.train("mlp", "digits", backend=url, token=token, checkpoint=str(tmp_path), progress=False)
    with pytest.raises(BadArgument) as info:
        aiaas_lab.predict("api-mlpp", X[:2], backend=url, token=token)
    assert str(info.value).startswith(f"MODEL: expected a model served at {url}, but found 'api-mlpp', which it "
                                      "does not have.")
    assert "Did you mean 'api-mlp'?" in str(info.value)
    local = TwoLayer()
    with pytest.raises(BadArgument, match="trained locally"):
        aiaas_lab.predict(local, X[:2], backend=url, token=token)
    with pytest.raises(BadArgument, match=r"^MODEL: expected an nn\.Module or a built-in model"):
        aiaas_lab.train("mpl", "digits", backend=url, token=token, progress=False)


def test_data_larger_than_the_server_accepts(code_server: ServerProcess) -> None:
    X, y = torch.randn(5000, 64), torch.randint(0, 10, (5000,))  # 1.3 MB; this server takes 1 MB
    with pytest.raises(BadArgument) as info:
        aiaas_lab.train("mlp", (X, y), epochs=1, backend=code_server.url, token=code_server.token, progress=False)
    assert str(info.value) == (f"--data: expected data small enough for the server at {code_server.url}, but found "
                               "1.3 MB of tensors, which it refused as too large. Its operator can raise aiaas-lab "
                               "serve --max-upload-mb; the built-in data sets (digits, synthetic-mnist) need no upload.")
