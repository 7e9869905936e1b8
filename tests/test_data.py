"""Data forms and bad input, through the public API: every mistake is one clear sentence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aiaas_lab
from aiaas_lab import AiaasError, BadArgument
from aiaas_lab.engine.data import prepare_data
from aiaas_lab.engine.datasets import load_builtin_dataset, synthetic_mnist


def net(inputs=4, outputs=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, outputs))


def toy(n=120, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float64)
    y = rng.integers(0, classes, size=n)
    return X, y


def test_numpy_is_converted_to_float32_and_int64():
    X, y = toy()
    prepared = prepare_data((X, y))
    assert prepared.train.X.dtype == torch.float32 and prepared.train.y.dtype == torch.int64
    assert prepared.task == "classification" and prepared.num_classes == 3 and prepared.input_shape == (4,)


def test_stratified_validation_split_keeps_class_proportions():
    X, y = load_builtin_dataset("digits")
    prepared = prepare_data((X, y), val=0.2, seed=3)
    assert len(prepared.train) + len(prepared.val) == len(X)
    counts = torch.bincount(prepared.val.y, minlength=10)
    expected = torch.bincount(y, minlength=10) * 0.2
    assert torch.all((counts - expected).abs() <= 1)
    again = prepare_data((X, y), val=0.2, seed=3)
    assert torch.equal(prepared.val.X, again.val.X)  # seeded


def _training_statistics(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What --normalize should use, computed here by hand: constant features pass through."""
    std = rows.std(0)
    return rows.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std))


def test_normalize_uses_training_statistics_only_and_predict_reapplies_them():
    X, y = load_builtin_dataset("digits")
    X = torch.as_tensor(X, dtype=torch.float32)
    plain = prepare_data((X, y), val=0.25, seed=0)  # the same seeded split, left as it is
    assert len(plain.train) + len(plain.val) == len(X)
    mean, std = _training_statistics(plain.train.X)
    whole_mean, whole_std = _training_statistics(X)
    # the held-out quarter moves the statistics: using them would be visible below
    assert (mean - whole_mean).abs().max() > 0.05 and (std - whole_std).abs().max() > 0.05
    prepared = prepare_data((X, y), val=0.25, normalize=True, seed=0)
    torch.testing.assert_close(prepared.normalizer.mean, mean)
    torch.testing.assert_close(prepared.normalizer.std, std)
    torch.testing.assert_close(prepared.train.X, (plain.train.X - mean) / std)
    torch.testing.assert_close(prepared.val.X, (plain.val.X - mean) / std)

    model = nn.Linear(64, 10)
    result = aiaas_lab.train(model, (X, y), val=0.25, normalize=True, epochs=3, progress=False, seed=0)
    assert result.status == "completed" and "val_loss" in result.history[-1]
    scores = aiaas_lab.predict(model, X[:50])
    with torch.no_grad():
        torch.testing.assert_close(scores, model((X[:50] - mean) / std))
        assert not torch.allclose(scores, model((X[:50] - whole_mean) / whole_std), atol=1e-3)


def test_normalize_ignores_validation_data_given_as_a_tuple():
    X, y = load_builtin_dataset("digits")
    X = torch.as_tensor(X, dtype=torch.float32)
    model = nn.Linear(64, 10)
    aiaas_lab.train(model, (X[:1200], y[:1200]), val=(X[1200:], y[1200:]), normalize=True, epochs=1,
                    progress=False, seed=0)
    mean, std = _training_statistics(X[:1200])
    with torch.no_grad():
        torch.testing.assert_close(aiaas_lab.predict(model, X[1200:1250]), model((X[1200:1250] - mean) / std))


def test_dataframe_with_target_text_columns_and_string_labels():
    df = pd.DataFrame({
        "size": np.linspace(0, 1, 90),
        "colour": ["red", "green", "blue"] * 30,
        "kind": ["cat", "dog", "fox"] * 30,
    })
    model = net(inputs=4, outputs=3)  # size + 3 one-hot colours
    result = aiaas_lab.train(model, df, target="kind", epochs=40, lr=0.05, progress=False)
    assert result.status == "completed" and result.classes == ["cat", "dog", "fox"]
    assert result.history[-1]["accuracy"] > 0.9


