"""What the training views show, folded from the engine's events: one object that the live
widget's synced state, the static HTML snapshot and the text all render from, so the three can
never disagree about a run.

Pure Python, no widget or IPython import: it is cheap to test and to fold on the engine's hot path
(`add_step` is an append and a few assignments).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Sequence
from typing import Any

from .._format import format_duration, format_metric, format_rate, history_table
from ..engine.events import CheckpointSaved, EpochEnd, Event, RunEnded, RunStarted, StepEnd, to_wire
from .snapshot import snapshot_html

__all__ = ["LOSS_POINTS", "HISTORY_ROWS", "METRIC_COLUMNS"]

LOSS_POINTS = 320  # most loss points kept and sent: 2.5 KB as float32 pairs
HISTORY_ROWS = 128  # most epoch rows sent: 2.5 KB for five columns
METRIC_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy")


class _Series:
    """A loss curve of bounded size: when full, neighbouring points merge (mean loss, later step)
    and later points are averaged over twice as many reports, so the spacing stays even, memory
    stays fixed for a run of any length, and each report costs an append."""

    def __init__(self, capacity: int = LOSS_POINTS) -> None:
        self.capacity = capacity - capacity % 2
        self.steps = array("f")
        self.losses = array("f")
        self.stride = 1
        self._sum = 0.0
        self._count = 0
        self._last_step = 0.0

    def add(self, step: float, loss: float) -> None:
        self._sum += loss
        self._count += 1
        self._last_step = step
        if self._count < self.stride:
            return
        self.steps.append(step)
        self.losses.append(self._sum / self._count)
        self._sum, self._count = 0.0, 0
        if len(self.steps) >= self.capacity:
            self._halve()

    def _halve(self) -> None:
        self.steps = array("f", self.steps[1::2])
        pairs = self.losses
        self.losses = array("f", ((pairs[i] + pairs[i + 1]) / 2 for i in range(0, len(pairs) - 1, 2)))
        self.stride *= 2

    def points(self) -> tuple[array, array]:
        """The curve, with the partly filled last bucket as its newest point."""
        if not self._count:
            return self.steps, self.losses
        steps, losses = array("f", self.steps), array("f", self.losses)
        steps.append(self._last_step)
        losses.append(self._sum / self._count)
        return steps, losses

    def to_bytes(self) -> bytes:
        steps, losses = self.points()
        return steps.tobytes() + losses.tobytes()


def _pick_rows(rows: Sequence[dict[str, float]], limit: int) -> list[dict[str, float]]:
    """At most `limit` rows, evenly spaced, always with the first and the last."""
    n = len(rows)
    if n <= limit:
        return list(rows)
    return [rows[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


class _RunView:
    """The run as the views see it: status, progress, the loss curve and the epoch table."""

    def __init__(self) -> None:
        self.status = "starting"
        self.reason = ""
        self.error: str | None = None
        self.started: RunStarted | None = None
        self.t0 = time.monotonic()
        self.seconds: float | None = None  # set when the run ends
        self.epoch = 0
        self.epoch_step = 0
        self.step = 0
        self.samples = 0
        self.loss: float | None = None
        self.checkpoint = ""
        self.series = _Series()
        self.history: list[dict[str, float]] = []
        self._history_bytes = b""
        self._history_rows = -1

    # -- folding events ------------------------------------------------------------------

    def add_step(self, event: StepEnd) -> None:
        self.series.add(event.step, event.loss)
        self.epoch, self.epoch_step, self.step = event.epoch, event.epoch_step, event.step
        self.samples, self.loss = event.samples, event.loss

    def apply(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            self.add_step(event)
        elif isinstance(event, RunStarted):
            self.started, self.status, self.t0 = event, "running", time.monotonic()
            self.epoch = event.start_epoch
            self.step = event.start_epoch * event.steps_per_epoch
        elif isinstance(event, EpochEnd):
            self.history.append({"epoch": event.epoch, **event.metrics})
            self.epoch, self.step = event.epoch, event.step
            if self.started is not None:
                self.epoch_step = self.started.steps_per_epoch
        elif isinstance(event, CheckpointSaved):
            self.checkpoint = event.path
        elif isinstance(event, RunEnded):
            self.status, self.reason, self.error = event.status, event.reason, event.error
            self.seconds = event.seconds

    # -- derived figures -----------------------------------------------------------------

    def elapsed(self) -> float:
        return self.seconds if self.seconds is not None else time.monotonic() - self.t0

    def epochs_done(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else (self.started.start_epoch if self.started else 0)

    def fraction(self) -> float:
        """How much of this run's steps are done, 0..1."""
        s = self.started
        if s is None:
            return 0.0
        total = (s.epochs - s.start_epoch) * s.steps_per_epoch
        done = self.step - s.start_epoch * s.steps_per_epoch
        return min(1.0, max(0.0, done / total)) if total > 0 else 1.0

    def eta(self) -> float | None:
        fraction, elapsed = self.fraction(), self.elapsed()
        if self.status != "running" or fraction <= 0:
            return None
        return elapsed * (1 - fraction) / fraction

    def columns(self) -> list[str]:
        return [c for c in METRIC_COLUMNS if self.history and c in self.history[-1]]

    def rows(self, limit: int = HISTORY_ROWS) -> list[dict[str, float]]:
        """The epoch rows a view shows: at most `limit`, evenly spaced."""
        return _pick_rows(self.history, limit)

    # -- the live widget's state ---------------------------------------------------------

    def history_bytes(self) -> bytes:
        """Epoch rows as float32 [epoch, *columns], downsampled; rebuilt only when a row is added."""
        if self._history_rows != len(self.history):
            columns = self.columns()
            flat = array("f")
            for row in self.rows():
                flat.append(row["epoch"])
                flat.extend(row.get(c, math.nan) for c in columns)
            self._history_bytes, self._history_rows = flat.tobytes(), len(self.history)
        return self._history_bytes

    def state(self, stop_requested: bool = False) -> dict[str, Any]:
        """The whole state of the live view: one message's worth, a few KB at most.

        The state travels as JSON, which has no NaN or infinity (jupyter_client refuses them), so
        a non-finite float (a diverged loss) is sent as the string "NaN", "Infinity" or
        "-Infinity", the engine's own event codec (`to_wire`); js/src/nonfinite.js decodes them in
        the number fields. The float32 curve and rows carry non-finite values as they are."""
        s = self.started
        return to_wire({
            "status": self.status, "reason": self.reason, "error": self.error,
            "stop_requested": stop_requested,
            "epochs": s.epochs if s else 0, "start_epoch": s.start_epoch if s else 0,
            "steps_per_epoch": s.steps_per_epoch if s else 0, "batch_size": s.batch_size if s else 0,
            "train_samples": s.train_samples if s else 0, "task": s.task if s else "",
            "epoch": self.epoch, "epochs_done": self.epochs_done(), "epoch_step": self.epoch_step,
            "step": self.step, "samples": self.samples, "loss": self.loss,
            "elapsed": round(self.elapsed(), 3), "checkpoint": self.checkpoint,
            "losses": self.series.to_bytes(),
            "columns": self.columns(), "history": self.history_bytes(), "history_total": len(self.history),
        })

    # -- static renderings ---------------------------------------------------------------

    def status_line(self) -> str:
        if self.status == "failed":
            return f"failed: {self.error or self.reason}"
        if self.status in ("completed", "stopped"):
            done = len(self.history)
            line = f"{self.status} after {done} epoch{'s' if done != 1 else ''} in {format_duration(self.elapsed())}"
            return line + (f" ({self.reason})" if self.reason else "")
        return self.status

    def figures(self) -> str:
        """Elapsed, ETA, rate and loss on one line (a diverged loss reads NaN or inf)."""
        elapsed, eta = self.elapsed(), self.eta()
        parts = [f"elapsed {format_duration(elapsed)}"]
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if elapsed > 0 and self.samples:
            parts.append(f"{format_rate(self.samples / elapsed)} samples/s")
        if self.loss is not None:
            parts.append(f"loss {format_metric(self.loss)}")
        return " · ".join(parts)

    def text(self) -> str:
        s = self.started
        head = f"aiaas training: {self.status_line()}"
        if s is not None:
            head += f"\nepoch {self.epochs_done()}/{s.epochs} · step {self.step}/{s.epochs * s.steps_per_epoch} · {self.figures()}"
        return head + ("\n" + history_table(self.history) if self.history else "")

    def html(self) -> str:
        return snapshot_html(self)
