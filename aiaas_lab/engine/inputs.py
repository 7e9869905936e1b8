"""What training learned about its inputs, as one serialisable object that travels with the model.

Predicting must see inputs exactly as training did: the same DataFrame columns, the same one-hot
categories (whatever rows are passed, one row included), the same normalisation, and the
training targets' own labels. `Preprocessing` holds all of it; it is in every `TrainResult`, in
checkpoints and in the server's model metadata (`to_dict`/`from_dict`, plain JSON), so local
predict, remote predict, `%aiaas attach` and `--resume` apply the same thing.

A category not seen in training encodes as all zeros, as scikit-learn's OneHotEncoder does with
`handle_unknown="ignore"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import BadArgument, describe

__all__ = ["Normalizer", "Preprocessing", "encode_frame", "fit_categories", "is_pandas", "to_features",
           "prediction_inputs", "features"]


def is_pandas(obj: object, kind: str) -> bool:
    module = type(obj).__module__
    return module.startswith("pandas") and type(obj).__name__ == kind


@dataclass
class Normalizer:
    """Feature standardisation with statistics from the training split only."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, X: torch.Tensor) -> Normalizer:
        mean = X.mean(dim=0)
        std = X.std(dim=0) if X.shape[0] > 1 else torch.ones_like(mean)
        # Constant features (a digit image's blank border) must pass through, not become NaN.
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        return cls(mean, std)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.mean.to(X.device)) / self.std.to(X.device)


def fit_categories(df: Any) -> dict[str, list[str]]:
    """The text columns of a DataFrame and their categories, sorted (what one-hot encoding uses)."""
    import pandas as pd

    categories: dict[str, list[str]] = {}
    for column in df.columns:
        series = df[column]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            continue
        categories[str(column)] = sorted({str(v) for v in series.dropna().tolist()})
    return categories


def encode_frame(df: Any, columns: list[str], categories: dict[str, list[str]], argument: str = "--data") -> torch.Tensor:
    """The features of `df` as training encoded them: numeric columns in training order, then one
    0/1 column per (text column, category). Missing columns are an error; extra ones are ignored."""
    import numpy as np

    names = [str(c) for c in df.columns]
    missing = [c for c in columns if c not in names]
    if missing:
        raise BadArgument(argument, f"the columns the model was trained on ({', '.join(columns[:12])})",
                          f"a DataFrame without {', '.join(map(repr, missing[:5]))}")
    frame = df.rename(columns=str)
    numeric = [c for c in columns if c not in categories]
    parts = []
    if numeric:
        try:
            parts.append(frame[numeric].to_numpy(dtype=np.float32, na_value=np.nan))
        except (TypeError, ValueError) as exc:
            raise BadArgument(argument, f"numbers in the columns {', '.join(numeric[:12])}",
                              f"values that are not ({exc})") from None
    for column, values in categories.items():
        text = frame[column].astype(object).where(frame[column].notna(), None).map(
            lambda v: None if v is None else str(v)).to_numpy()
        parts.append(np.stack([text == value for value in values], axis=1).astype(np.float32)
                     if values else np.zeros((len(frame), 0), dtype=np.float32))
    X = np.concatenate(parts, axis=1) if parts else np.zeros((len(frame), 0), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(X))


def to_features(obj: Any, argument: str = "--data") -> torch.Tensor:
    """Features as a float32 tensor, from a tensor, NumPy array, pandas object or nested list."""
    if isinstance(obj, torch.Tensor):
        X = obj.detach()
    elif is_pandas(obj, "DataFrame"):
        X = _frame_to_tensor(obj, argument)
    elif is_pandas(obj, "Series"):
        X = _frame_to_tensor(obj.to_frame(), argument)
    else:
        import numpy as np

        try:
            arr = np.asarray(obj)
        except Exception as exc:  # ragged lists and the like
            raise BadArgument(argument, "numeric features (a tensor, NumPy array or DataFrame)",
                              f"{describe(obj)} that cannot become an array ({exc})") from None
        if arr.dtype.kind in "OUS":
            try:
                arr = arr.astype(np.float32)
            except (TypeError, ValueError):
                raise BadArgument(argument, "numeric features",
                                  f"an array of {arr.dtype} values such as {arr.flat[0]!r}",
                                  "Encode text columns as numbers first, or pass a DataFrame "
                                  "(its text columns are one-hot encoded).") from None
        if arr.dtype.kind not in "biuf":
            raise BadArgument(argument, "numeric features", f"an array of dtype {arr.dtype}")
        X = torch.from_numpy(np.ascontiguousarray(arr))
    if X.dtype != torch.float32:
        X = X.to(torch.float32)
    if X.ndim == 0:
        raise BadArgument(argument, "one row per sample", "a single number")
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    return X


def _frame_to_tensor(df: Any, argument: str) -> torch.Tensor:
    # One-hot encoding is what users expect of a DataFrame with a few categorical columns; the
    # training split's categories are kept (Prepared.categories) so predict encodes the same way.
    return encode_frame(df, [str(c) for c in df.columns], fit_categories(df), argument)


