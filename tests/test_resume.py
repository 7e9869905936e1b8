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
