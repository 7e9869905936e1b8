"""The one preparation of a run and the one model loader.

Every place a job turns into something trainable (the kernel, `aiaas_lab.worker`, the server's
runner) and every place a trained model is rebuilt (the server's registry, remote results) goes
through here, so a partial built-in config, a model that does not fit the data or a module sent
as a graph behaves the same wherever the loop runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._errors import AiaasError, BadArgument, close_matches, describe
from .data import InMemory, Prepared, prepare_data
from .inputs import Preprocessing
from .checkpoint import check_resumable, read_state
from .job import Job, check_combination, seeded
from .loop import TrainConfig, resolve_device
from .models import BUILTIN_MODELS, build_model, first_layer_inputs, model_spec

__all__ = ["PreparedRun", "prepare", "load_model", "MAX_LAYER_WIDTH"]

# Built-in layers a job may ask for: wide enough for any tabular or image model this tool
# trains, small enough that one job cannot ask the server for a terabyte of weights.
MAX_LAYER_WIDTH = 65_536
_MAX_PARAMETERS = 500_000_000


@dataclass
class PreparedRun:
    """A job made ready: the module to train (in place), the checked data, the loop's settings,
    the built-in spec (None for a user's module) and what predict will need."""

    module: nn.Module
    data: Prepared
    config: TrainConfig
    spec: dict[str, Any] | None

    @property
    def preprocessing(self) -> Preprocessing:
        return self.data.preprocessing()

    def model_info(self) -> dict[str, Any]:
        """The "aiaas.model" metadata of trained weights: what rebuilding and predicting need."""
        return {**self.preprocessing.to_dict(), "spec": self.spec}


def _read(source: Any) -> bytes:
    """A model part given as bytes or as a path (JOB.json, the server's job folder)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    with open(os.fspath(source), "rb") as f:
        return f.read()


def builtin_spec(name: str, config: dict[str, Any] | None, input_shape: tuple[int, ...],
                 output_size: int) -> dict[str, Any]:
    """A built-in's full spec: sized to the data, then whatever the config sets (a partial
    config such as {"hidden": [32]} keeps the data's input and output sizes)."""
    if name not in BUILTIN_MODELS:
        raise BadArgument("MODEL", f"an nn.Module or a built-in model ({', '.join(BUILTIN_MODELS)})",
                          repr(name), close_matches(str(name), BUILTIN_MODELS))
    spec = model_spec(name, input_shape, output_size)
    config = dict(config or {})
    unknown = sorted(set(config) - {"input_shape", "output_size", "hidden"})
    if unknown:
        raise BadArgument("model.config", "input_shape, output_size or hidden", f"an unknown key {unknown[0]!r}")
    if "hidden" in config and name != "mlp":
        raise BadArgument("model.config.hidden", "no hidden layers (only the mlp model has them)",
                          repr(config["hidden"]))
    for key in ("input_shape", "hidden"):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_LAYER_WIDTH for v in value)):
            raise BadArgument(f"model.config.{key}", f"a list of whole numbers from 1 to {MAX_LAYER_WIDTH}",
                              repr(value)[:80])
    size = config.get("output_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_LAYER_WIDTH):
        raise BadArgument("model.config.output_size", f"a whole number from 1 to {MAX_LAYER_WIDTH}", repr(size)[:80])
    spec["config"].update(config)
    widths = [math.prod(spec["config"]["input_shape"]), *spec["config"].get("hidden", []), spec["config"]["output_size"]]
    if sum(a * b for a, b in zip(widths, widths[1:])) > _MAX_PARAMETERS:
        raise BadArgument("model.config", f"a model of at most {_MAX_PARAMETERS:,} weights", f"layers {widths}")
    return spec


def load_model(ref: Any, *, input_shape: tuple[int, ...] = (), output_size: int = 0, seed: int | None = None,
               allow_code: bool = False) -> tuple[nn.Module, dict[str, Any] | None]:
    """(module, built-in spec or None) for any model reference:
    an nn.Module (used as it is), a TrainResult (its module), a built-in name, {"builtin": NAME,
    "config": {...}}, {"spec": SPEC} (a trained built-in), {"export": {"graph", "weights"}} or,
    only where `allow_code`, {"pickle": ...}; parts are bytes or paths."""
    if isinstance(ref, nn.Module):
        return ref, None
    if isinstance(getattr(ref, "model", None), nn.Module):  # a TrainResult, or a run's result
        return ref.model, None
    if isinstance(ref, str):
        ref = {"builtin": ref}
    if not isinstance(ref, dict):
        raise BadArgument("MODEL", "a torch.nn.Module or a built-in model name", describe(ref))
    if "builtin" in ref or "spec" in ref:
        spec = ref.get("spec") or builtin_spec(ref["builtin"], ref.get("config"), input_shape, output_size)
        if seed is not None:
            torch.manual_seed(seed)  # the same seed gives the same initial weights on every launcher
        try:
            return build_model(spec), spec
        except (ValueError, KeyError, TypeError) as exc:
            raise BadArgument("MODEL", f"data that fits the {spec.get('name')} model", str(exc)) from None
    if "export" in ref:
        from .export import load_exported

        return load_exported(_read(ref["export"]["graph"]), _read(ref["export"]["weights"])), None
    if "pickle" in ref:
        if not allow_code:
            raise AiaasError("model.pickle: models sent as code (cloudpickle) run only where the operator "
                             "allowed it (aiaas-lab serve --allow-code).")
        from .export import load_pickled

        return load_pickled(_read(ref["pickle"])), None
    raise BadArgument("MODEL", '{"builtin": NAME}, {"export": {...}} or {"pickle": ...}', repr(ref)[:80])


def prepare(job: Job, *, allow_code: bool = True, remote: bool = False) -> PreparedRun:
    """Validate everything before the first step: the options together, the data, the model, and
    that they fit each other."""
    h = job.hyperparameters
    check_combination(h, has_val=job.val is not None, remote=remote)
    saved = read_state(h.checkpoint) if h.resume else None
    if saved is not None and saved.get("seed") is not None and h.seed is not None and saved["seed"] != h.seed:
        raise BadArgument("--seed", f"the seed the checkpoint was trained with ({saved['seed']}), or no --seed",
                          str(h.seed), "A resumed run must shuffle and split as it started.")
    cfg = TrainConfig.from_hyperparameters(seeded(h, saved.get("seed") if saved else None))
    data = prepare_data(job.data, val=job.val, target=job.target, loss=cfg.loss, normalize=h.normalize,
                        batch_size=cfg.batch_size, seed=cfg.seed)
    if cfg.device not in ("auto", "cpu"):
        available = torch.cuda.is_available() if cfg.device == "cuda" else torch.backends.mps.is_available()
        if not available:
            raise BadArgument("--device", "a device this machine has (auto picks one)",
                              f"{cfg.device!r}, which is not available")
    module, spec = load_model(job.model, input_shape=data.input_shape, output_size=data.output_size, seed=cfg.seed,
                              allow_code=allow_code)
    device = resolve_device(cfg.device)
    check_model_fits(module.to(device), data, device)
    run = PreparedRun(module=module, data=data, config=cfg, spec=spec)
    if saved is not None:
        check_resumable(h.checkpoint, module, run.preprocessing.to_dict())  # type: ignore[arg-type]
    return run


def _first_batch(data: InMemory | DataLoader, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, InMemory):
        return data.X[:size], data.y[:size]
    x0, y0 = data.dataset[0]
    return torch.as_tensor(x0).unsqueeze(0), torch.as_tensor(y0).unsqueeze(0)


def check_model_fits(model: nn.Module, prepared: Prepared, device: torch.device) -> None:
    """One forward pass on two samples before training, so a mismatch is reported as a clear
    error about the data instead of a failure deep inside the first step."""
    xb, yb = _first_batch(prepared.train)
    features = math.prod(prepared.input_shape)
    layer = first_layer_inputs(model)
    if layer is not None and len(prepared.input_shape) == 1 and layer[1] != features:
        raise BadArgument("--data", f"{layer[1]} features per sample (the model's first layer is {layer[0]})",
                          f"{features}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(xb.to(device))
    except Exception as exc:
        raise AiaasError(f"MODEL: the model raised {type(exc).__name__} in forward on a batch of shape "
                         f"{tuple(xb.shape)}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise BadArgument("MODEL", "a forward() that returns a tensor", describe(out))
    if prepared.task == "classification":
        if out.ndim != 2 or out.shape[1] < 2:
            raise BadArgument("MODEL", f"{prepared.num_classes} outputs per sample (one score per class)",
                              f"outputs of shape {tuple(out.shape)}",
                              "Give the last layer one output per class, or use --loss mse for regression.")
        if prepared.num_classes is not None and out.shape[1] < prepared.num_classes:
            raise BadArgument("MODEL", f"{prepared.num_classes} outputs per sample (the data has "
                              f"{prepared.num_classes} classes)", f"{out.shape[1]}")
    elif math.prod(out.shape[1:]) != math.prod(yb.shape[1:]) or out.ndim < 2:
        # A Dataset of scalar targets (shape (n,)) is fine for one output per sample: the loop
        # gives its targets the outputs' (n, 1) shape.
        raise BadArgument("MODEL", f"outputs shaped like the targets {tuple(yb.shape[1:]) or (1,)} per sample",
                          f"{tuple(out.shape[1:])}")