@dataclass
class Preprocessing:
    """What predict must do to raw inputs to match training, and how to name its outputs."""

    task: str
    normalizer: Normalizer | None = None
    classes: list[Any] | None = None  # the original labels, when they were not 0..K-1 integers
    columns: list[str] | None = None  # a DataFrame's feature columns, in training order
    categories: dict[str, list[str]] = field(default_factory=dict)  # text column -> its categories
    input_shape: list[int] = field(default_factory=list)  # one sample's shape after encoding
    output_size: int = 0

    @property
    def feature_names(self) -> list[str] | None:
        """Names of the encoded features: `column` for numbers, `column=value` for categories."""
        if self.columns is None:
            return None
        return ([c for c in self.columns if c not in self.categories]
                + [f"{c}={v}" for c, values in self.categories.items() for v in values])

    def features(self, data: Any, argument: str = "--data") -> torch.Tensor:
        """Raw inputs (what training was given, any subset of rows) as the model's input tensor,
        normalisation included."""
        if self.columns is not None and is_pandas(data, "Series"):
            # A column (df["income"], for a one-feature model) or one row (df.iloc[0]).
            data = data.to_frame() if str(data.name) in self.columns else data.to_frame().T
        if self.columns is not None and is_pandas(data, "DataFrame"):
            X = encode_frame(data, self.columns, self.categories, argument)
        else:
            X = to_features(data, argument)
        if X.shape[0] == 0:
            raise BadArgument(argument, "at least one row", "an empty input (0 rows)")
        expected = math.prod(self.input_shape) if self.input_shape else None
        if expected is not None and math.prod(X.shape[1:]) != expected:
            raise BadArgument(argument, f"{expected} features per row, as in training",
                              f"{math.prod(X.shape[1:])} (shape {tuple(X.shape)})")
        if self.input_shape and tuple(X.shape[1:]) != tuple(self.input_shape):
            X = X.reshape(X.shape[0], *self.input_shape)
        return self.normalize(X)

    def normalize(self, X: torch.Tensor) -> torch.Tensor:
        if self.normalizer is None:
            return X
        return self.normalizer(X.reshape(X.shape[0], -1)).reshape(X.shape)

    def labels(self, scores: torch.Tensor) -> Any:
        """Predicted labels in the training targets' own values: class indices (int64) when the
        labels were 0..K-1, else a NumPy array of the original labels."""
        if self.task != "classification":
            raise BadArgument("--classes", "a classification model (trained on class labels)",
                              "a regression model, whose outputs are values, not classes",
                              "Drop --classes to get the predicted values.")
        indices = class_indices(scores)
        if self.classes is None:
            return indices
        import numpy as np

        return np.asarray(self.classes)[indices.numpy()]

    def to_dict(self) -> dict[str, Any]:
        n = self.normalizer
        return {"task": self.task, "classes": self.classes, "columns": self.columns,
                "categories": self.categories, "input_shape": list(self.input_shape),
                "output_size": self.output_size,
                "normalizer": None if n is None else {"mean": n.mean.tolist(), "std": n.std.tolist()}}

    @classmethod
    def from_dict(cls, info: dict[str, Any]) -> Preprocessing:
        stats = info.get("normalizer")
        normalizer = (Normalizer(torch.tensor(stats["mean"], dtype=torch.float32),
                                 torch.tensor(stats["std"], dtype=torch.float32)) if stats else None)
        return cls(task=info.get("task") or "classification", normalizer=normalizer, classes=info.get("classes"),
                   columns=info.get("columns"), categories=info.get("categories") or {},
                   input_shape=[int(d) for d in info.get("input_shape") or []],
                   output_size=int(info.get("output_size") or 0))


def class_indices(scores: torch.Tensor) -> torch.Tensor:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise BadArgument("--classes", "a model with one output per class",
                          f"outputs of shape {tuple(scores.shape)}", "Drop --classes to get the raw outputs.")
    return scores.argmax(dim=1)


def prediction_inputs(data: Any) -> Any:
    """What predict was given, as raw inputs: X of an (X, y) pair, a built-in data set's X."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        return data[0]
    if isinstance(data, str):
        from .datasets import BUILTIN_DATASETS, load_builtin_dataset

        if data.replace("_", "-") not in BUILTIN_DATASETS:
            raise BadArgument("--data", f"features or a built-in data set ({', '.join(BUILTIN_DATASETS)})", repr(data))
        return load_builtin_dataset(data.replace("_", "-"))[0]
    return data


def features(data: Any, preprocessing: Preprocessing | None) -> torch.Tensor:
    """The model's input tensor for raw inputs: as training saw them where it is known, else as
    they come (numbers, one row per sample)."""
    if preprocessing is not None:
        return preprocessing.features(data)
    X = to_features(data)
    if X.shape[0] == 0:
        raise BadArgument("--data", "at least one row", "an empty input (0 rows)")
    return X
