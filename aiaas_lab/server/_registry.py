"""Registered models: their metadata on the wire, and the loaded modules the V2 endpoints serve.

Loaded modules are cached per (tenant, name, version), with the latest version of each name
remembered, so an inference request touches neither SQLite nor the disk. The executor calls
`invalidate` when a job registers a new version.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ._http import ApiError, whole_number
from ._store import Store

__all__ = ["Registry", "Served", "model_entry", "tensor_metadata"]

_CACHE_SIZE = 32


def tensor_metadata(info: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *info["input_shape"]]}]
    outputs = [{"name": "output", "datatype": "FP32", "shape": [-1, info["output_size"]]}]
    return inputs, outputs


def model_entry(row: Any) -> dict[str, Any]:
    info = orjson.loads(row["info"])
    inputs, outputs = tensor_metadata(info)
    return {"name": row["name"], "version": row["version"], "job_id": row["job_id"],
            "created_at": row["created_at"], "task": info["task"], "classes": info["classes"],
            "inputs": inputs, "outputs": outputs,
            # What a client needs to encode raw inputs as training did (predict on a DataFrame).
            "preprocessing": {k: info.get(k) for k in ("task", "classes", "columns", "categories",
                                                       "input_shape", "output_size")}}


@dataclass
class Served:
    name: str
    version: int
    module: Any  # torch.nn.Module in eval mode
    input_shape: tuple[int, ...]
    features: int
    output_size: int
    scale: Any  # torch.Tensor | None: the training normalizer as x * scale + shift, one fused op
    shift: Any
    values_per_row: int = 0  # what one input row makes the forward pass hold (its layers' outputs)


class Registry:
    def __init__(self, store: Store, jobs_dir: Path, allow_code: bool) -> None:
        self.store, self.jobs_dir, self.allow_code = store, jobs_dir, allow_code
        self._latest: dict[tuple[str, str], int] = {}
        self._loaded: OrderedDict[tuple[str, str, int], asyncio.Future[Served]] = OrderedDict()

    def invalidate(self, tenant: str, name: str) -> None:
        self._latest.pop((tenant, name), None)

    def row(self, tenant: str, name: str, version: int | str | None) -> Any:
        """The model's row, or ApiError(404) saying what is missing."""
        if version is None:
            row = self.store.one("SELECT * FROM models WHERE tenant = ? AND name = ? ORDER BY version DESC LIMIT 1",
                                 (tenant, name))
        else:
            number = _version(version)
            row = self.store.one("SELECT * FROM models WHERE tenant = ? AND name = ? AND version = ?",
                                 (tenant, name, number))
        if row is None:
            if version is not None and self.store.one("SELECT 1 FROM models WHERE tenant = ? AND name = ?", (tenant, name)):
                raise ApiError(404, f"model {name!r} has no version {version}.")
            raise ApiError(404, f"no model named {name!r}; GET /v1/models lists this tenant's models.")
        return row

    def versions(self, tenant: str, name: str) -> list[int]:
        return [r["version"] for r in self.store.all(
            "SELECT version FROM models WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name))]

    async def get(self, tenant: str, name: str, version: str | None) -> Served:
        if version is None:
            number = self._latest.get((tenant, name))
            if number is None:
                number = self.row(tenant, name, None)["version"]
                self._latest[(tenant, name)] = number
        else:
            number = _version(version)
        key = (tenant, name, number)
        future = self._loaded.get(key)
        if future is None or (future.done() and future.exception() is not None):
            row = self.row(tenant, name, number)
            future = asyncio.ensure_future(asyncio.to_thread(self._load, row))
            self._loaded[key] = future
            while len(self._loaded) > _CACHE_SIZE:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return await asyncio.shield(future)

    def _load(self, row: Any) -> Served:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .._errors import AiaasError
        from ..engine.prepare import load_model

        info = orjson.loads(row["info"])
        directory = self.jobs_dir / row["job_id"]
        if info.get("spec") is not None:
            ref: dict[str, Any] = {"spec": info["spec"]}
        elif (directory / "graph.json").exists():
            ref = {"export": {"graph": directory / "graph.json", "weights": directory / "init.safetensors"}}
        else:
            ref = {"pickle": directory / "model.pkl"}
        if "pickle" in ref and not self.allow_code:
            raise ApiError(400, f"model {row['name']!r} was sent as code (cloudpickle); serving it needs a "
                                "server started with --allow-code.")
        try:  # the one model loader, as the runner and the worker use it
            module, _ = load_model(ref, allow_code=self.allow_code)
            module.load_state_dict(load_file(str(directory / "model.safetensors")))
        except AiaasError as exc:  # a graph this server refuses now (its limits changed, say)
            raise ApiError(400, f"model {row['name']!r} cannot be served: {str(exc).splitlines()[0]}") from None
        # Its files are gone or damaged (a truncated safetensors file raises SafetensorError, which
        # is neither): the reason to the log, a retryable 503 to the tenant.
        except (OSError, RuntimeError, SafetensorError) as exc:
            print(f"aiaas-lab serve: model {row['name']!r} version {row['version']} could not be loaded: {exc!r}",
                  file=sys.stderr, flush=True)
            raise ApiError(503, f"model {row['name']!r} version {row['version']} cannot be loaded on this server "
                                "right now; its operator has the reason in the server's log.") from None
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        normalizer = info.get("normalizer")
        scale = shift = None
        if normalizer is not None:
            mean = torch.tensor(normalizer["mean"], dtype=torch.float32)
            std = torch.tensor(normalizer["std"], dtype=torch.float32)
            scale, shift = 1.0 / std, -mean / std
        shape = tuple(int(d) for d in info["input_shape"])
        return Served(name=row["name"], version=row["version"], module=module, input_shape=shape,
                      features=math.prod(shape), output_size=int(info["output_size"]), scale=scale, shift=shift,
                      values_per_row=_values_per_row(module, shape))


def _values_per_row(module: Any, input_shape: tuple[int, ...]) -> int:
    """The values one row makes a forward pass hold, from one real row: the outputs of every
    leaf layer. A request's rows times this is what inference allocates (an MLP 65,536 wide holds
    twice that per row), so the V2 endpoint can bound it before running it. Exported graphs are
    also bounded op by op (export_limits); this counts what their leaf modules show."""
    import torch

    counted = [math.prod(input_shape)]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            counted.append(output.numel())

    hooks = [m.register_forward_hook(count) for m in module.modules() if next(m.children(), None) is None]
    try:
        with torch.inference_mode():
            module(torch.zeros((1, *input_shape)))
    except Exception:  # a model that cannot run one row of zeros: its requests fail with their reason
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counted)


def _version(version: int | str) -> int:
    if isinstance(version, int):
        return version
    number = whole_number(version)
    if number is None or number < 1:
        raise ApiError(400, f"the model version: expected a whole number >= 1, but found {version[:40]!r}.")
    return number
