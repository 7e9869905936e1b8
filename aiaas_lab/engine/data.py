"""Turning what a user passes as data into tensors the engine can train on.

In-memory data (tensors, NumPy, pandas) becomes one float32 feature tensor and one target tensor;
it is validated once here so the training loop never has to look at it again. Dataset and
DataLoader objects are used as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import BUILTIN_DATASETS, load_builtin_dataset
from .._errors import BadArgument, describe
from .inputs import Normalizer, Preprocessing, encode_frame, fit_categories, is_pandas, to_features

__all__ = ["InMemory", "Prepared", "Normalizer", "prepare_data", "to_features", "check_normalizable"]

Task = Literal["classification", "regression"]


@dataclass
class InMemory:
    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.X.shape[0]


@dataclass
class Prepared:
    train: InMemory | DataLoader
    val: InMemory | DataLoader | None
    task: Task
    num_classes: int | None  # None for regression
    input_shape: tuple[int, ...]  # one sample's shape
    output_size: int
    classes: list[Any] | None = None  # original labels when they were not 0..C-1 integers
    normalizer: Normalizer | None = None
    columns: list[str] | None = None  # a DataFrame's feature columns
    categories: dict[str, list[str]] = field(default_factory=dict)  # its text columns' categories

    def preprocessing(self) -> Preprocessing:
        """What predict needs to see inputs as this training did."""
        return Preprocessing(task=self.task, normalizer=self.normalizer, classes=self.classes,
                             columns=self.columns, categories=dict(self.categories),
                             input_shape=list(self.input_shape), output_size=self.output_size)


def _to_targets(obj: Any, loss: str) -> tuple[torch.Tensor, list[Any] | None]:
    """Targets as int64 class indices (classification) or float32 values (regression)."""
    import numpy as np

    if isinstance(obj, torch.Tensor):
        y = obj.detach()
        labels = None
    else:
        if is_pandas(obj, "DataFrame"):
            arr = obj.to_numpy()
            if arr.shape[1] == 1:
                arr = arr[:, 0]
        elif is_pandas(obj, "Series"):
            arr = obj.to_numpy()
        else:
            arr = np.asarray(obj)
        labels = None
        if arr.dtype.kind == "O":
            import pandas as pd

            missing = pd.isna(arr)
            if missing.any():  # "nan" or "None" must not become a class of its own
                first = int(missing.nonzero()[0][0])
                raise BadArgument("--target", "a label for every sample",
                                  f"{int(missing.sum())} missing label{'s' if missing.sum() > 1 else ''} "
                                  f"(first at row {first})", "Drop or impute them first, e.g. df.dropna().")
        if arr.dtype.kind in "OUSb" and arr.dtype.kind != "b":
            if loss == "mse":
                raise BadArgument("--target", "numbers for regression (--loss mse)",
                                  f"text labels such as {arr.flat[0]!r}",
                                  "Use --loss cross_entropy (or auto) to classify them.")
            try:
                uniques, codes = np.unique(arr.astype(str), return_inverse=True)
            except Exception:
                raise BadArgument("--target", "labels of one kind", f"mixed values in {describe(obj)}") from None
            labels = uniques.tolist()
            arr = codes.reshape(arr.shape)
        y = torch.from_numpy(np.array(arr, copy=not arr.flags.writeable, order="C"))  # pandas may hand out read-only arrays
    if y.dtype == torch.bool:
        y = y.to(torch.int64)
    if loss == "cross_entropy" and y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise BadArgument("--loss", "whole-number class labels for cross_entropy",
                              f"fractional targets such as {y.flatten()[(y != y.round()).flatten()][0].item():g}")
        y = y.to(torch.int64)
    if loss == "mse" and not y.is_floating_point():
        y = y.to(torch.float32)
    if y.is_floating_point():
        y = y.to(torch.float32)
        if y.ndim == 1:
            y = y.reshape(-1, 1)
    else:
        y = y.to(torch.int64)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.ndim != 1:
            raise BadArgument("--data", "one class label per sample",
                              f"integer targets of shape {tuple(y.shape)}",
                              "Pass float targets for multi-output regression.")
    return y, labels


def _check_finite(t: torch.Tensor, what: str) -> None:
    # The sum is a cheap screen (one pass, no temporary); only when it is not finite do we pay
    # for locating the bad values. Overflow of a huge but finite set also lands here, which the
    # exact check below then clears.
    if not t.is_floating_point() or t.numel() == 0 or math.isfinite(t.sum().item()):
        return
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count == 0:
        return
    where = bad.nonzero()[0].tolist()
    nans = int(torch.isnan(t).sum())
    kinds = " and ".join(k for k, n in (("NaN", nans), ("infinite", count - nans)) if n)
    position = f"row {where[0]}" + (f", column {where[1]}" if len(where) > 1 else "")
    raise BadArgument("--data", f"finite numbers in {what}",
                      f"{count} {kinds} value{'s' if count > 1 else ''} (first at {position})",
                      "Drop or impute them first, e.g. df.dropna() or sklearn's SimpleImputer.")


@dataclass
class _Frame:
    """How a training DataFrame's features were encoded: reused for --val and by predict."""

    columns: list[str]
    categories: dict[str, list[str]]


