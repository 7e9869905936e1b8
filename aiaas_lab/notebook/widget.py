"""The live training widget and the reporters that feed it (and the static-HTML-only reporter).

`make_widget_reporter` returns the subscriber that `_progress.make_reporter` hands to the engine.
Three rules shape it, all measured on this machine (see bench/widget_overhead.py):

* The engine calls the reporter on its hot path, so a call costs a float append and a monotonic
  clock check (about 1 us); a send happens at most every `SEND_INTERVAL` seconds, and less often
  when sends get slow, so that sending takes at most about `SEND_BUDGET` of the run.
* Each message carries the whole state of the view (a few scalars plus the loss curve and the
  epoch table as float32 bytes, downsampled to a fixed size), so a message lost at iopub's
  high-water mark costs nothing and no message grows with the length of the run.
* The same state renders as static HTML (SVG chart, bars, table) and text; both travel in the
  widget's own output bundle beside the widget view, refreshed every `SNAPSHOT_INTERVAL` seconds
  and at the end, so a saved notebook shows the final run without a kernel.

The pieces live beside this module: `run_view` folds the events into what is shown, `snapshot`
renders the static HTML, `predictions_view` shows `%aiaas predict`'s output. Their names used
elsewhere (`LOSS_POINTS`, `show_predictions`, ...) stay importable from here.

Stop while the cell is running: a busy kernel's main thread reads no shell message until the cell
ends, and ipykernel 7.4 routes a comm's incoming messages to the shell that last sent on it (the
busy cell), whatever subshell the front-end picked. So the widget owns a kernel subshell and
routes its comm there: the click is handled on that subshell's thread while the loop runs, sets
the run's StopSignal, and the loop stops at the next step. Measured here: the run ends 5-10 ms
after the message reaches a busy kernel (without the route, only when the cell ends), and nothing
is added to the hot path. Pumping messages from the loop instead would cost time on every step
and re-enter the kernel's event loop from inside a cell. Where the kernel has no subshells
(ipykernel 6), the click lands when the cell ends, the front-end says so after two seconds, and
Interrupt stops the run at the next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from ..engine.events import Event, RunEnded, RunStarted, StepEnd
from .predictions_view import show_predictions
from .progress import TextProgress, in_widget_frontend
from .run_view import LOSS_POINTS, _RunView, _Series  # noqa: F401 - LOSS_POINTS, _Series: imported from here

__all__ = ["TrainingWidget", "make_widget_reporter", "show_predictions"]

SEND_INTERVAL = 0.1  # seconds between widget messages: at most 10 a second
SEND_BUDGET = 0.01  # most of the run's wall time that sending may take; slower sends go less often
SNAPSHOT_INTERVAL = 5.0  # seconds between refreshes of the saved HTML snapshot
HTML_INTERVAL = 1.0  # seconds between updates of the static view in "html" mode

_STATIC = Path(__file__).parent.parent / "static"

# -- the widget ----------------------------------------------------------------------------


class TrainingWidget(anywidget.AnyWidget):
    """The live view of one training run. `state` is replaced whole on every update."""

    _esm = (_STATIC / "widget.js").read_text(encoding="utf-8")
    _css = (_STATIC / "widget.css").read_text(encoding="utf-8")
    state = traitlets.Dict().tag(sync=True)

    def __init__(self, view: _RunView, **kwargs: Any) -> None:
        self._view = view
        super().__init__(state=view.state(), **kwargs)

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        # The widget view for a live front-end; text and static HTML for everything else.
        data = {**data, "text/plain": self._view.text(), "text/html": self._view.html()}
        return data, metadata


_SUBSHELL: dict[str, str] = {}
_SUBSHELL_LOCK = threading.Lock()


def _own_subshell(manager: Any) -> str | None:
    """The id of the kernel subshell that serves the widgets' clicks, created once per kernel on
    the shell channel thread (where ipykernel creates all subshells)."""
    with _SUBSHELL_LOCK:
        if "id" in _SUBSHELL and _SUBSHELL["id"] in manager.list_subshell():
            return _SUBSHELL["id"]
        done, box = threading.Event(), {}

        def create() -> None:
            try:
                box["id"] = manager._create_subshell()
            finally:
                done.set()

        manager._shell_channel_io_loop.add_callback(create)
        if not done.wait(5) or "id" not in box:
            return None
        _SUBSHELL["id"] = box["id"]
        return box["id"]


def _route_to_subshell(widget: anywidget.AnyWidget) -> bool:
    """Have the widget's incoming messages handled on a thread the running cell does not block.
    Uses ipykernel 7's comm routing hook; False where the kernel has no subshells."""
    try:
        from IPython import get_ipython

        manager = get_ipython().kernel.shell_channel_thread.manager
        comm = widget.comm
        original = comm._reply_subshell_for
        subshell = _own_subshell(manager)
    except Exception:  # ipykernel 6, no kernel, or internals that moved: Interrupt still stops
        return False
    if subshell is None:
        return False

    def route(data: Any, default: str | None) -> str | None:
        return subshell if subshell in manager.list_subshell() else original(data, default)

    comm._reply_subshell_for = route
    return True


