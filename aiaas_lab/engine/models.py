"""Built-in architectures, built from a name and a small JSON-able config.

A config is all it takes to rebuild the same module elsewhere (the remote server builds these by
name, without running any code a client sent).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["BUILTIN_MODELS", "build_model", "model_spec", "first_layer_inputs"]

BUILTIN_MODELS = ("mlp", "cnn", "linear")


def model_spec(name: str, input_shape: tuple[int, ...], output_size: int) -> dict[str, Any]:
    """The config for a built-in model sized to the data."""
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    config: dict[str, Any] = {"input_shape": list(input_shape), "output_size": output_size}
    if name == "mlp":
        config["hidden"] = [128, 64]  # the classic 784-128-64-10 shape
    return {"name": name, "config": config}


def build_model(spec: dict[str, Any]) -> nn.Module:
    name, config = spec["name"], spec["config"]
    input_shape = tuple(int(d) for d in config["input_shape"])
    output_size = int(config["output_size"])
    features = math.prod(input_shape)
    flatten = [nn.Flatten()] if len(input_shape) > 1 else []
    if name == "linear":
        return nn.Sequential(*flatten, nn.Linear(features, output_size))
    if name == "mlp":
        layers: list[nn.Module] = list(flatten)
        width = features
        for hidden in config.get("hidden", [128, 64]):
            layers += [nn.Linear(width, int(hidden)), nn.ReLU()]
            width = int(hidden)
        layers.append(nn.Linear(width, output_size))
        return nn.Sequential(*layers)
    if name == "cnn":
        return _cnn(input_shape, output_size)
    raise KeyError(name)


def _cnn(input_shape: tuple[int, ...], output_size: int) -> nn.Module:
    layers: list[nn.Module] = []
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValueError(f"cnn needs image-shaped samples; {input_shape[0]} features are not a square image")
        layers.append(nn.Unflatten(1, (1, side, side)))
        channels = 1
    elif len(input_shape) == 2:
        layers.append(nn.Unflatten(1, (1, *input_shape)))
        channels = 1
    else:
        channels = input_shape[0]
    # Adaptive pooling keeps the head the same size for 8x8 digits and 28x28 MNIST alike.
    layers += [
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 16, 64), nn.ReLU(),
        nn.Linear(64, output_size),
    ]
    return nn.Sequential(*layers)


def first_layer_inputs(model: nn.Module) -> tuple[str, int] | None:
    """(description, features) of the first Linear layer when it is the model's first real layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return f"Linear(in_features={module.in_features}, ...)", module.in_features
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.RNNBase)):
            return None
    return None
