"""`TrainResult`, what every launcher ends with, and what predict remembers of each trained module."""

from __future__ import annotations

import html
import weakref
from dataclasses import dataclass, field
from typing import Any

from .._format import format_metric, history_table
from ..engine.inputs import Preprocessing

__all__ = ["TrainResult", "remember", "preprocessing_of", "result_of"]

# Modules trained in this kernel -> what training learned about their inputs, so that
# `predict(net, X)` on the bare module applies it too. Weak: a dropped module is forgotten.
_PREPROCESSING: weakref.WeakKeyDictionary[Any, Preprocessing] = weakref.WeakKeyDictionary()


def remember(module: Any, preprocessing: Preprocessing | None) -> None:
    if module is not None and preprocessing is not None:
        _PREPROCESSING[module] = preprocessing


def preprocessing_of(model: Any) -> Preprocessing | None:
    if isinstance(model, TrainResult):
        return model.preprocessing or preprocessing_of(model.model)
    try:
        return _PREPROCESSING.get(model)
    except TypeError:  # a name, a number: nothing this kernel trained
        return None


@dataclass
class TrainResult:
    status: str
    history: list[dict[str, float]]
    model: Any  # the trained nn.Module (the caller's own, trained in place, where there was one)
    error: str | None = None
    reason: str = ""
    seconds: float = 0.0
    run_id: str = ""
    task: str = "classification"
    classes: list[Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the values the run used
    job_id: str | None = None  # set by remote training
    model_name: str | None = None  # set by remote training
    preprocessing: Preprocessing | None = None  # what predict applies to raw inputs

    @property
    def metrics(self) -> dict[str, float]:
        """The last completed epoch's metrics."""
        return {k: v for k, v in self.history[-1].items() if k != "epoch"} if self.history else {}

    def _summary(self) -> str:
        epochs = len(self.history)
        line = (f"TrainResult: {self.status}, {epochs} epoch{'s' if epochs != 1 else ''} in "
                f"{self.seconds:.{2 if self.seconds < 10 else 1}f} s")
        if self.reason and self.reason != self.error:
            line += f" ({self.reason})"
        return line

    def __repr__(self) -> str:
        text = self._summary() + "\n" + history_table(self.history)
        if self.error:
            text += f"\nerror: {self.error}"
        return text

    def _repr_html_(self) -> str:
        columns = ["epoch"] + [k for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                               if self.history and k in self.history[-1]]
        head = "".join(f"<th>{c}</th>" for c in columns)
        rows = "".join(
            "<tr>" + "".join(f"<td>{int(r[c]) if c == 'epoch' else format_metric(r[c])}</td>" for c in columns) + "</tr>"
            for r in self.history[-50:])
        error = f"<p style='color:var(--jp-error-color1,#c00)'>{html.escape(self.error)}</p>" if self.error else ""
        return (f"<div class='aiaas-result'><p>{html.escape(self._summary())}</p>{error}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def result_of(run: Any, *, model: Any, preprocessing: Any, status: str, history: list[dict[str, float]],
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
