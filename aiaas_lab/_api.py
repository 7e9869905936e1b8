"""The public Python API: `train` and `predict`. The magics only parse arguments and call these."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .engine.data import InMemory, Normalizer, Prepared, prepare_data, to_features
from .engine.loop import DEVICES, LOSSES, OPTIMIZERS, TrainConfig, fit, resolve_device
from ._errors import AiaasError, BadArgument, close_matches, describe
from .engine.events import Event
from .engine.models import BUILTIN_MODELS, build_model, first_layer_inputs, model_spec
from .notebook.progress import history_table, make_reporter

__all__ = ["train", "predict", "TrainResult", "StopSignal", "preprocessing_of"]


class StopSignal(threading.Event):
    """A stop request the loop checks between steps; `reason` says who asked."""

    reason = ""

    def request(self, reason: str = "stop requested") -> None:
        if not self.is_set():
            self.reason = reason
        self.set()


@dataclass
class Preprocessing:
    """What predict must do to raw inputs to match training, remembered per model."""

    task: str
    normalizer: Normalizer | None = None
    classes: list[Any] | None = None


_PREPROCESSING: weakref.WeakKeyDictionary[nn.Module, Preprocessing] = weakref.WeakKeyDictionary()


def preprocessing_of(model: nn.Module) -> Preprocessing | None:
    return _PREPROCESSING.get(model)


@dataclass
class TrainResult:
    status: str
    history: list[dict[str, float]]
    model: nn.Module
    error: str | None = None
    reason: str = ""
    seconds: float = 0.0
    run_id: str = ""
    task: str = "classification"
    classes: list[Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None  # set by remote training
    model_name: str | None = None  # set by remote training

    @property
    def metrics(self) -> dict[str, float]:
        """The last completed epoch's metrics."""
        return {k: v for k, v in self.history[-1].items() if k != "epoch"} if self.history else {}

    def _summary(self) -> str:
        epochs = len(self.history)
        line = f"TrainResult: {self.status}, {epochs} epoch{'s' if epochs != 1 else ''} in {self.seconds:.{2 if self.seconds < 10 else 1}f} s"
        if self.reason:
            line += f" ({self.reason})"
        return line

    def __repr__(self) -> str:
        text = self._summary() + "\n" + history_table(self.history)
        if self.error:
            text += f"\nerror: {self.error}"
        return text

    def _repr_html_(self) -> str:
        import html

        columns = ["epoch"] + [k for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                               if self.history and k in self.history[-1]]
        head = "".join(f"<th>{c}</th>" for c in columns)
        rows = "".join(
            "<tr>" + "".join(f"<td>{int(r[c]) if c == 'epoch' else format(r[c], '.4f')}</td>" for c in columns) + "</tr>"
            for r in self.history[-50:])
        error = f"<p style='color:var(--jp-error-color1,#c00)'>{html.escape(self.error)}</p>" if self.error else ""
        return (f"<div class='aiaas-result'><p>{html.escape(self._summary())}</p>{error}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def _check_positive(name: str, value: Any, kind: type = int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        expected = "a positive whole number" if kind is int else "a positive number"
        raise BadArgument(name, expected, repr(value))


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        hint = close_matches(str(value), choices)
        raise BadArgument(name, f"one of {', '.join(choices)}", repr(value), hint)


@contextlib.contextmanager
def _interrupt_stops(stop: StopSignal) -> Iterator[None]:
    """Turn the first Ctrl-C (or the notebook's Interrupt button, which sends SIGINT) into a stop
    at the next step boundary, so the model is never left mid-update; a second one interrupts as
    usual, for a forward pass that hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        stop.request("interrupted")
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _resolve_model(model: Any, prepared: Prepared, seed: int) -> tuple[nn.Module, dict[str, Any] | None]:
    if isinstance(model, str):
        if model not in BUILTIN_MODELS:
            raise BadArgument("MODEL", f"an nn.Module or a built-in model ({', '.join(BUILTIN_MODELS)})",
                              repr(model), close_matches(model, BUILTIN_MODELS))
        spec = model_spec(model, prepared.input_shape, prepared.output_size)
        torch.manual_seed(seed)  # the same seed gives the same initial weights
        try:
            return build_model(spec), spec
        except ValueError as exc:
            raise BadArgument("MODEL", f"data that fits the {model} model", str(exc)) from None
    if isinstance(model, TrainResult):
        return model.model, None
    if not isinstance(model, nn.Module):
        raise BadArgument("MODEL", "a torch.nn.Module or a built-in model name", describe(model))
    return model, None


def _first_batch(data: InMemory | DataLoader, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, InMemory):
        return data.X[:size], data.y[:size]
    x0, y0 = data.dataset[0]
    return torch.as_tensor(x0).unsqueeze(0), torch.as_tensor(y0).unsqueeze(0)


def _check_model_fits(model: nn.Module, prepared: Prepared, device: torch.device) -> None:
    """One forward pass on two samples before training, so a mismatch is reported as a clear
    error about the data instead of a failure deep inside the first step."""
    xb, yb = _first_batch(prepared.train)
    features = math.prod(prepared.input_shape)
    layer = first_layer_inputs(model)
    if layer is not None and len(prepared.input_shape) == 1 and layer[1] != features:
        raise BadArgument("--data", f"{layer[1]} features per sample (the model's first layer is {layer[0]})",
                          f"{features}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(xb.to(device))
    except Exception as exc:
        raise AiaasError(f"MODEL: the model raised {type(exc).__name__} in forward on a batch of shape "
                         f"{tuple(xb.shape)}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise BadArgument("MODEL", "a forward() that returns a tensor", describe(out))
    if prepared.task == "classification":
        if out.ndim != 2 or out.shape[1] < 2:
            raise BadArgument("MODEL", f"{prepared.num_classes} outputs per sample (one score per class)",
                              f"outputs of shape {tuple(out.shape)}",
                              "Give the last layer one output per class, or use --loss mse for regression.")
        if prepared.num_classes is not None and out.shape[1] < prepared.num_classes:
            raise BadArgument("MODEL", f"{prepared.num_classes} outputs per sample (the data has "
                              f"{prepared.num_classes} classes)", f"{out.shape[1]}")
    elif out.shape[1:] != yb.shape[1:]:
        raise BadArgument("MODEL", f"outputs shaped like the targets {tuple(yb.shape[1:])} per sample",
                          f"{tuple(out.shape[1:])}")


def train(
    model: nn.Module | str,
    data: Any,
    *,
    val: Any = None,
    target: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    optimizer: str = "adam",
    loss: str = "auto",
    weight_decay: float = 0.0,
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
) -> Any:
    """Train `model` on `data` and return a `TrainResult` (a handle with `background=True`).

    `model` is an `nn.Module` (trained in place) or a built-in name ("mlp", "cnn", "linear");
    `data` is `(X, y)`, a DataFrame with `target`, a Dataset, a DataLoader or a built-in name
    ("digits", "synthetic-mnist"). `progress` is "auto", "widget", "html", "text", False or a
    callable receiving each event; `callbacks` receive every event too.
    """
    _check_positive("--epochs", epochs)
    _check_positive("--batch-size", batch_size)
    _check_positive("--grad-accum", grad_accum)
    _check_positive("--workers", workers)
    _check_positive("--lr", lr, float, allow_none=True)
    _check_positive("--clip", clip, float, allow_none=True)
    _check_positive("--patience", patience, allow_none=True)
    _check_positive("--threads", threads, allow_none=True)
    _check_choice("--optimizer", optimizer, OPTIMIZERS)
    _check_choice("--loss", loss, LOSSES)
    _check_choice("--device", device, DEVICES)
    if resume and not checkpoint:
        raise BadArgument("--resume", "a --checkpoint DIR to resume from", "no --checkpoint")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # recorded in the hyperparameters
    cfg = TrainConfig(epochs=int(epochs), batch_size=int(batch_size), lr=lr, optimizer=optimizer,
                      loss=loss, weight_decay=weight_decay, grad_accum=int(grad_accum), clip=clip,
                      patience=patience, seed=int(seed), device=device, checkpoint=checkpoint,
                      resume=resume)
    options = dict(val=val, target=target, normalize=normalize, threads=threads, progress=progress,
                   callbacks=callbacks, stop=stop, name=name, shard=shard)

    if backend is not None:
        from .launch.remote import train_remote

        return train_remote(model, data, cfg, backend=backend, token=token, workers=workers,
                            background=background, **options)
    if background:
        from .launch.background import train_in_background

        return train_in_background(model, data, cfg, workers=workers, **options)
    if workers > 1 or shard:
        from .launch.processes import train_distributed

        return train_distributed(model, data, cfg, workers=workers, **options)
    return train_local(model, data, cfg, **options)


def prepare_run(model: Any, data: Any, cfg: TrainConfig, *, val: Any, target: str | None,
                normalize: bool) -> tuple[nn.Module, Prepared, dict[str, Any] | None]:
    """Validate everything before the first step: data, model, and that they fit together."""
    if cfg.patience is not None and val is None:
        raise BadArgument("--patience", "validation data to watch (--val DATA or a fraction)", "no --val")
    prepared = prepare_data(data, val=val, target=target, loss=cfg.loss, normalize=normalize,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    if cfg.device != "auto" and cfg.device != "cpu":
        available = torch.cuda.is_available() if cfg.device == "cuda" else torch.backends.mps.is_available()
        if not available:
            raise BadArgument("--device", "a device this machine has (auto picks one)", f"{cfg.device!r}, which is not available")
    module, spec = _resolve_model(model, prepared, cfg.seed)
    _check_model_fits(module.to(resolve_device(cfg.device)), prepared, resolve_device(cfg.device))
    return module, prepared, spec


def train_local(model: Any, data: Any, cfg: TrainConfig, *, val: Any = None, target: str | None = None,
                normalize: bool = False, threads: int | None = None, progress: Any = "auto",
                callbacks: Iterable[Callable[[Event], None]] = (), stop: StopSignal | None = None,
                name: str | None = None, shard: bool = False) -> TrainResult:
    module, prepared, _ = prepare_run(model, data, cfg, val=val, target=target, normalize=normalize)
    stop = stop or StopSignal()
    subscribers = [s for s in [make_reporter(progress, stop), *callbacks] if s is not None]

    def emit(event: Event) -> None:
        for subscriber in subscribers:
            subscriber(event)

    run_id = uuid.uuid4().hex[:12]
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with _interrupt_stops(stop):
            outcome = fit(module, prepared, cfg, emit, stop, run_id=run_id)
    finally:
        torch.set_num_threads(previous_threads)
    _PREPROCESSING[module] = Preprocessing(task=prepared.task, normalizer=prepared.normalizer,
                                           classes=prepared.classes)
    return TrainResult(status=outcome.status, history=outcome.history, model=module, error=outcome.error,
                       reason=outcome.reason, seconds=outcome.seconds, run_id=run_id, task=prepared.task,
                       classes=prepared.classes, hyperparameters=cfg.hyperparameters())


def predict(model: Any, data: Any, *, batch_size: int = 1024, classes: bool = False,
            device: str = "auto", backend: str | None = None, token: str | None = None,
            progress: Any = False) -> torch.Tensor:
    """Run `model` on `data` (features only) and return one row of outputs per input row;
    with `classes=True`, the predicted class index per row."""
    _check_positive("--batch-size", batch_size)
    if backend is not None:
        from .launch.remote import predict_remote

        return predict_remote(model, data, batch_size=batch_size, classes=classes, backend=backend, token=token)
    if isinstance(model, TrainResult):
        model = model.model
    if not isinstance(model, nn.Module):
        raise BadArgument("MODEL", "a trained torch.nn.Module or a TrainResult", describe(model))
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        data = data[0]  # (X, y): predict on X
    if isinstance(data, str):
        from .engine.datasets import BUILTIN_DATASETS, load_builtin_dataset

        if data not in BUILTIN_DATASETS:
            raise BadArgument("--data", f"features or a built-in data set ({', '.join(BUILTIN_DATASETS)})", repr(data))
        data = load_builtin_dataset(data)[0]
    X = to_features(data)
    if X.shape[0] == 0:
        raise BadArgument("--data", "at least one row", "an empty input (0 rows)")
    prep = _PREPROCESSING.get(model)
    if prep is not None and prep.normalizer is not None:
        X = prep.normalizer(X.reshape(X.shape[0], -1)).reshape(X.shape)
    layer = first_layer_inputs(model)
    if layer is not None and X.ndim == 2 and X.shape[1] != layer[1]:
        raise BadArgument("--data", f"{layer[1]} features per row (the model's first layer is {layer[0]})",
                          f"{X.shape[1]}")
    try:
        param = next(model.parameters())
        target_device = param.device
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
        return out.argmax(dim=1) if out.ndim == 2 and out.shape[1] > 1 else (out.reshape(-1) > 0).to(torch.int64)
    return out
