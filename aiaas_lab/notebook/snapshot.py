"""The static HTML snapshot of a run: status, bars, an SVG chart and the epoch table.

It travels in the widget's own output bundle beside the widget view, so a saved notebook shows the
final run on GitHub or in nbconvert, with no kernel and no JavaScript. Inline styles only (with
JupyterLab's theme variables and plain fallbacks), because a rendered notebook drops stylesheets.

It reads the run through `_Snapshotted`, the few members of `run_view._RunView` it needs, rather
than importing that module: the view's `html()` calls into here, so an import back would be a cycle.

Non-finite values (a diverged loss, an overflowed validation loss) read "NaN", "inf" and "-inf"
in the figures and the table, like the live widget. A chart skips them, so its axis stays finite,
and marks with a labelled rule where each kind first appears on a line (js/src/chart.js does the
same for the live view).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any, Protocol

from .._format import format_metric
from ..engine.events import RunStarted

__all__ = ["snapshot_html"]

_COLORS = {"train": "var(--jp-brand-color1, #1976d2)", "val": "var(--jp-warn-color1, #f57c00)"}
_FG, _FG2 = "var(--jp-ui-font-color1, #212121)", "var(--jp-ui-font-color2, #616161)"
_BORDER = "var(--jp-border-color2, #e0e0e0)"
_ERROR = "var(--jp-error-color1, #d32f2f)"
_TABLE_ROWS = 50  # epoch rows in the snapshot's table; the chart draws as many as the live view


class _Snapshotted(Protocol):
    status: str
    started: RunStarted | None
    epoch_step: int
    series: Any  # run_view._Series: .points() -> (steps, losses)
    history: list[dict[str, float]]

    def status_line(self) -> str: ...
    def figures(self) -> str: ...
    def epochs_done(self) -> int: ...
    def columns(self) -> list[str]: ...
    def rows(self, limit: int = ...) -> list[dict[str, float]]: ...


def _ema(values: Sequence[float], weight: float = 0.8) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _marks(lines: list[tuple[Sequence[float], Sequence[float], str, float, bool]]) -> list[tuple[float, str, str]]:
    """(x, label, colour) where each line first has each kind of non-finite value, once per place."""
    out: dict[tuple[float, str], str] = {}
    for xs, ys, color, *_ in lines:
        seen: set[str] = set()
        for x, y in zip(xs, ys):
            if not math.isfinite(y) and math.isfinite(x) and (label := format_metric(y)) not in seen:
                seen.add(label)
                out.setdefault((x, label), color)
    return [(x, label, color) for (x, label), color in out.items()]


def _svg_chart(title: str, lines: list[tuple[Sequence[float], Sequence[float], str, float, bool]],
               width: int = 300, height: int = 150) -> str:
    """A small SVG line chart; each line is (xs, ys, colour, opacity, dots)."""
    finite = [(x, y) for xs, ys, *_ in lines for x, y in zip(xs, ys) if math.isfinite(y)]
    marks = _marks(lines)
    pad_l, pad_r, pad_t, pad_b = 44, 8, 18, 18
    body = [f"<text x='{pad_l}' y='12' style='fill:{_FG2};font-size:11px'>{html.escape(title)}</text>"]
    if finite or marks:
        xs_all = [p[0] for p in finite] + [m[0] for m in marks]
        x0, x1 = min(xs_all), max(xs_all)
        # With no finite value at all there are only marks to draw: no y axis, no points.
        y0, y1 = (min(p[1] for p in finite), max(p[1] for p in finite)) if finite else (0.0, 1.0)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-6)

        def sx(x: float) -> float:
            return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

        def sy(y: float) -> float:
            return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

        for value in (y0, (y0 + y1) / 2, y1) if finite else ():
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
        for x, label, color in marks:
            at, right = sx(x), sx(x) > (pad_l + width - pad_r) / 2
            # -inf is below every value, NaN and inf above: the label sits at that edge.
            y = height - pad_b - 3 if label == "-inf" else pad_t + 10
            body.append(f"<line x1='{at:.1f}' x2='{at:.1f}' y1='{pad_t}' y2='{height - pad_b}' "
                        f"style='stroke:{_ERROR};stroke-dasharray:3 3;opacity:0.6'/>"
                        f"<text class='aiaas-nonfinite' x='{at + (-3 if right else 3):.1f}' y='{y}' "
                        f"text-anchor='{'end' if right else 'start'}' style='fill:{_ERROR};font-size:10px;"
                        f"font-weight:600'>{label}</text>")
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


def snapshot_html(view: _Snapshotted) -> str:
    s = view.started
    color = {"failed": _ERROR, "stopped": "var(--jp-warn-color1, #f57c00)",
             "completed": "var(--jp-success-color1, #388e3c)"}.get(view.status, _FG)
    parts = [f"<div style='color:{color};font-weight:600'>{html.escape(view.status_line())}</div>"]
    if s is not None:
        epochs = s.epochs
        parts.append(_bar(f"epoch {view.epochs_done()}/{epochs}", view.epochs_done() / epochs if epochs else 0))
        spe = s.steps_per_epoch
        parts.append(_bar(f"step {view.epoch_step}/{spe}", view.epoch_step / spe if spe else 0))
        parts.append(f"<div style='color:{_FG2};margin:4px 0'>{html.escape(view.figures())}</div>")
    steps, losses = view.series.points()
    # The smoothed line averages the finite points only: one NaN would make the rest NaN, and the
    # raw line already marks it.
    finite_steps = [x for x, y in zip(steps, losses) if math.isfinite(y)]
    smooth = _ema([y for y in losses if math.isfinite(y)])
    loss_lines = [(steps, losses, _COLORS["train"], 0.3, False), (finite_steps, smooth, _COLORS["train"], 1.0, False)]
    rows = view.rows()  # as many as the live view draws
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
            + "".join(f"<td style='padding:1px 8px;text-align:right'>{format_metric(r.get(c))}</td>" for c in columns)
            + "</tr>" for r in view.rows(_TABLE_ROWS))
        parts.append(f"<table class='aiaas-table' style='border-collapse:collapse;font-variant-numeric:tabular-nums;"
                     f"color:{_FG}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return (f"<div class='aiaas-snapshot' style='font-family:var(--jp-ui-font-family, sans-serif);font-size:12px;"
            f"color:{_FG}'>{''.join(parts)}</div>")
