"""The Open Inference Protocol (KServe V2) REST endpoints, with Triton's binary tensor extension.

The infer handler is the hot path: orjson, one model lookup in memory, the training normalizer
and the forward pass under inference mode. Forward passes run in `InferencePool`, a fixed number
of threads behind a bounded queue (503 with Retry-After when it is full), so a slow model never
holds up the event loop (health probes, job events, other tenants). The one exception is a
forward pass measured below `_INLINE_SECONDS` for the same model and input shape: a thread hop
costs more than it, so it runs on the loop, and is timed again every time it does.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import numpy as np
import orjson
import torch
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._version import __version__
from .._errors import AiaasError
from ..engine.export_limits import MAX_TOTAL_ELEMENTS
from ._http import ApiError, brief, json_response, parse_json, whole_number
from ._registry import Registry, Served, tensor_metadata

__all__ = ["v2_routes", "InferencePool"]

_INLINE_ELEMENTS = 65_536  # larger inputs always go to the pool
_INLINE_SECONDS = 0.0005  # a forward pass measured faster than this may run on the event loop
_INLINE_BODY = 1 << 18  # larger bodies are parsed, run and encoded in the pool: parsing takes ms
_T = TypeVar("_T")


class _DaemonThreads:
    """A fixed pool of daemon threads. Not ThreadPoolExecutor: its threads are joined when the
    interpreter exits, so one forward pass that hangs would keep Ctrl-C from ending the server."""

    def __init__(self, count: int) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"aiaas-infer-{i}", daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        future: Future[_T] = Future()
        self._work.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller awaits the future: it gets the exception
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel what waits; each thread ends after the forward pass it runs (if that ever ends)."""
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._work.put(None)


class InferencePool:
    """`threads` threads for forward passes; at most `queue` more requests wait for one."""

    def __init__(self, threads: int, queue: int) -> None:
        self.threads, self.queue = threads, queue
        self._executor = _DaemonThreads(threads)
        self._admitted = 0  # running or waiting; only touched on the event loop
        # Last measured forward time per model and input shape; entries go with their module.
        self._seconds: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], float]] = weakref.WeakKeyDictionary()

    def fast(self, module: Any, shape: tuple[int, ...]) -> bool:
        seconds = self._seconds.get(module)
        return seconds is not None and seconds.get(shape, 1.0) < _INLINE_SECONDS

    def record(self, module: Any, shape: tuple[int, ...], seconds: float) -> None:
        entry = self._seconds.setdefault(module, {})
        if len(entry) >= 64 and shape not in entry:  # a bounded memory of shapes per model
            entry.clear()
        entry[shape] = seconds

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._admitted >= self.threads + self.queue:
            raise ApiError(503, f"the server is busy: {self._admitted} inference requests are running or "
                                "waiting (aiaas-lab serve --infer-threads, --infer-queue); retry shortly.",
                           {"Retry-After": "1"})
        self._admitted += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, *args))
        finally:
            self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown()


def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    store = request.app.state.store
    if not await store.probe():  # jobs cannot be recorded: a load balancer should look elsewhere
        return json_response({"ready": False, "error": f"storage unavailable: {store.unavailable_reason}"}, 503,
                             {"Retry-After": "5"})
    return json_response({"ready": True})


async def server_metadata(request: Request) -> Response:
    return json_response({"name": "aiaas-lab", "version": __version__, "extensions": ["binary_tensor_data"]})


async def model_metadata(request: Request) -> Response:
    tenant, name = request.state.tenant, request.path_params["name"]
    row = _registry(request).row(tenant, name, request.path_params.get("version"))
    inputs, outputs = tensor_metadata(orjson.loads(row["info"]))
    versions = [str(v) for v in _registry(request).versions(tenant, name)]
    return json_response({"name": name, "versions": versions, "platform": "pytorch",
                          "inputs": inputs, "outputs": outputs})


async def model_ready(request: Request) -> Response:
    name = request.path_params["name"]
    served = await _registry(request).get(request.state.tenant, name, request.path_params.get("version"))
    return json_response({"name": name, "version": str(served.version), "ready": True})


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        length = whole_number(header_length)
        if length is None or length > len(body):
            raise ApiError(400, f"Inference-Header-Content-Length: expected the length of the JSON header "
                                f"(at most {len(body)}), but found {header_length[:20]!r}.")
        json_part, binary = body[:length], body[length:]
    return parse_json(json_part, "the inference request"), binary


