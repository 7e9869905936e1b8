"""Choosing a reporter for `progress=`: the widget in a live front-end, text elsewhere.

The widget is imported only when a widget front-end is there to show it, so a script never pays
for ipywidgets or anywidget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..engine.events import Event
from .progress import TextProgress, in_widget_frontend

__all__ = ["make_reporter", "show_predictions", "PROGRESS_MODES"]

PROGRESS_MODES = ("auto", "widget", "html", "text")


def make_reporter(progress: Any, stop: Any = None) -> Callable[[Event], None] | None:
    """A subscriber for `progress`: "auto", "widget", "html", "text", False, or a callable.

    `stop` is the run's StopSignal, for reporters that offer a Stop button."""
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    if progress == "auto":
        progress = "widget" if in_widget_frontend() else "text"
    if progress in ("widget", "html"):
        try:
            from .widget import make_widget_reporter
        except ImportError:  # the widget front-end is optional; text always works
            return TextProgress()
        return make_widget_reporter(mode=progress, stop=stop)
    if progress == "text":
        return TextProgress()
    from .._errors import BadArgument

    raise BadArgument("progress", f"one of {', '.join(PROGRESS_MODES)} or False", repr(progress))


def show_predictions(data: Any, outputs: Any, *, classes: bool, mode: str = "auto") -> None:
    """A compact view of predictions in a widget front-end; nothing elsewhere (the tensor itself
    is the cell's result)."""
    if mode == "text" or (mode == "auto" and not in_widget_frontend()):
        return
    try:
        from .widget import show_predictions as show
    except ImportError:
        return
    show(data, outputs, classes=classes, mode=mode)
