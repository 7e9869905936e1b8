"""The local launcher: the loop runs in this process, on the calling thread."""

from __future__ import annotations

import uuid

import torch

from ..engine.job import Job
from ..engine.loop import fit
from ..engine.prepare import prepare
from .handle import RunHandle
from .result import TrainResult, result_of

__all__ = ["run_local"]


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
