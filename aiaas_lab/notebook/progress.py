"""Progress reporters: subscribers that turn engine events into something a person watches.

`reporters.make_reporter` picks one for the current front-end: this text one, or the widget.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from .._format import format_duration, format_metric, format_rate, history_table
from ..engine.events import EpochEnd, Event, RunEnded, RunStarted, StepEnd

__all__ = ["TextProgress", "in_widget_frontend", "format_duration", "format_rate", "history_table"]


class TextProgress:
    """One line, rewritten in place at most `interval` seconds apart, then a final table.

    The rate limit is checked against a monotonic clock on each event, which costs well under a
    microsecond, so this reporter adds nothing measurable to the loop. Where the output is not a
    terminal (a CI log, `make demo | tee`), carriage-return redraws would pile up on one line:
    there it writes one line per epoch instead.
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.5, redraw: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.interval = interval
        if redraw is None:
            isatty = getattr(self.stream, "isatty", None)
            # A notebook's stdout is not a tty but renders "\r" as a redraw.
            redraw = bool(isatty and isatty()) or "ipykernel" in type(self.stream).__module__
        self.redraw = redraw
        self._last_draw = 0.0
        self._started: RunStarted | None = None
        self._t0 = 0.0
        self._last_epoch: EpochEnd | None = None
        self._width = 0
        self.history: list[dict[str, float]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._started, self._t0 = event, time.monotonic()
        elif isinstance(event, StepEnd) and self.redraw:
            now = time.monotonic()
            if now - self._last_draw >= self.interval:
                self._last_draw = now
                self._draw(self._line(event, now))
        elif isinstance(event, EpochEnd):
            self._last_epoch = event
            self.history.append({"epoch": event.epoch, **event.metrics})
            self._last_draw = time.monotonic()
            self._draw(self._epoch_line(event))
        elif isinstance(event, RunEnded):
            self._finish(event)

    def _line(self, event: StepEnd, now: float) -> str:
        started = self._started
        assert started is not None
        total = max(1, (started.epochs - started.start_epoch) * started.steps_per_epoch)
        done = event.step - started.start_epoch * started.steps_per_epoch
        elapsed = now - self._t0
        fraction = min(1.0, done / total)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        bar = "#" * int(fraction * 20)
        rate = event.samples / elapsed if elapsed > 0 else 0.0
        return (f"epoch {event.epoch}/{started.epochs} [{bar:<20}] {fraction:4.0%} "
                f"loss {format_metric(event.loss)}  {format_rate(rate)} samples/s  "
                f"elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}")

    def _epoch_line(self, event: EpochEnd) -> str:
        assert self._started is not None
        metrics = "  ".join(f"{k} {format_metric(v)}" for k, v in event.metrics.items())
        elapsed = time.monotonic() - self._t0
        return f"epoch {event.epoch}/{self._started.epochs}  {metrics}  elapsed {format_duration(elapsed)}"

    def _draw(self, line: str) -> None:
        if not self.redraw:
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        # Pad over the previous line: "\r" alone leaves the tail of a longer line behind.
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()

    def _finish(self, event: RunEnded) -> None:
        if self.redraw:
            self.stream.write("\n")
        summary = f"{event.status} after {event.epochs_completed} epoch{'s' if event.epochs_completed != 1 else ''}"
        summary += f" in {format_duration(event.seconds)}"
        if event.reason and event.reason != event.error:
            summary += f" ({event.reason})"
        self.stream.write(summary + "\n")
        if event.error:
            self.stream.write(f"error: {event.error}\n")
        self.stream.flush()


def in_widget_frontend() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Notebook 7, VS Code, Colab), where widgets render."""
    # Only a process that has imported IPython can be a kernel: a plain script never pays for
    # importing it here.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


_in_widget_frontend = in_widget_frontend  # the name the widget module imports
