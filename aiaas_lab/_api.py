"""The public Python API: `train` and `predict`. The magics only parse arguments and call these.

`train` turns its arguments into one `Job` (checked by the job schema, the same checks the
worker and the server make) and hands it to one launcher: local (this thread), processes
(torch.distributed ranks), or remote (a server). `background=True` runs the same launcher on a
thread. Every launcher reports through the same run handle and ends with the same TrainResult.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._errors import AiaasError, BadArgument, describe
from .engine.events import Event
from .engine.job import Job, check_name, parse_hyperparameters, seeded
from .launch.handle import BackgroundRun, RemoteRun, RunHandle, StopSignal, interrupt_stops
from .launch.result import TrainResult, preprocessing_of

__all__ = ["train", "predict", "TrainResult", "StopSignal", "preprocessing_of"]


def train(
    model: Any,
    data: Any,
    *,
    val: Any = None,
    target: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    optimizer: str = "adam",
    momentum: float | None = None,
    loss: str = "auto",
    weight_decay: float | None = None,
    grad_accum: int = 1,
    clip: float | None = None,
    patience: int | None = None,
    normalize: bool = False,
    seed: int | None = None,
    device: str = "auto",
    checkpoint: str | None = None,
    resume: bool = False,
    threads: int | None = None,
    progress: Any = "auto",
    callbacks: Iterable[Callable[[Event], None]] = (),
    stop: StopSignal | None = None,
    backend: str | None = None,
    token: str | None = None,
    name: str | None = None,
    workers: int = 1,
    shard: bool = False,
    background: bool = False,
    log_every: int | None = None,
) -> Any:
    """Train `model` on `data` and return a `TrainResult` (a run handle with `background=True`).

    `model` is an `nn.Module` (trained in place) or a built-in name ("mlp", "cnn", "linear");
    `data` is `(X, y)`, a DataFrame with `target`, a Dataset, a DataLoader or a built-in name
    ("digits", "synthetic-mnist"). Defaults: `lr` 0.01 for sgd and 0.001 for adam/adamw;
    `momentum` 0.9 (sgd only); `weight_decay` 0, or 0.01 for adamw; `seed` drawn and recorded.
    `progress` is "auto", "widget", "html", "text", False or a callable receiving each event;
    `callbacks` receive every event too; `log_every` sets the optimizer steps per StepEnd event
    (default: about 50 an epoch). `result.hyperparameters` holds the values used.
    """
    h = parse_hyperparameters(dict(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum, loss=loss,
        weight_decay=weight_decay, grad_accum=grad_accum, clip=clip, patience=patience, seed=seed,
        device=device, normalize=normalize, workers=workers, shard=shard, threads=threads,
        checkpoint=checkpoint, resume=resume, log_every=log_every))
    check_name(name)
    if h.seed is None and h.resume and backend is None:
        # A resumed run continues with the seed it started with (its shuffles, its split).
        from .engine.checkpoint import read_state

        h = seeded(h, (read_state(h.checkpoint) or {}).get("seed"))
    h = seeded(h)  # fixed once here: every rank and launcher shuffle alike, and it is recorded
    job = Job(model=model, data=data, hyperparameters=h, val=val, target=target, name=name)
    stop = stop or StopSignal()
    from .notebook.reporters import make_reporter

    # The reporter is made here, on the caller's thread, so its view is displayed in the cell
    # that started the run even when the run continues in the background.
    reporter = make_reporter(progress, stop)
    subscribers = [s for s in [reporter, *callbacks] if s is not None]
    kind = RemoteRun if backend is not None else BackgroundRun if background else RunHandle
    run = kind(stop, subscribers)
    launch = _launcher(job, run, backend=backend, token=token, quiet=progress is False)
    try:
        if background:
            return run.run_in_thread(launch, name="aiaas-background-training")
        with interrupt_stops(stop):
            result = launch()
    except BaseException:
        close = getattr(reporter, "close", None)
        if close is not None and not run.events:  # failed before the first step: drop the empty view
            close()
        raise
    run.finish(result)
    return run.result


def _launcher(job: Job, run: RunHandle, *, backend: str | None, token: str | None, quiet: bool) -> Callable[[], TrainResult]:
    """Where the loop runs; each launcher takes the same job and reports through the same handle."""
    h = job.hyperparameters
    if backend is not None:
        from .launch.remote import run_remote

        return lambda: run_remote(job, run, backend=backend, token=token, quiet=quiet)
    if h.workers > 1 or h.shard:
        from .launch.processes import run_processes

        return lambda: run_processes(job, run)
    from .launch.local import run_local

    return lambda: run_local(job, run)


def predict(model: Any, data: Any, *, batch_size: int = 1024, classes: bool = False,
            device: str = "auto", backend: str | None = None, token: str | None = None,
            progress: Any = False) -> Any:
    """Run `model` on `data` (features only: any subset of rows, a DataFrame with the training
    columns) and return one row of outputs per input row. The preprocessing training learned is
    applied first. With `classes=True`, the predicted labels in the training targets' own values:
    an int64 tensor of class indices when the labels were 0..K-1, else a NumPy array of the
    original labels; `BadArgument` on a regression model."""
    parse_hyperparameters({"batch_size": batch_size})
    if backend is not None:
        from .launch.remote_predict import predict_remote

        return predict_remote(model, data, batch_size=batch_size, classes=classes, backend=backend, token=token)
    import torch
    from torch import nn

    from .engine.inputs import class_indices, features, prediction_inputs
    from .engine.loop import resolve_device
    from .engine.models import first_layer_inputs

    prep = preprocessing_of(model)
    if isinstance(model, TrainResult):
        model = model.model
    if not isinstance(model, nn.Module):
        raise BadArgument("MODEL", "a trained torch.nn.Module or a TrainResult", describe(model))
    X = features(prediction_inputs(data), prep)
    layer = first_layer_inputs(model)
    if layer is not None and X.ndim == 2 and X.shape[1] != layer[1]:
        raise BadArgument("--data", f"{layer[1]} features per row (the model's first layer is {layer[0]})",
                          f"{X.shape[1]}")
    try:
        target_device = next(model.parameters()).device
    except StopIteration:
        target_device = resolve_device(device)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, X.shape[0], int(batch_size)):
                outputs.append(model(X[start:start + int(batch_size)].to(target_device)).cpu())
    except Exception as exc:
        raise AiaasError(f"MODEL: the model raised {type(exc).__name__} in forward on input of shape "
                         f"{tuple(X.shape)}: {exc}") from None
    finally:
        model.train(was_training)
    out = torch.cat(outputs)
    if classes:
        return prep.labels(out) if prep is not None else class_indices(out)
    return out


def attach(job_id: str, *, backend: str, token: str | None = None, model: Any = None, progress: Any = "auto",
           callbacks: Iterable[Callable[[Event], None]] = (), stop: StopSignal | None = None) -> TrainResult:
    """Replay a server job's events from the start into a new view, follow it live to its end
    and return its TrainResult (after a kernel restart, say). The trained weights are loaded
    into `model` when given, else into a built-in model rebuilt from its spec."""
    from .launch.remote import follow_job
    from .notebook.reporters import make_reporter

    stop = stop or StopSignal()
    subscribers = [s for s in [make_reporter(progress, stop), *callbacks] if s is not None]
    run = RemoteRun(stop, subscribers)
    with interrupt_stops(stop):
        result = follow_job(backend, job_id, run, token=token, module=model)
    run.finish(result)
    return run.result