def test_dataset_and_dataloader_are_used_as_given():
    X, y = toy(n=96)
    ds = TensorDataset(torch.tensor(X, dtype=torch.float32), torch.tensor(y))
    # 96 rows: a Dataset is batched by --batch-size (64 by default, so 2 steps); a DataLoader
    # keeps its own batches (32, so 3 steps)
    for data, steps in ((ds, 2), (DataLoader(ds, batch_size=32, shuffle=True), 3)):
        events = []
        result = aiaas_lab.train(net(), data, epochs=2, progress=False, callbacks=[events.append])
        assert result.status == "completed" and len(result.history) == 2
        assert events[0].steps_per_epoch == steps, type(data).__name__
    events = []
    aiaas_lab.train(net(), ds, batch_size=16, epochs=1, progress=False, callbacks=[events.append])
    assert events[0].steps_per_epoch == 6
    result = aiaas_lab.train(net(), ds, val=0.25, epochs=1, progress=False)
    assert "val_loss" in result.history[0]


def test_synthetic_mnist_is_deterministic_and_learnable():
    X1, y1 = synthetic_mnist(n=2000, seed=4)
    X2, y2 = synthetic_mnist(n=2000, seed=4)
    assert X1.shape == (2000, 784) and torch.equal(X1, X2) and torch.equal(y1, y2)
    assert not torch.equal(X1, synthetic_mnist(n=2000, seed=5)[0])
    assert 0.0 <= X1.min() and X1.max() <= 1.0
    X, y = synthetic_mnist(n=8000, seed=0)
    result = aiaas_lab.train("mlp", (X, y), val=0.2, epochs=6, seed=0, progress=False)
    assert result.history[-1]["val_accuracy"] > 0.6  # chance is 0.1


def test_builtin_models_fit_their_data():
    for name in ("mlp", "cnn", "linear"):
        result = aiaas_lab.train(name, "digits", epochs=1, seed=0, progress=False)
        assert result.status == "completed", name
        assert aiaas_lab.predict(result.model, load_builtin_dataset("digits")[0][:3], classes=True).shape == (3,)


@pytest.mark.parametrize("data, kwargs, words", [
    ((np.array([[1.0, np.nan], [0, 1]]), np.array([0, 1])), {}, ["--data", "finite", "1 NaN value", "row 0, column 1"]),
    ((np.array([[1.0, np.inf], [0, 1]]), np.array([0, 1])), {}, ["--data", "infinite"]),
    ((np.zeros((5, 4)), np.zeros(4, dtype=int)), {}, ["--data", "same number of rows", "5 rows", "4"]),
    ((np.zeros((0, 4)), np.zeros(0, dtype=int)), {}, ["--data", "at least one sample", "0 rows"]),
    ((np.zeros((4, 4)), np.array(["a", "b", "a", "b"])), {"loss": "mse"}, ["--target", "numbers for regression", "'a'"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"optimizer": "adamm"}, ["--optimizer", "sgd, adam, adamw", "'adamm'", "Did you mean 'adam'"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"loss": "hinge"}, ["--loss", "cross_entropy", "'hinge'"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"epochs": 0}, ["--epochs", "positive whole number", "0"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"batch_size": -8}, ["--batch-size", "positive", "-8"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"val": 1.5}, ["--val", "fraction", "1.5"]),
    ((np.zeros((4, 4)), np.zeros(4, dtype=int)), {"patience": 2}, ["--patience", "--val"]),
    ("digitz", {}, ["--data", "built-in", "'digitz'", "Did you mean 'digits'"]),
    (pd.DataFrame({"a": [1.0, 2.0], "b": [0, 1]}), {"target": "c"}, ["--target", "column", "'c'"]),
])
def test_bad_input_names_argument_expectation_and_finding(data, kwargs, words):
    with pytest.raises(BadArgument) as info:
        aiaas_lab.train(net(), data, progress=False, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message  # one paragraph


def test_feature_count_mismatch_names_both_numbers():
    X, y = toy(features=7)
    with pytest.raises(BadArgument, match=r"expected 4 features per sample .*found 7"):
        aiaas_lab.train(net(inputs=4), (X, y), progress=False)


def test_model_raising_in_forward_shows_its_message():
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("forgot to reshape")

    X, y = toy()
    with pytest.raises(AiaasError, match="forgot to reshape"):
        aiaas_lab.train(Broken(), (X, y), progress=False)


def test_too_few_outputs_for_the_classes():
    X, y = toy(classes=3)
    with pytest.raises(BadArgument, match="3 outputs per sample"):
        aiaas_lab.train(net(outputs=2), (X, y), progress=False)


def test_user_data_is_never_modified():
    X, y = toy()
    X_before, y_before = X.copy(), y.copy()
    aiaas_lab.train(net(), (X, y), normalize=True, val=0.2, epochs=1, progress=False)
    assert np.array_equal(X, X_before) and np.array_equal(y, y_before)
