"""What a client may ask for in `POST /v1/jobs`, checked completely before anything is queued,
and how a job row is shown on the wire."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import fields
from typing import Any

import orjson

from ..engine.datasets import BUILTIN_DATASETS
from ..engine.loop import DEFAULT_LR, LOSSES, TrainConfig
from ..engine.models import BUILTIN_MODELS
from ._blobs import Blobs, check_sha256, safetensors_header
from ._http import ApiError

__all__ = ["validate_request", "render_job", "new_job_id", "TERMINAL", "NAME_PATTERN"]

TERMINAL = ("succeeded", "failed", "cancelled")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
MAX_WORKERS = 16  # processes one job may start on this machine (torchrun --nproc-per-node)
# name: (kind, may be null); kinds: int (>= 1), float (> 0), nonneg (>= 0), seed (>= 0), bool, or a tuple of choices
_HYPERPARAMETERS: dict[str, tuple[Any, bool]] = {
    "epochs": ("int", False), "batch_size": ("int", False), "lr": ("float", True),
    "optimizer": (tuple(DEFAULT_LR), False), "loss": (LOSSES, False), "weight_decay": ("nonneg", False),
    "grad_accum": ("int", False), "clip": ("float", True), "patience": ("int", True),
    "seed": ("seed", True), "normalize": ("bool", False), "workers": ("int", False), "shard": ("bool", False),
}
_EXPECTED = {"int": "a whole number from 1 to 2**31 - 1", "float": "a number > 0", "nonneg": "a number >= 0",
             "seed": "a whole number from 0 to 2**31 - 1", "bool": "true or false"}


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


def _fail(where: str, expected: str, found: Any) -> ApiError:
    text = repr(found)
    if len(text) > 80:
        text = text[:77] + "..."
    return ApiError(400, f"{where}: expected {expected}, but found {text}.")


def _check_hyperparameters(raw: Any) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail("hyperparameters", "an object", raw)
    unknown = sorted(set(raw) - set(_HYPERPARAMETERS))
    if unknown:
        raise ApiError(400, f"hyperparameters: unknown option {unknown[0]!r}; expected some of "
                            f"{', '.join(_HYPERPARAMETERS)}.")
    out: dict[str, Any] = {}
    for name, (kind, nullable) in _HYPERPARAMETERS.items():
        default = {"normalize": False, "workers": 1, "shard": False}.get(name, _DEFAULTS.get(name))
        value = raw.get(name, default)
        where = f"hyperparameters.{name}"
        if value is None and nullable:
            out[name] = None
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(kind, tuple):
            if value not in kind:
                raise _fail(where, "one of " + ", ".join(kind), value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise _fail(where, _EXPECTED[kind], value)
        elif kind in ("int", "seed"):
            if not (number and math.isfinite(value) and float(value).is_integer()
                    and (1 if kind == "int" else 0) <= value < 2**31):
                raise _fail(where, _EXPECTED[kind] + (" or null" if nullable else ""), value)
            value = int(value)
        else:
            if not (number and math.isfinite(value) and (value > 0 if kind == "float" else value >= 0)):
                raise _fail(where, _EXPECTED[kind] + (" or null" if nullable else ""), value)
            value = float(value)
        out[name] = value
    if out["workers"] > MAX_WORKERS:
        raise _fail("hyperparameters.workers", f"at most {MAX_WORKERS} processes for one job", out["workers"])
    if out["shard"] and out["workers"] < 2:
        raise _fail("hyperparameters.shard", "workers >= 2 to shard the model across", out["workers"])
    return out


def _blob(blobs: Blobs, tenant: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, "the sha256 of an uploaded blob", value)
    sha = check_sha256(value, where)
    if blobs.find(tenant, sha) is None:
        raise ApiError(400, f"{where}: blob {sha} has not been uploaded; PUT /v1/data/{sha} first.")
    return sha


def _only(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ApiError(400, f"{where}: unknown key {unknown[0]!r}; expected {' or '.join(allowed)}.")


def _check_model(raw: Any, blobs: Blobs, tenant: str, allow_code: bool) -> dict[str, Any]:
    from .._errors import AiaasError
    from ..engine.export import check_graph

    if not isinstance(raw, dict) or len(raw) == 0:
        raise _fail("model", '{"builtin": NAME}, {"export": {"graph", "weights"}} or {"pickle": SHA}', raw)
    if "builtin" in raw:
        _only(raw, ("builtin", "config"), "model")
        if raw["builtin"] not in BUILTIN_MODELS:
            raise _fail("model.builtin", "one of " + ", ".join(BUILTIN_MODELS), raw["builtin"])
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise _fail("model.config", "an object", config)
        _only(config, ("input_shape", "output_size", "hidden"), "model.config")
        for key in ("input_shape", "hidden"):
            value = config.get(key)
            if value is not None and not (isinstance(value, list) and value and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1_000_000 for v in value)):
                raise _fail(f"model.config.{key}", "a list of whole numbers >= 1", value)
        size = config.get("output_size")
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 1_000_000):
            raise _fail("model.config.output_size", "a whole number >= 1", size)
        if "hidden" in config and raw["builtin"] != "mlp":
            raise ApiError(400, "model.config.hidden: only the mlp model has hidden layers.")
        return {"builtin": raw["builtin"], "config": config}
    if "export" in raw:
        _only(raw, ("export",), "model")
        export = raw["export"]
        if not isinstance(export, dict):
            raise _fail("model.export", 'an object {"graph": SHA, "weights": SHA}', export)
        _only(export, ("graph", "weights"), "model.export")
        graph = _blob(blobs, tenant, export.get("graph"), "model.export.graph")
        weights = _blob(blobs, tenant, export.get("weights"), "model.export.weights")
        path = blobs.find(tenant, graph)
        assert path is not None
        try:
            check_graph(path.read_bytes())
        except AiaasError as exc:
            raise ApiError(400, str(exc)) from None
        return {"export": {"graph": graph, "weights": weights}}
    if "pickle" in raw:
        _only(raw, ("pickle",), "model")
        if not allow_code:
            raise ApiError(400, "model.pickle: this server does not accept models sent as code "
                                "(cloudpickle); its operator can allow it with aiaas-lab serve --allow-code. "
                                "Send a built-in model or a torch.export graph instead.")
        return {"pickle": _blob(blobs, tenant, raw["pickle"], "model.pickle")}
    raise _fail("model", '{"builtin": NAME}, {"export": {...}} or {"pickle": SHA}', raw)


_NUMERIC = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def _check_tensors(raw: Any, blobs: Blobs, tenant: str, where: str) -> dict[str, Any]:
    _only(raw, ("tensors",), where)
    sha = _blob(blobs, tenant, raw["tensors"], f"{where}.tensors")
    path = blobs.find(tenant, sha)
    assert path is not None
    try:
        header = safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise ApiError(400, f"{where}.tensors: expected a safetensors file with tensors X and y, "
                            f"but blob {sha} is not one ({exc}).") from None
    if "X" not in header or "y" not in header:
        raise ApiError(400, f"{where}.tensors: expected a safetensors file with tensors X and y, but found "
                            f"{', '.join(sorted(header)) or 'no tensors'}.")
    x, y = header["X"], header["y"]
    for name, entry in (("X", x), ("y", y)):
        if entry["dtype"] not in _NUMERIC:
            raise ApiError(400, f"{where}.tensors: expected numeric {name}, but found dtype {entry['dtype']}.")
    if not x["shape"] or not y["shape"] or x["shape"][0] != y["shape"][0]:
        raise ApiError(400, f"{where}.tensors: expected X and y with the same number of rows, but found "
                            f"shapes {x['shape']} and {y['shape']}.")
    return {"tensors": sha}


def _check_data(raw: Any, blobs: Blobs, tenant: str, where: str) -> dict[str, Any]:
    if isinstance(raw, dict) and "builtin" in raw:
        _only(raw, ("builtin",), where)
        if raw["builtin"] not in BUILTIN_DATASETS:
            raise _fail(f"{where}.builtin", "one of " + ", ".join(BUILTIN_DATASETS), raw["builtin"])
        return {"builtin": raw["builtin"]}
    if isinstance(raw, dict) and "tensors" in raw:
        return _check_tensors(raw, blobs, tenant, where)
    raise _fail(where, '{"builtin": NAME} or {"tensors": SHA}', raw)


def validate_request(body: Any, blobs: Blobs, tenant: str, allow_code: bool) -> dict[str, Any]:
    """The canonical job request; raises ApiError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body: expected a JSON object, but found a JSON {type(body).__name__}.")
    _only(body, ("model", "data", "val", "hyperparameters", "name"), "the request body")
    for key in ("model", "data"):
        if key not in body:
            raise ApiError(400, f"the request body: {key!r} is required.")
    name = body.get("name")
    if name is not None and not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise _fail("name", "a model name of letters, digits, '.', '_' and '-' (at most 100)", name)
    hyperparameters = _check_hyperparameters(body.get("hyperparameters"))
    val = body.get("val")
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        if not 0 < val < 1:
            raise _fail("val", "a fraction between 0 and 1 or {\"tensors\": SHA}", val)
        val = float(val)
    elif val is not None:
        if not isinstance(val, dict) or "tensors" not in val:
            raise _fail("val", 'null, a fraction or {"tensors": SHA}', val)
        val = _check_tensors(val, blobs, tenant, "val")
    if hyperparameters["patience"] is not None and val is None:
        raise ApiError(400, "hyperparameters.patience: early stopping needs validation data; give val "
                            "(a fraction or tensors).")
    return {"model": _check_model(body["model"], blobs, tenant, allow_code),
            "data": _check_data(body["data"], blobs, tenant, "data"),
            "val": val, "hyperparameters": hyperparameters, "name": name}


def render_job(row: Any) -> dict[str, Any]:
    model = None
    if row["model_name"] is not None:
        model = {"name": row["model_name"], "version": row["model_version"]}
    return {
        "id": row["id"], "object": "training.job", "status": row["status"],
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "hyperparameters": orjson.loads(row["hyperparameters"]), "error": row["error"],
        "metrics": orjson.loads(row["metrics"]), "model": model,
    }
