"""Built-in data sets: ones that ship with a package or that the code makes, never downloads."""

from __future__ import annotations

import math

import torch

__all__ = ["BUILTIN_DATASETS", "load_builtin_dataset", "synthetic_mnist"]

BUILTIN_DATASETS = ("digits", "synthetic-mnist")


def load_builtin_dataset(name: str, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "digits":
        return _digits()
    if name in ("synthetic-mnist", "synthetic_mnist"):
        return synthetic_mnist(seed=0 if seed is None else seed)
    raise KeyError(name)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def synthetic_mnist(
    n: int = 60_000, seed: int = 0, classes: int = 10, side: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST-shaped set (n x side*side floats in [0, 1], `classes` labels), deterministic in `seed`.

    Each class is drawn from a few "writing styles": smooth stroke-like templates made of
    Gaussian blobs along a random curve. Samples get a random one-pixel shift, stroke intensity and pixel
    noise, so a linear model does well but not perfectly and an MLP does better: learnable,
    never trivial.
    """
    g = torch.Generator().manual_seed(seed)
    styles = 3
    coords = torch.arange(side, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    templates = torch.zeros(classes, styles, side, side)
    for c in range(classes):
        for s in range(styles):
            # A curve through a few random control points, drawn as a chain of soft blobs.
            points = torch.rand(4, 2, generator=g) * (side * 0.6) + side * 0.2
            t = torch.linspace(0, 1, 24)
            a, b, cc, d = points
            curve = ((1 - t) ** 3)[:, None] * a + (3 * (1 - t) ** 2 * t)[:, None] * b
            curve = curve + (3 * (1 - t) * t**2)[:, None] * cc + (t**3)[:, None] * d
            for py, px in curve:
                templates[c, s] += torch.exp(-((yy - py) ** 2 + (xx - px) ** 2) / 3.0)
    templates = templates / templates.amax(dim=(-1, -2), keepdim=True)

    y = torch.randint(0, classes, (n,), generator=g)
    style = torch.randint(0, styles, (n,), generator=g)
    X = templates[y, style]  # n x side x side
    # Shift by up to a pixel in each direction, in a few groups to keep this fast.
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if mask.any():
                X[mask] = torch.roll(X[mask], shifts=(dy, dx), dims=(1, 2))
    intensity = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
    X = X * intensity + 0.2 * torch.randn(n, side, side, generator=g)
    X = X.clamp_(0.0, 1.0).reshape(n, side * side)
    assert math.isqrt(X.shape[1]) == side
    return X.contiguous(), y
