"""The local launcher: the loop runs in this process, on the calling thread."""

from __future__ import annotations

import uuid
from typing import Any

import torch

from ..engine.job import Job
from ..engine.loop import fit
from ..engine.prepare import prepare
from .handle import RunHandle
from .result import TrainResult, remember

__all__ = ["run_local", "result_of"]


def result_of(run: RunHandle, *, model: Any, preprocessing: Any, status: str, history: list[dict[str, float]],
              error: str | None, reason: str, seconds: float, run_id: str, **extra: Any) -> TrainResult:
    """The TrainResult of a run, from what every launcher has: its events (the engine's own
    record of the hyperparameters it used) and its outcome."""
    started = next((e for e in run.events if e.type == "run_started"), None)
    hyperparameters = dict(started.hyperparameters) if started is not None else {}
    task = preprocessing.task if preprocessing is not None else (started.task if started else "classification")
    remember(model, preprocessing)
    return TrainResult(status=status, history=history, model=model, error=error, reason=reason, seconds=seconds,
                       run_id=run_id, task=task, classes=preprocessing.classes if preprocessing is not None else None,
                       hyperparameters=hyperparameters, preprocessing=preprocessing, **extra)


def run_local(job: Job, run: RunHandle) -> TrainResult:
    prepared = prepare(job)
    run_id = uuid.uuid4().hex[:12]
    threads = job.hyperparameters.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        outcome = fit(prepared.module, prepared.data, prepared.config, run.emit, run.stop_signal, run_id=run_id,
                      extra_state={"preprocessing": prepared.preprocessing.to_dict()})
    finally:
        torch.set_num_threads(previous_threads)
    return result_of(run, model=prepared.module, preprocessing=prepared.preprocessing, status=outcome.status,
                     history=outcome.history, error=outcome.error, reason=outcome.reason,
                     seconds=outcome.seconds, run_id=run_id)
