"""The compact view of predictions that `%aiaas predict` shows: a table of the first rows (class
and probability, or values), and labelled thumbnails when the inputs are square images.

Static HTML and text only, no widget: predictions do not change once shown, and a saved notebook
should render them anywhere. The PNG thumbnails are encoded by hand (a few lines of zlib) so that
showing them needs no imaging library.
"""

from __future__ import annotations

import html
import math
import struct
import zlib
from base64 import b64encode
from collections.abc import Sequence
from typing import Any

from .snapshot import _BORDER, _FG, _FG2

__all__ = ["show_predictions"]

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


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _predictions_view(data: Any, outputs: Any, classes: bool) -> tuple[str, str]:
    import torch

    out = None if classes else torch.as_tensor(outputs).detach().cpu()
    if out is None or out.ndim == 1:
        # Labels in the training targets' own values: indices (a tensor) or the original labels
        # (a NumPy array, strings included).
        labels = [v.item() if hasattr(v, "item") else v for v in list(outputs)]
        n = len(labels)
        columns, cells = ["predicted"], [[_label(labels[i])] for i in range(min(n, _MAX_ROWS))]
        probs = None
    elif out.ndim == 2 and out.shape[1] > 1:
        n = out.shape[0]
        probs = torch.softmax(out.float(), dim=1)
        p, indices = probs.max(dim=1)
        labels = indices.tolist()
        columns = ["predicted", "probability"]
        cells = [[str(labels[i]), f"{p[i].item():.3f}"] for i in range(min(n, _MAX_ROWS))]
    else:  # regression: the values themselves
        n = out.shape[0]
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
                caption = _label(labels[i]) + (f" ({probs[i].max().item():.0%})" if probs is not None else "")
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
