"""The live training widget, its static HTML snapshot, and the compact view of predictions.

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

import html
import math
import struct
import threading
import time
import zlib
from array import array
from base64 import b64encode
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from ..engine.events import CheckpointSaved, EpochEnd, Event, RunEnded, RunStarted, StepEnd
from .progress import TextProgress, _in_widget_frontend, format_duration, format_rate, history_table

__all__ = ["TrainingWidget", "make_widget_reporter", "show_predictions"]

SEND_INTERVAL = 0.1  # seconds between widget messages: at most 10 a second
SEND_BUDGET = 0.01  # most of the run's wall time that sending may take; slower sends go less often
SNAPSHOT_INTERVAL = 5.0  # seconds between refreshes of the saved HTML snapshot
HTML_INTERVAL = 1.0  # seconds between updates of the static view in "html" mode
LOSS_POINTS = 320  # most loss points kept and sent: 2.5 KB as float32 pairs
HISTORY_ROWS = 128  # most epoch rows sent: 2.5 KB for five columns
METRIC_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy")

_STATIC = Path(__file__).parent.parent / "static"


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
    """What the views show, folded from the engine's events. Pure Python: the widget, the HTML
    snapshot and the text all render from it."""

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

    def history_bytes(self) -> bytes:
        """Epoch rows as float32 [epoch, *columns], downsampled; rebuilt only when a row is added."""
        if self._history_rows != len(self.history):
            columns = self.columns()
            flat = array("f")
            for row in _pick_rows(self.history, HISTORY_ROWS):
                flat.append(row["epoch"])
                flat.extend(row.get(c, math.nan) for c in columns)
            self._history_bytes, self._history_rows = flat.tobytes(), len(self.history)
        return self._history_bytes

    def state(self, stop_requested: bool = False) -> dict[str, Any]:
        """The whole state of the live view: one message's worth, a few KB at most."""
        s = self.started
        return {
            "status": self.status, "reason": self.reason, "error": self.error,
            "stop_requested": stop_requested,
            "epochs": s.epochs if s else 0, "start_epoch": s.start_epoch if s else 0,
            "steps_per_epoch": s.steps_per_epoch if s else 0, "batch_size": s.batch_size if s else 0,
            "train_samples": s.train_samples if s else 0, "task": s.task if s else "",
            "epoch": self.epoch, "epochs_done": self.epochs_done(), "epoch_step": self.epoch_step,
            # JSON has no NaN: a diverged loss travels as null (the front-end shows a dash).
            "step": self.step, "samples": self.samples,
            "loss": self.loss if self.loss is not None and math.isfinite(self.loss) else None,
            "elapsed": round(self.elapsed(), 3), "checkpoint": self.checkpoint,
            "losses": self.series.to_bytes(),
            "columns": self.columns(), "history": self.history_bytes(), "history_total": len(self.history),
        }

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
        elapsed, eta = self.elapsed(), self.eta()
        parts = [f"elapsed {format_duration(elapsed)}"]
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if elapsed > 0 and self.samples:
            parts.append(f"{format_rate(self.samples / elapsed)} samples/s")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        return " · ".join(parts)

    def text(self) -> str:
        s = self.started
        head = f"aiaas training: {self.status_line()}"
        if s is not None:
            head += f"\nepoch {self.epochs_done()}/{s.epochs} · step {self.step}/{s.epochs * s.steps_per_epoch} · {self.figures()}"
        return head + ("\n" + history_table(self.history) if self.history else "")

    def html(self) -> str:
        return _snapshot_html(self)


# -- the static HTML snapshot --------------------------------------------------------------

_COLORS = {"train": "var(--jp-brand-color1, #1976d2)", "val": "var(--jp-warn-color1, #f57c00)"}
_FG, _FG2 = "var(--jp-ui-font-color1, #212121)", "var(--jp-ui-font-color2, #616161)"
_BORDER = "var(--jp-border-color2, #e0e0e0)"