def _split_pair(data: Any, target: str | None, loss: str, argument: str,
                frame: _Frame | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Any] | None, _Frame | None]:
    if is_pandas(data, "DataFrame"):
        if target is None:
            raise BadArgument("--target", "the name of the target column for a DataFrame",
                              "no --target", f"Columns: {', '.join(map(str, data.columns[:12]))}.")
        if target not in data.columns:
            from .._errors import close_matches

            raise BadArgument("--target", "a column of the DataFrame", f"{target!r}",
                              close_matches(str(target), map(str, data.columns))
                              or f"Columns: {', '.join(map(str, data.columns[:12]))}.")
        features = data.drop(columns=[target])
        if frame is None:
            frame = _Frame([str(c) for c in features.columns], fit_categories(features))
        X = encode_frame(features, frame.columns, frame.categories, argument)
        y, labels = _to_targets(data[target], loss)
        return X, y, labels, frame
    if isinstance(data, (tuple, list)) and len(data) == 2:
        if is_pandas(data[0], "DataFrame"):
            features = data[0]
            if frame is None:
                frame = _Frame([str(c) for c in features.columns], fit_categories(features))
            X = encode_frame(features, frame.columns, frame.categories, argument)
        else:
            X = to_features(data[0], argument)
        y, labels = _to_targets(data[1], loss)
        return X, y, labels, frame
    raise BadArgument(argument, "(X, y), a DataFrame with --target, a Dataset, a DataLoader or a "
                      f"built-in name ({', '.join(BUILTIN_DATASETS)})", describe(data))


def _validate_pair(X: torch.Tensor, y: torch.Tensor, argument: str) -> None:
    if X.shape[0] == 0:
        raise BadArgument(argument, "at least one sample", "an empty data set (0 rows)")
    if X.shape[0] != y.shape[0]:
        raise BadArgument(argument, "X and y with the same number of rows",
                          f"X with {X.shape[0]} rows and y with {y.shape[0]}")
    _check_finite(X, "X" if argument == "--data" else f"{argument} X")
    _check_finite(y, "y" if argument == "--data" else f"{argument} y")


