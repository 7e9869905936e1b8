"""Numbers and tables as people read them, shared by the text progress, the widget's snapshot and
the result's repr. Non-finite values print as NaN / inf / -inf rather than raising."""

from __future__ import annotations

import math

__all__ = ["format_duration", "format_rate", "format_metric", "history_table"]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float) -> str:
    if per_second >= 1e6:
        return f"{per_second / 1e6:.1f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k"
    return f"{per_second:.0f}"


def format_metric(value: float | None) -> str:
    """A loss or accuracy to four places; NaN and infinities by name."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4f}"


def history_table(history: list[dict[str, float]], limit: int = 12) -> str:
    """A small fixed-width table of per-epoch metrics; long runs show the first and last rows."""
    if not history:
        return "(no completed epoch)"
    columns = ["epoch"] + [k for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in history[-1]]
    rows = history if len(history) <= limit else history[: limit // 2] + [{}] + history[-(limit // 2):]
    width = {c: max(len(c), 7) for c in columns}
    lines = ["  ".join(c.rjust(width[c]) for c in columns)]
    for row in rows:
        if not row:
            lines.append("  ".join("...".rjust(width[c]) for c in columns))
            continue
        cells = []
        for c in columns:
            value = row.get(c)
            text = "" if value is None else (str(int(value)) if c == "epoch" else format_metric(value))
            cells.append(text.rjust(width[c]))
        lines.append("  ".join(cells))
    return "\n".join(lines)
