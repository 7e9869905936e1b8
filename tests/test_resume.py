"""Stop and resume equals never stopping: a run stopped mid-epoch by a StopSignal and resumed
from its checkpoint takes exactly the optimizer steps of an uninterrupted run and ends with the
same weights (fixed seed, one thread)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits

import aiaas_lab
from aiaas_lab import RunEnded, StepEnd


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("grad_accum, stop_at", [(1, 40), (3, 13)])
def test_stop_mid_epoch_then_resume_equals_never_stopping(tmp_path, grad_accum, stop_at):
    data = _data()
    options: dict[str, Any] = dict(epochs=3, seed=11, threads=1, progress=False, val=0.2, grad_accum=grad_accum,
                                   optimizer="sgd", lr=0.02)
    ends: list[RunEnded] = []
    whole = aiaas_lab.train("mlp", data, callbacks=[lambda e: isinstance(e, RunEnded) and ends.append(e)], **options)
    assert whole.status == "completed"

    stop = aiaas_lab.StopSignal()

    def stop_mid_epoch(event: Any) -> None:
        if isinstance(event, StepEnd) and event.step >= stop_at:
            stop.request("stopped by the test")

    first = aiaas_lab.train("mlp", data, checkpoint=str(tmp_path), stop=stop, callbacks=[stop_mid_epoch], **options)
    assert first.status == "stopped" and len(first.history) == 1  # mid-way through the second epoch
    resumed_ends: list[RunEnded] = []
    second = aiaas_lab.train("mlp", data, checkpoint=str(tmp_path), resume=True,
                             callbacks=[lambda e: isinstance(e, RunEnded) and resumed_ends.append(e)], **options)
    assert second.status == "completed"
    assert resumed_ends[-1].steps == ends[-1].steps
    assert [row["epoch"] for row in second.history] == [1, 2, 3]
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    for a, b in zip(whole.history, second.history):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)


def test_resume_keeps_the_seed_the_run_started_with_and_refuses_another(tmp_path):
    data = _data()
    stop = aiaas_lab.StopSignal()
    seeds = []

    def record(event: Any) -> None:
        if event.type == "run_started":
            seeds.append(event.hyperparameters["seed"])
        if isinstance(event, StepEnd) and event.step >= 5:
            stop.request("test")

    first = aiaas_lab.train("mlp", data, val=0.2, epochs=2, checkpoint=str(tmp_path), stop=stop, callbacks=[record],
                            progress=False)
    assert first.status == "stopped"
    second = aiaas_lab.train("mlp", data, val=0.2, epochs=2, checkpoint=str(tmp_path), resume=True,
                             callbacks=[record], progress=False)
    assert second.status == "completed" and seeds[0] == seeds[1]  # no --seed: the checkpoint's
    with pytest.raises(aiaas_lab.BadArgument, match="--seed: expected the seed the checkpoint was trained with"):
        aiaas_lab.train("mlp", data, val=0.2, epochs=3, checkpoint=str(tmp_path), resume=True, seed=seeds[0] + 1,
                        progress=False)


def test_resuming_into_another_model_or_other_categories_is_one_clear_error(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"color": ["red", "blue"] * 50, "x": range(100), "y": [0, 1] * 50})
    aiaas_lab.train("mlp", df, target="y", epochs=1, checkpoint=str(tmp_path), progress=False, seed=1)
    other = df.assign(color=["red", "green"] * 50)
    with pytest.raises(aiaas_lab.BadArgument, match="--resume: expected data encoded as the checkpoint's"):
        aiaas_lab.train("mlp", other, target="y", epochs=2, checkpoint=str(tmp_path), resume=True, progress=False)
    with pytest.raises(aiaas_lab.BadArgument, match="--resume: expected a checkpoint of this model"):
        aiaas_lab.train(torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2)), df,
                        target="y", epochs=2, checkpoint=str(tmp_path), resume=True, progress=False)


def test_a_model_with_dropout_and_early_stopping_resumes_exactly(tmp_path):
    data = _data()

    def net() -> torch.nn.Module:
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                   torch.nn.Linear(64, 10))

    options: dict[str, Any] = dict(epochs=4, seed=5, threads=1, progress=False, val=0.2, patience=3, lr=0.003)
    whole = aiaas_lab.train(net(), data, **options)
    stop = aiaas_lab.StopSignal()

    def stop_in_epoch_three(event: Any) -> None:
        if isinstance(event, StepEnd) and event.epoch == 3 and event.epoch_step >= 4:
            stop.request("test")

    model = net()
    first = aiaas_lab.train(model, data, checkpoint=str(tmp_path), stop=stop, callbacks=[stop_in_epoch_three], **options)
    assert first.status == "stopped"
    # Stopped again before its first step: the position in the epoch is kept.
    again = aiaas_lab.StopSignal()
    again.request("at once")
    assert aiaas_lab.train(model, data, checkpoint=str(tmp_path), resume=True, stop=again, **options).status == "stopped"
    second = aiaas_lab.train(model, data, checkpoint=str(tmp_path), resume=True, **options)
    for a, b in zip(whole.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [round(r["val_loss"], 6) for r in whole.history] == [round(r["val_loss"], 6) for r in second.history]