def _stratified_split(y: torch.Tensor | None, n: int, fraction: float, seed: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if task == "classification" and y is not None:
        val_parts, train_parts = [], []
        for cls in torch.unique(y):
            idx = (y == cls).nonzero().reshape(-1)
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            k = int(round(idx.numel() * fraction))
            k = min(k, idx.numel() - 1)  # every class keeps at least one training sample
            val_parts.append(idx[:k])
            train_parts.append(idx[k:])
        train_idx, val_idx = torch.cat(train_parts), torch.cat(val_parts)
        return train_idx.sort().values, val_idx.sort().values
    perm = torch.randperm(n, generator=g)
    k = int(round(n * fraction))
    return perm[k:].sort().values, perm[:k].sort().values


def _task_of(y: torch.Tensor) -> Task:
    return "regression" if y.is_floating_point() else "classification"


def prepare_data(
    data: Any,
    *,
    val: Any = None,
    target: str | None = None,
    loss: str = "auto",
    normalize: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> Prepared:
    if isinstance(data, str):
        if data not in BUILTIN_DATASETS and data.replace("_", "-") not in BUILTIN_DATASETS:
            from .._errors import close_matches

            raise BadArgument("--data", f"data or a built-in data set ({', '.join(BUILTIN_DATASETS)})",
                              f"{data!r}", close_matches(data, BUILTIN_DATASETS))
        data = load_builtin_dataset(data, seed)

    if isinstance(data, (DataLoader, Dataset)):
        check_normalizable(data, normalize)
        return _prepare_loaders(data, val, loss, batch_size, seed)

    X, y, labels, frame = _split_pair(data, target, loss, "--data")
    _validate_pair(X, y, "--data")
    task = _task_of(y)
    if task == "classification" and int(y.min()) < 0:
        raise BadArgument("--data", "class labels 0, 1, 2, ...", f"a negative label ({int(y.min())})")

    train, valset = InMemory(X, y), None
    if val is not None and not (isinstance(val, float) or isinstance(val, int) and not isinstance(val, bool)):
        vX, vy, vlabels, _ = _split_pair(val, target, loss, "--val", frame)
        _validate_pair(vX, vy, "--val")
        if vX.shape[1:] != X.shape[1:]:
            raise BadArgument("--val", f"samples shaped like the training data {tuple(X.shape[1:])}",
                              f"{tuple(vX.shape[1:])}")
        if labels is not None and vlabels is not None:
            index = {label: i for i, label in enumerate(labels)}
            unknown = [v for v in vlabels if v not in index]
            if unknown:
                raise BadArgument("--val", "labels seen in the training data", f"{unknown[0]!r}")
            vy = torch.tensor([index[vlabels[i]] for i in vy.tolist()], dtype=torch.int64)
        valset = InMemory(vX, vy)
    elif val is not None:
        fraction = float(val)
        if not 0.0 < fraction < 1.0:
            raise BadArgument("--val", "a fraction between 0 and 1 (or validation data)", f"{val}")
        if X.shape[0] < 2:
            raise BadArgument("--val", "at least 2 samples to split", f"{X.shape[0]}")
        train_idx, val_idx = _stratified_split(y if task == "classification" else None,
                                               X.shape[0], fraction, seed, task)
        if len(val_idx) == 0 or len(train_idx) == 0:
            left = "no validation row" if len(val_idx) == 0 else "no training row"
            raise BadArgument("--val", f"a fraction that leaves rows for both training and validation "
                              f"({X.shape[0]} rows here)", f"{val}, which leaves {left}",
                              "Use a larger fraction, or pass validation data.")
        train, valset = InMemory(X[train_idx], y[train_idx]), InMemory(X[val_idx], y[val_idx])

    normalizer = None
    if normalize:
        flat = train.X.reshape(train.X.shape[0], -1)
        normalizer = Normalizer.fit(flat)
        train = InMemory(normalizer(flat).reshape(train.X.shape), train.y)
        if valset is not None:
            vflat = valset.X.reshape(valset.X.shape[0], -1)
            valset = InMemory(normalizer(vflat).reshape(valset.X.shape), valset.y)

    if task == "classification":
        num_classes = len(labels) if labels is not None else int(y.max()) + 1
        output_size = num_classes
    else:
        num_classes, output_size = None, int(y.shape[1])
    return Prepared(train=train, val=valset, task=task, num_classes=num_classes,
                    input_shape=tuple(X.shape[1:]), output_size=output_size, classes=labels,
                    normalizer=normalizer, columns=frame.columns if frame else None,
                    categories=frame.categories if frame else {})


def check_normalizable(data: Any, normalize: bool) -> None:
    """--normalize fits statistics on in-memory training rows; a Dataset is read lazily, item by
    item, and is used as given. Refused alike on every launcher."""
    if normalize and isinstance(data, (DataLoader, Dataset)):
        raise BadArgument("--normalize", "in-memory data (tensors, arrays, a DataFrame) to fit the statistics on",
                          describe(data), "Normalise inside the Dataset, or pass the tensors themselves.")


def _prepare_loaders(data: DataLoader | Dataset, val: Any, loss: str, batch_size: int, seed: int) -> Prepared:
    g = torch.Generator().manual_seed(seed)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        first = dataset[0]
    except Exception as exc:
        raise BadArgument("--data", "a Dataset whose items are (x, y) pairs",
                          f"{describe(dataset)} whose first item raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise BadArgument("--data", "a Dataset whose items are (x, y) pairs", f"items of type {describe(first)}")
    x0, y0 = (torch.as_tensor(v) for v in first)
    task: Task = "regression" if (y0.is_floating_point() or loss == "mse") and loss != "cross_entropy" else "classification"

    valset: DataLoader | None = None
    if isinstance(val, float) and isinstance(data, Dataset):
        n = len(data)
        k = int(round(n * val))
        data, vds = torch.utils.data.random_split(data, [n - k, k], generator=g)
        valset = DataLoader(vds, batch_size=max(batch_size, 256))
    elif isinstance(val, (Dataset, DataLoader)):
        valset = val if isinstance(val, DataLoader) else DataLoader(val, batch_size=max(batch_size, 256))
    elif val is not None:
        raise BadArgument("--val", "a Dataset or DataLoader (or a fraction with a Dataset)", describe(val))
    train = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)

    if task == "classification":
        num_classes = _count_classes(dataset)
        output_size = num_classes
    else:
        num_classes, output_size = None, int(y0.numel()) if y0.ndim else 1
    return Prepared(train=train, val=valset, task=task, num_classes=num_classes,
                    input_shape=tuple(x0.shape), output_size=output_size)


def _count_classes(dataset: Any) -> int:
    # Datasets often know their targets; scanning a large one item by item would be slow.
    targets = getattr(dataset, "targets", None)
    if targets is None and hasattr(dataset, "tensors") and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    if targets is not None:
        return int(torch.as_tensor(targets).max()) + 1
    return int(max(int(torch.as_tensor(dataset[i][1])) for i in range(min(len(dataset), 10_000)))) + 1