def _ema(values: Sequence[float], weight: float = 0.8) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _svg_chart(title: str, lines: list[tuple[Sequence[float], Sequence[float], str, float, bool]],
               width: int = 300, height: int = 150) -> str:
    """A small SVG line chart; each line is (xs, ys, colour, opacity, dots)."""
    finite = [(x, y) for xs, ys, *_ in lines for x, y in zip(xs, ys) if math.isfinite(y)]
    pad_l, pad_r, pad_t, pad_b = 44, 8, 18, 18
    body = [f"<text x='{pad_l}' y='12' style='fill:{_FG2};font-size:11px'>{html.escape(title)}</text>"]
    if finite:
        x0, x1 = min(p[0] for p in finite), max(p[0] for p in finite)
        y0, y1 = min(p[1] for p in finite), max(p[1] for p in finite)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-6)

        def sx(x: float) -> float:
            return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

        def sy(y: float) -> float:
            return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

        for value in (y0, (y0 + y1) / 2, y1):
            body.append(f"<text x='{pad_l - 4}' y='{sy(value) + 3:.1f}' text-anchor='end' "
                        f"style='fill:{_FG2};font-size:10px'>{value:.3g}</text>")
        body.append(f"<text x='{pad_l}' y='{height - 4}' style='fill:{_FG2};font-size:10px'>{x0:g}</text>"
                    f"<text x='{width - pad_r}' y='{height - 4}' text-anchor='end' "
                    f"style='fill:{_FG2};font-size:10px'>{x1:g}</text>")
        for xs, ys, color, opacity, dots in lines:
            pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
            if not pts:
                continue
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            body.append(f"<polyline points='{coords}' style='fill:none;stroke:{color};stroke-width:1.5;"
                        f"opacity:{opacity}'/>")
            if dots:
                body.extend(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2.5' style='fill:{color}'/>" for x, y in pts)
    rect = (f"<rect x='{pad_l}' y='{pad_t}' width='{width - pad_l - pad_r}' height='{height - pad_t - pad_b}' "
            f"style='fill:none;stroke:{_BORDER}'/>")
    return (f"<svg class='aiaas-chart' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}'>{rect}{''.join(body)}</svg>")


def _bar(label: str, fraction: float) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (f"<div style='display:flex;align-items:center;gap:8px;margin:2px 0'>"
            f"<span style='width:110px;color:{_FG2}'>{html.escape(label)}</span>"
            f"<div style='flex:0 0 240px;height:8px;background:var(--jp-layout-color3, #e0e0e0);border-radius:4px'>"
            f"<div style='width:{pct:.1f}%;height:8px;background:{_COLORS['train']};border-radius:4px'></div></div>"
            f"<span style='color:{_FG2}'>{pct:.0f}%</span></div>")


def _snapshot_html(view: _RunView) -> str:
    s = view.started
    color = {"failed": "var(--jp-error-color1, #d32f2f)", "stopped": "var(--jp-warn-color1, #f57c00)",
             "completed": "var(--jp-success-color1, #388e3c)"}.get(view.status, _FG)
    parts = [f"<div style='color:{color};font-weight:600'>{html.escape(view.status_line())}</div>"]
    if s is not None:
        epochs = s.epochs
        parts.append(_bar(f"epoch {view.epochs_done()}/{epochs}", view.epochs_done() / epochs if epochs else 0))
        spe = s.steps_per_epoch
        parts.append(_bar(f"step {view.epoch_step}/{spe}", view.epoch_step / spe if spe else 0))
        parts.append(f"<div style='color:{_FG2};margin:4px 0'>{html.escape(view.figures())}</div>")
    steps, losses = view.series.points()
    loss_lines = [(steps, losses, _COLORS["train"], 0.3, False), (steps, _ema(losses), _COLORS["train"], 1.0, False)]
    rows = _pick_rows(view.history, HISTORY_ROWS)  # as many as the live view draws
    epoch_steps = [r["epoch"] * s.steps_per_epoch for r in rows] if s else []
    dots = len(rows) <= 60  # past that, dots hide the lines
    if view.history:
        loss_lines.append((epoch_steps, [r.get("loss", math.nan) for r in rows], _COLORS["train"], 1.0, dots))
        if "val_loss" in view.history[-1]:
            loss_lines.append((epoch_steps, [r["val_loss"] for r in rows], _COLORS["val"], 1.0, dots))
    charts = [_svg_chart("loss (per step, smoothed; dots: epochs, val in orange)", loss_lines)]
    if view.history and "accuracy" in view.history[-1]:
        epochs_x = [r["epoch"] for r in rows]
        acc = [(epochs_x, [r["accuracy"] for r in rows], _COLORS["train"], 1.0, dots)]
        if "val_accuracy" in view.history[-1]:
            acc.append((epochs_x, [r["val_accuracy"] for r in rows], _COLORS["val"], 1.0, dots))
        charts.append(_svg_chart("accuracy per epoch (val in orange)", acc))
    parts.append(f"<div style='display:flex;gap:12px;flex-wrap:wrap'>{''.join(charts)}</div>")
    if view.history:
        columns = view.columns()
        head = "".join(f"<th style='padding:1px 8px;text-align:right'>{c}</th>" for c in ["epoch", *columns])
        body = "".join(
            "<tr>" + f"<td style='padding:1px 8px;text-align:right'>{int(r['epoch'])}</td>"
            + "".join(f"<td style='padding:1px 8px;text-align:right'>{r.get(c, math.nan):.4f}</td>" for c in columns)
            + "</tr>" for r in _pick_rows(view.history, 50))
        parts.append(f"<table class='aiaas-table' style='border-collapse:collapse;font-variant-numeric:tabular-nums;"
                     f"color:{_FG}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return (f"<div class='aiaas-snapshot' style='font-family:var(--jp-ui-font-family, sans-serif);font-size:12px;"
            f"color:{_FG}'>{''.join(parts)}</div>")


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
    if not _in_widget_frontend():
        return TextProgress()
    if mode == "html":
        return _HtmlReporter()
    return _WidgetReporter(stop)


# -- predictions ---------------------------------------------------------------------------

_MAX_ROWS = 10
_MAX_THUMBS = 24


def _png(pixels: Sequence[float], side: int) -> str:
    """A grayscale PNG as a data URI; pixels are scaled to their own min..max."""
    lo, hi = min(pixels), max(pixels)
    scale = 255 / (hi - lo) if hi > lo else 0
    raw = b"".join(b"\x00" + bytes(int((p - lo) * scale) for p in pixels[r * side:(r + 1) * side])
                   for r in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + b64encode(png).decode()


def _image_side(features: int) -> int | None:
    side = math.isqrt(features)
    return side if side * side == features and 8 <= side <= 64 else None


def _features(data: Any) -> Any:
    from ..engine.data import to_features

    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        data = data[0]
    if isinstance(data, str):
        from ..engine.datasets import load_builtin_dataset

        data = load_builtin_dataset(data)[0]
    X = to_features(data)
    return X.reshape(X.shape[0], -1)


def _predictions_view(data: Any, outputs: Any, classes: bool) -> tuple[str, str]:
    import torch

    out = torch.as_tensor(outputs).detach().cpu()
    n = out.shape[0]
    if classes or out.ndim == 1:
        labels = out.reshape(n, -1)[:, 0]
        columns, cells = ["predicted"], [[f"{labels[i].item():g}"] for i in range(min(n, _MAX_ROWS))]
        probs = None
    elif out.ndim == 2 and out.shape[1] > 1:
        probs = torch.softmax(out.float(), dim=1)
        p, labels = probs.max(dim=1)
        columns = ["predicted", "probability"]
        cells = [[str(int(labels[i])), f"{p[i].item():.3f}"] for i in range(min(n, _MAX_ROWS))]
    else:  # regression: the values themselves
        flat = out.reshape(n, -1)
        columns = [f"value {j}" for j in range(flat.shape[1])][:6] if flat.shape[1] > 1 else ["value"]
        cells = [[f"{v:.4g}" for v in flat[i, :6].tolist()] for i in range(min(n, _MAX_ROWS))]
        labels = None
    head = "".join(f"<th style='padding:1px 8px;text-align:right'>{c}</th>" for c in ["row", *columns])
    body = "".join("<tr>" + f"<td style='padding:1px 8px;text-align:right'>{i}</td>"
                   + "".join(f"<td style='padding:1px 8px;text-align:right'>{html.escape(c)}</td>" for c in row)
                   + "</tr>" for i, row in enumerate(cells))
    shown = f"first {len(cells)} of {n} rows" if n > len(cells) else f"{n} row{'s' if n != 1 else ''}"
    parts = [f"<div style='color:{_FG2}'>predictions: {shown}</div>",
             f"<table style='border-collapse:collapse;font-variant-numeric:tabular-nums'><thead><tr>{head}</tr>"
             f"</thead><tbody>{body}</tbody></table>"]
    text = f"predictions: {shown}\n" + "\n".join(f"{i:>4}  " + "  ".join(row) for i, row in enumerate(cells))
    if labels is not None:
        try:
            X = _features(data)
        except Exception:  # the view is a courtesy: data that is not an image simply has no thumbnails
            X = None
        side = _image_side(X.shape[1]) if X is not None and X.shape[0] == n else None
        if side:
            thumbs = []
            for i in range(min(n, _MAX_THUMBS)):
                caption = str(int(labels[i])) + (f" ({probs[i].max().item():.0%})" if probs is not None else "")
                thumbs.append(f"<figure style='margin:0;text-align:center'><img src='{_png(X[i].tolist(), side)}' "
                              f"width='56' height='56' style='image-rendering:pixelated;border:1px solid {_BORDER}' "
                              f"alt='row {i}'/><figcaption>{html.escape(caption)}</figcaption></figure>")
            parts.append(f"<div class='aiaas-thumbs' style='display:flex;flex-wrap:wrap;gap:6px;margin-top:6px'>"
                         f"{''.join(thumbs)}</div>")
    return text, (f"<div class='aiaas-predictions' style='font-family:var(--jp-ui-font-family, sans-serif);"
                  f"font-size:12px;color:{_FG}'>{''.join(parts)}</div>")


def show_predictions(data: Any, outputs: Any, *, classes: bool, mode: str = "auto") -> None:
    """A compact view of predictions: a table of the first rows (class and probability, or
    values), and a grid of labelled thumbnails when the inputs are square images."""
    from IPython.display import display

    text, markup = _predictions_view(data, outputs, classes)
    display({"text/plain": text, "text/html": markup}, raw=True)