def _input_tensor(request: Any, binary: bytes, served: Served) -> torch.Tensor:
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise ApiError(400, "inputs: expected a list with one input named 'input'.")
    spec = request["inputs"][0]
    if not isinstance(spec, dict) or spec.get("name") != "input":
        found = spec.get("name") if isinstance(spec, dict) else spec
        raise ApiError(400, f"inputs[0].name: expected 'input', but found {brief(found)}.")
    if spec.get("datatype") != "FP32":
        raise ApiError(400, f"inputs[0].datatype: expected FP32, but found {brief(spec.get('datatype'))}.")
    shape = spec.get("shape")
    expected = [-1, *served.input_shape]
    if (not isinstance(shape, list) or len(shape) != len(expected)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[0] < 1 or list(shape[1:]) != expected[1:]):
        raise ApiError(400, f"inputs[0].shape: expected {expected} (rows, then one sample's shape) for model "
                            f"{served.name!r}, but found {brief(shape)}.")
    count = math.prod(shape)
    if served.values_per_row and shape[0] * served.values_per_row > MAX_TOTAL_ELEMENTS:
        rows = max(1, MAX_TOTAL_ELEMENTS // served.values_per_row)
        raise ApiError(400, f"inputs[0].shape: expected at most {rows} rows for model {served.name!r} (each row makes "
                            f"its forward pass hold {served.values_per_row:,} values; this server's bound is "
                            f"{MAX_TOTAL_ELEMENTS:,}), but found {shape[0]}. Send the rows in smaller requests.")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != count * 4 or size > len(binary):
            raise ApiError(400, f"inputs[0].parameters.binary_data_size: expected {count * 4} bytes for shape "
                                f"{shape} in FP32, with that many bytes after the JSON header, but found "
                                f"{brief(size)} and {len(binary)} bytes.")
        array = np.frombuffer(binary, dtype="<f4", count=count).copy()
        return torch.from_numpy(array).reshape(shape)
    data = spec.get("data")
    if not isinstance(data, list):
        raise ApiError(400, "inputs[0].data: expected the input's values as a list (or binary data).")
    try:
        tensor = torch.tensor(data, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ApiError(400, f"inputs[0].data: expected numbers, but they could not be read ({exc}).") from None
    if tensor.numel() != count:
        raise ApiError(400, f"inputs[0].data: expected {count} values for shape {shape}, but found {tensor.numel()}.")
    return tensor.reshape(shape)


def _wants_binary(request: dict[str, Any]) -> bool:
    outputs = request.get("outputs")
    parameters = request.get("parameters")
    default = bool(parameters.get("binary_data_output")) if isinstance(parameters, dict) else False
    if outputs is None:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ApiError(400, "outputs: expected a list of objects like {\"name\": \"output\"}.")
    binary = default
    for output in outputs:
        if output.get("name") != "output":
            raise ApiError(400, f"outputs: expected the output named 'output', but found {brief(output.get('name'))}.")
        params = output.get("parameters")
        if isinstance(params, dict) and "binary_data" in params:
            binary = bool(params["binary_data"])
    return binary


def _forward(served: Served, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The output rows and the seconds the forward pass took; a model's failure is a 400."""
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if served.scale is not None:
                x = torch.addcmul(served.shift, x.reshape(x.shape[0], -1), served.scale).reshape(x.shape)
            out = served.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.to(torch.float32).reshape(x.shape[0], -1)
    except AiaasError as exc:  # an exported graph over this server's bounds says so itself
        raise ApiError(400, str(exc)) from None
    except Exception as exc:  # a model that fails on valid input is the client's model's fault
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ApiError(400, f"the model raised {type(exc).__name__} on input of shape {list(x.shape)}"
                            f"{': ' + first if first else ''}.") from None
    return out, time.perf_counter() - start


def _parse(served: Served, body: bytes, header_length: str | None) -> tuple[dict[str, Any], torch.Tensor, bool]:
    parsed, binary = _split_body(body, header_length)
    x = _input_tensor(parsed, binary, served)
    if "id" in parsed and not (isinstance(parsed["id"], str) and len(parsed["id"]) <= 256):
        raise ApiError(400, f"id: expected a string of at most 256 characters, but found {brief(parsed['id'])}.")
    return parsed, x, _wants_binary(parsed)


def _respond(served: Served, parsed: dict[str, Any], out: torch.Tensor, binary_out: bool) -> Response:
    output: dict[str, Any] = {"name": "output", "datatype": "FP32", "shape": list(out.shape)}
    response: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version), "outputs": [output]}
    if "id" in parsed:
        response["id"] = parsed["id"]
    if not binary_out:
        output["data"] = out.reshape(-1).tolist()
        return Response(orjson.dumps(response), media_type="application/json")
    raw = out.contiguous().numpy().astype("<f4", copy=False).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(response)
    return Response(header + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _infer_all(served: Served, body: bytes, header_length: str | None) -> Response:
    """A large request from parsing to the encoded response, all in a pool thread."""
    parsed, x, binary_out = _parse(served, body, header_length)
    out, _ = _forward(served, x)
    return _respond(served, parsed, out, binary_out)


async def infer(request: Request) -> Response:
    served = await _registry(request).get(request.state.tenant, request.path_params["name"],
                                          request.path_params.get("version"))
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    pool: InferencePool = request.app.state.infer_pool
    if len(body) > _INLINE_BODY:
        return await pool.run(_infer_all, served, body, header_length)
    parsed, x, binary_out = _parse(served, body, header_length)
    shape = tuple(x.shape)
    if x.numel() <= _INLINE_ELEMENTS and pool.fast(served.module, shape):
        out, seconds = _forward(served, x)
    else:
        out, seconds = await pool.run(_forward, served, x)
    pool.record(served.module, shape, seconds)
    return _respond(served, parsed, out, binary_out)


def v2_routes() -> list[Route]:
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return routes