class _WidgetReporter:
    """The subscriber behind the widget: folds events, sends the view at most every
    SEND_INTERVAL seconds, and refreshes the output's static snapshot every SNAPSHOT_INTERVAL."""

    def __init__(self, stop: Any = None) -> None:
        from IPython.display import display

        self._stop = stop
        self._view = _RunView()
        self.widget = TrainingWidget(self._view)
        self.widget.on_msg(self._on_message)
        self.stop_routed = _route_to_subshell(self.widget)
        self._handle = display(self.widget, display_id=True)
        self._due = 0.0
        self._snapshot_due = time.monotonic() + SNAPSHOT_INTERVAL
        self.messages = 0

    def __call__(self, event: Event) -> None:
        # The hot path: StepEnd arrives up to once per step; it costs an append and a clock read.
        if event.__class__ is StepEnd:
            self._view.add_step(event)  # type: ignore[arg-type]
            if time.monotonic() < self._due:
                return
        else:
            self._view.apply(event)
            if event.__class__ is not RunEnded and event.__class__ is not RunStarted and time.monotonic() < self._due:
                return
        self._send(final=event.__class__ is RunEnded)

    def _send(self, final: bool = False) -> None:
        now = time.monotonic()
        stop_requested = bool(self._stop is not None and self._stop.is_set())
        self.widget.state = self._view.state(stop_requested)
        self.messages += 1
        if final or now >= self._snapshot_due:
            if self._handle is not None:
                self._handle.update(self.widget)
            self._snapshot_due = now + SNAPSHOT_INTERVAL
        # A send takes ~0.1 ms on an idle machine, but on a busy one handing the GIL to the iopub
        # thread and back can take a scheduler slice (4-5 ms measured here with two cores
        # shared): spacing sends by their own cost keeps them under SEND_BUDGET of the run.
        cost = time.monotonic() - now
        self._due = now + max(SEND_INTERVAL, cost / SEND_BUDGET)

    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        # Runs on the widget's subshell thread while the cell trains: only set the flag; the
        # loop's next step boundary ends the run and the next send shows it.
        if isinstance(content, dict) and content.get("type") == "stop" and self._stop is not None:
            self._stop.request("stop requested")

    def close(self) -> None:
        """Remove the view, for a run that never started (its error is raised in the cell)."""
        if self._handle is not None:
            self._handle.update({"text/plain": ""}, raw=True)
        self.widget.close()


class _HtmlReporter:
    """Static HTML only: one display, updated at a low rate; for front-ends without widgets."""

    def __init__(self) -> None:
        from IPython.display import display

        self._view = _RunView()
        self._handle = display(self._bundle(), raw=True, display_id=True)
        self._due = 0.0

    def _bundle(self) -> dict[str, str]:
        return {"text/plain": self._view.text(), "text/html": self._view.html()}

    def __call__(self, event: Event) -> None:
        if event.__class__ is StepEnd:
            self._view.add_step(event)  # type: ignore[arg-type]
        else:
            self._view.apply(event)
        now = time.monotonic()
        if now >= self._due or event.__class__ is RunEnded:
            self._due = now + HTML_INTERVAL
            self._handle.update(self._bundle(), raw=True)

    def close(self) -> None:
        self._handle.update({"text/plain": ""}, raw=True)


def make_widget_reporter(mode: str = "widget", stop: Any = None) -> Callable[[Event], None]:
    """The live widget ("widget") or the static HTML view ("html"); text outside a kernel, where
    neither can be shown."""
    if not in_widget_frontend():
        return TextProgress()
    if mode == "html":
        return _HtmlReporter()
    return _WidgetReporter(stop)
