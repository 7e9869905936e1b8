"""The same run behaves the same on every launcher: local, background, `workers=2`, and a real
server process with workers 1 and 2. Each scenario runs through `aiaas_lab.train` on all five and
the outcomes are compared with each other, not only with a constant."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from server_fixtures import aiaas_server  # noqa: F401  (fixture)

import aiaas_lab
from aiaas_lab import BadArgument, StepEnd

LAUNCHERS = ["local", "background", "workers", "remote", "remote-workers"]


def launch(where: str, server: Any, model: Any, data: Any, **options: Any) -> Any:
    """`aiaas_lab.train` on one launcher; the result, whichever way it ran."""
    options.setdefault("progress", False)
    if where == "background":
        return aiaas_lab.train(model, data, background=True, **options).wait(300)
    if where in ("workers", "remote-workers"):
        options["workers"] = 2
    if where.startswith("remote"):
        options.update(backend=server.url, token=server.token)
    return aiaas_lab.train(model, data, **options)


def predict(where: str, server: Any, result: Any, data: Any, **options: Any) -> Any:
    if where.startswith("remote"):
        options.update(backend=server.url, token=server.token)
    return aiaas_lab.predict(result, data, **options)


@pytest.fixture(scope="module")
def server(aiaas_server):  # noqa: F811
    return aiaas_server


# -- a run that diverges ---------------------------------------------------------------------

def test_a_diverging_run_fails_at_the_step_its_loss_stops_being_finite_on_every_launcher(server):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 20, generator=g)
    y = (X @ torch.randn(20, 1, generator=g)) * 1e18  # targets around 1e18: SGD at lr 10 explodes
    results = {where: launch(where, server, "linear", (X, y), epochs=3, optimizer="sgd", lr=10.0, seed=1)
               for where in LAUNCHERS}
    for where, result in results.items():
        assert result.status == "failed", (where, result)
        assert "not finite" in result.reason and "step" in result.reason and "--lr" in result.reason, (where, result.reason)
        assert result.error == result.reason
        assert all(np.isfinite(row["loss"]) for row in result.history), (where, result.history)
    # The loss is read every step in one process: local, background and the single-process
    # server job stop at the very same step.
    steps = {where: results[where].reason.split("step ")[1].split()[0] for where in ("local", "background", "remote")}
    assert len(set(steps.values())) == 1, steps


def test_non_finite_losses_cross_every_hop_as_floats(server):
    """A validation loss can be infinite while training goes on: it must reach the caller as a
    float on every launcher, not as null or an encoding error."""
    X = torch.randn(200, 4)
    y = torch.randn(200, 1)
    val = (torch.full((20, 4), 3e38), torch.full((20, 1), -3e38))  # the model's squared error overflows
    seen: dict[str, list[float]] = {}
    for where in ("local", "workers", "remote"):
        result = launch(where, server, "linear", (X, y), val=val, epochs=2, seed=3)
        assert result.status == "completed", (where, result)
        seen[where] = [row["val_loss"] for row in result.history]
    for where, values in seen.items():
        assert all(isinstance(v, float) and not np.isfinite(v) for v in values), (where, values)


# -- a DataFrame with text columns and text labels, then predict on any rows -----------------

def _frame(n: int = 240) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    city = rng.choice(["paris", "rome", "oslo", "lima", "kyiv"], n)
    income = rng.normal(50, 15, n)
    age = rng.integers(18, 80, n).astype(float)
    label = np.where(income + (city == "oslo") * 20 > 55, "rich", "poor")
    return pd.DataFrame({"city": city, "income": income, "age": age, "label": label})


@pytest.mark.parametrize("where", LAUNCHERS)
def test_a_dataframe_with_text_labels_predicts_any_rows_as_the_original_labels(server, where):
    df = _frame()
    features = df.drop(columns=["label"])
    result = launch(where, server, "mlp", df, target="label", val=0.25, epochs=8, normalize=True, seed=2, lr=0.01)
    assert result.status == "completed", result
    assert result.classes == ["poor", "rich"]
    labels = predict(where, server, result, features, classes=True)
    assert isinstance(labels, np.ndarray) and set(labels.tolist()) <= {"poor", "rich"}
    assert (labels == df["label"].to_numpy()).mean() > 0.8
    one = predict(where, server, result, features.iloc[[0]], classes=True)
    head = predict(where, server, result, features.head(3), classes=True)
    assert one.tolist() == labels[:1].tolist() and head.tolist() == labels[:3].tolist()
    # A category training never saw encodes as all zeros instead of failing.
    unseen = features.head(2).assign(city=["tokyo", "paris"])
    assert predict(where, server, result, unseen, classes=True).shape == (2,)
    with pytest.raises(BadArgument, match="income"):
        predict(where, server, result, features.drop(columns=["income"]), classes=True)


# -- a partial built-in config ---------------------------------------------------------------

def test_a_partial_builtin_config_is_sized_to_the_data_on_every_launcher(server):
    X, y = torch.randn(300, 12), torch.randint(0, 3, (300,))
    shapes = {}
    for where in LAUNCHERS:
        result = launch(where, server, {"builtin": "mlp", "config": {"hidden": [32]}}, (X, y), epochs=1, seed=4)
        assert result.status == "completed", (where, result)
        shapes[where] = [tuple(p.shape) for p in result.model.parameters()]
    assert all(s == [(32, 12), (32,), (3, 32), (3,)] for s in shapes.values()), shapes


# -- options checked the same way everywhere -------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"patience": 2}, ["--patience", "validation data", "no --val"]),
    ({"weight_decay": -1}, ["--weight-decay", "a number >= 0", "-1"]),
    ({"momentum": 0.5}, ["--momentum", "--optimizer sgd"]),
    ({"val": 0.0001}, ["--val", "no validation row"]),
    ({"epochs": 0}, ["--epochs", "positive whole number", "0"]),
])
def test_bad_options_get_the_same_message_on_every_launcher(server, options, words):
    X, y = torch.randn(100, 4), torch.randint(0, 2, (100,))
    messages = set()
    for where in LAUNCHERS:
        with pytest.raises(BadArgument) as info:
            launch(where, server, "mlp", (X, y), **options)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    for word in words:
        assert word in message, (word, message)


def test_normalize_on_a_dataset_is_refused_alike_on_every_launcher(server):
    dataset = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    messages = set()
    for where in LAUNCHERS:
        with pytest.raises(BadArgument) as info:
            launch(where, server, "mlp", dataset, normalize=True)
        messages.add(str(info.value))
    assert len(messages) == 1 and messages.pop().startswith("--normalize: expected in-memory data"), messages


def test_the_server_answers_a_bad_option_with_the_same_words_as_train(server):
    with pytest.raises(BadArgument) as info:
        aiaas_lab.train("mlp", "digits", weight_decay=-1, progress=False)
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        response = client.post("/v1/jobs", json={"model": {"builtin": "mlp"}, "data": {"builtin": "digits"},
                                                 "hyperparameters": {"weight_decay": -1}})
    assert response.status_code == 400
    assert response.json() == {"error": str(info.value)}


def test_recorded_hyperparameters_are_the_values_used_on_every_launcher(server):
    X, y = torch.randn(120, 4), torch.randint(0, 2, (120,))
    recorded = {}
    for where in LAUNCHERS:
        result = launch(where, server, "mlp", (X, y), epochs=1, optimizer="sgd", seed=5)
        recorded[where] = result.hyperparameters
    for where, h in recorded.items():
        assert h["momentum"] == 0.9 and h["lr"] == 0.01 and h["weight_decay"] == 0.0, (where, h)
        assert h["device"] == "cpu" and h["seed"] == 5, (where, h)
        assert h["workers"] == (2 if "workers" in where else 1), (where, h)
    adamw = launch("local", server, "mlp", (X, y), epochs=1, optimizer="adamw", seed=5)
    assert adamw.hyperparameters["weight_decay"] == 0.01 and adamw.hyperparameters["momentum"] is None
    plain = launch("local", server, "mlp", (X, y), epochs=1, optimizer="sgd", momentum=0.0, seed=5)
    assert plain.hyperparameters["momentum"] == 0.0


# -- regression on a Dataset of scalar targets -----------------------------------------------

def test_a_dataset_of_scalar_float_targets_trains_as_regression():
    X = torch.randn(256, 3)
    y = X.sum(dim=1)  # shape (n,)
    result = aiaas_lab.train("mlp", torch.utils.data.TensorDataset(X, y), epochs=20, lr=0.01, progress=False, seed=6)
    assert result.status == "completed" and result.task == "regression"
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 4
    with pytest.raises(BadArgument, match="--classes"):
        aiaas_lab.predict(result, X[:4], classes=True)


# -- Stop mid-run, and a subscriber that raises ----------------------------------------------

@pytest.mark.parametrize("where", LAUNCHERS)
def test_stop_mid_run_ends_stopped_with_the_weights_so_far(server, where):
    stop = aiaas_lab.StopSignal()

    def after_a_few_steps(event: Any) -> None:
        if isinstance(event, StepEnd) and event.step >= 3:
            stop.request("enough")

    result = launch(where, server, "mlp", "digits", epochs=200, stop=stop, callbacks=[after_a_few_steps],
                    seed=7)
    assert result.status == "stopped", result
    assert len(result.history) < 200
    if where.startswith("remote"):
        # A job cancelled on a server registers no model there (only finished jobs do): the
        # result carries its history and no weights.
        assert result.job_id and result.model is None
    else:
        assert result.model is not None


@pytest.mark.parametrize("where", ["local", "workers", "remote"])
def test_a_subscriber_that_raises_fails_the_run_and_leaves_nothing_running(server, where):
    def broken(event: Any) -> None:
        if isinstance(event, StepEnd):
            raise RuntimeError("my callback is broken")

    result = launch(where, server, "mlp", "digits", epochs=200, callbacks=[broken], seed=8)
    assert result.status == "failed" and "my callback is broken" in result.error, result
    if where == "remote":
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
            assert client.get(f"/v1/jobs/{result.job_id}").json()["status"] == "cancelled"


def test_momentum_weight_decay_and_log_every_behave_alike_on_every_launcher(server):
    X, y = torch.randn(256, 4), torch.randint(0, 2, (256,))
    for where in LAUNCHERS:
        steps: list[int] = []
        ended: list[Any] = []

        def watch(event: Any) -> None:
            if isinstance(event, StepEnd):
                steps.append(event.step)
            elif event.type == "run_ended":
                ended.append(event)

        result = launch(where, server, "mlp", (X, y), epochs=2, optimizer="sgd", momentum=0.5, weight_decay=0.1,
                        log_every=1, seed=9, callbacks=[watch])
        assert result.status == "completed", (where, result)
        h = result.hyperparameters
        assert (h["momentum"], h["weight_decay"], h["lr"]) == (0.5, 0.1, 0.01), (where, h)
        assert steps == list(range(1, ended[-1].steps + 1)), (where, steps)  # an event every step
