"""What a client may ask for in `POST /v1/jobs`, checked completely before anything is queued,
and how a job row is shown on the wire."""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from .._errors import AiaasError
from ..engine.datasets import BUILTIN_DATASETS
from ..engine.job import MAX_WORKERS, NAME_PATTERN, check_combination, parse_request
from ..engine.models import BUILTIN_MODELS
from ._blobs import Blobs, check_sha256, safetensors_header
from ._http import ApiError

__all__ = ["validate_request", "render_job", "new_job_id", "TERMINAL", "NAME_PATTERN", "MAX_WORKERS"]

TERMINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


def _fail(where: str, expected: str, found: Any) -> ApiError:
    text = repr(found)
    if len(text) > 80:
        text = text[:77] + "..."
    return ApiError(400, f"{where}: expected {expected}, but found {text}.")


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
        from ..engine.prepare import builtin_spec

        shape = config.get("input_shape")
        size = config.get("output_size")
        try:  # the same rules the runner applies once it knows the data's shapes
            builtin_spec(raw["builtin"], config, tuple(shape) if isinstance(shape, list) and shape else (1,),
                         size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 1)
        except AiaasError as exc:
            raise ApiError(400, str(exc)) from None
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
    if not isinstance(raw, dict) or "tensors" not in raw:
        raise _fail(where, '{"tensors": SHA}' + (", a fraction or null" if where == "val" else ""), raw)
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
    """The canonical job request; raises ApiError(400) naming the first problem, in the same
    words `aiaas_lab.train()` uses for the same mistake (one schema, one validation)."""
    try:
        request, hyperparameters = parse_request(body)
        check_combination(hyperparameters, has_val=request.val is not None, remote=True)
    except AiaasError as exc:
        raise ApiError(400, str(exc)) from None
    h = hyperparameters.to_dict()
    val = request.val
    if isinstance(val, dict):
        val = _check_tensors(val, blobs, tenant, "val")
    return {"model": _check_model(request.model, blobs, tenant, allow_code),
            "data": _check_data(request.data, blobs, tenant, "data"),
            "val": val, "hyperparameters": h, "name": request.name, "preprocessing": request.preprocessing}


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
