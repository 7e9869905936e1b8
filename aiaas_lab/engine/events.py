"""Typed progress events: the one currency between the engine and everything that watches it.

The engine produces these; the text progress, the widget, the server's event stream and the
remote client consume them. They are frozen so a subscriber can never reach back into the loop,
and they round-trip through JSON so the same objects cross process and network boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

__all__ = [
    "RunStarted",
    "StepEnd",
    "EpochEnd",
    "CheckpointSaved",
    "RunEnded",
    "Event",
    "event_from_dict",
    "event_from_json",
    "to_wire",
    "dumps",
]

RunStatus = Literal["completed", "stopped", "failed"]


class _EventBase:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["type"] = self.type
        return data

    def to_json(self) -> str:
        return dumps(self.to_dict())


@dataclass(frozen=True)
class RunStarted(_EventBase):
    """Training is about to take its first step."""

    type: ClassVar[str] = "run_started"
    run_id: str
    epochs: int
    start_epoch: int  # 0 for a fresh run, the last completed epoch when resuming
    steps_per_epoch: int
    batch_size: int
    train_samples: int
    val_samples: int
    task: str  # "classification" or "regression"
    num_classes: int | None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0


@dataclass(frozen=True)
class StepEnd(_EventBase):
    """Emitted every `log_every` optimizer steps; `loss` is the mean over those steps.

    Reporting every few steps, not every step, is what keeps the loss from being synchronised
    to Python on the hot path.
    """

    type: ClassVar[str] = "step"
    epoch: int  # 1-based epoch the step belongs to
    step: int  # 1-based optimizer step, counted over the whole run
    epoch_step: int  # 1-based optimizer step within the epoch
    loss: float
    samples: int  # training samples seen so far in this run
    time: float = 0.0


@dataclass(frozen=True)
class EpochEnd(_EventBase):
    """An epoch finished; `metrics` holds loss, accuracy, val_loss, val_accuracy as they apply."""

    type: ClassVar[str] = "epoch_end"
    epoch: int
    step: int
    metrics: dict[str, float]
    seconds: float  # wall time of the epoch, validation included
    samples_per_s: float
    time: float = 0.0


@dataclass(frozen=True)
class CheckpointSaved(_EventBase):
    type: ClassVar[str] = "checkpoint"
    epoch: int
    path: str
    time: float = 0.0


@dataclass(frozen=True)
class RunEnded(_EventBase):
    """The last event of every run, whatever happened."""

    type: ClassVar[str] = "run_ended"
    status: RunStatus
    epochs_completed: int
    steps: int
    seconds: float
    reason: str = ""  # "early stopping", "stop requested", ... ; empty when it simply finished
    error: str | None = None
    time: float = 0.0


Event = Union[RunStarted, StepEnd, EpochEnd, CheckpointSaved, RunEnded]

_TYPES: dict[str, type] = {
    cls.type: cls for cls in (RunStarted, StepEnd, EpochEnd, CheckpointSaved, RunEnded)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from `to_dict()` output (or its JSON, decoded); unknown keys are ignored
    for forward compatibility, and non-finite numbers come back as floats."""
    kind = data.get("type")
    cls = _TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}; expected one of {sorted(_TYPES)}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    for key in _FLOAT_FIELDS.get(kind, ()):  # type: ignore[arg-type]
        if key in values:
            values[key] = _from_wire(values[key])
    if "metrics" in values and isinstance(values["metrics"], dict):
        values["metrics"] = {k: _from_wire(v) for k, v in values["metrics"].items()}
    return cls(**values)


def event_from_json(text: str | bytes) -> Event:
    return event_from_dict(json.loads(text))


# -- the codec's policy for non-finite numbers --------------------------------------------------
# JSON has no NaN or infinity: the stdlib refuses them (allow_nan=False), orjson writes null and
# loses the value. Here a non-finite float crosses every hop (files, SSE, HTTP) as the string
# "NaN", "Infinity" or "-Infinity", and `event_from_dict` turns those strings back into floats
# in the fields that hold numbers, so every path sees the same float.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_FIELDS = {"step": ("loss",), "epoch_end": ("seconds", "samples_per_s"), "run_ended": ("seconds",)}


def to_wire(value: Any) -> Any:
    """`value` with every non-finite float (at any depth) replaced by its string form."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def _from_wire(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def dumps(data: Any) -> str:
    """JSON text for an event dict (or any message holding one), non-finite numbers kept."""
    return json.dumps(to_wire(data), separators=(",", ":"), allow_nan=False)
