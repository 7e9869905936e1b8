"""The Open Inference Protocol (KServe V2) REST endpoints, with Triton's binary tensor extension.

The infer handler is the hot path: orjson, one model lookup in memory, the training normalizer
and the forward pass under inference mode. Small batches run on the event loop itself (a thread
hop costs more than their forward pass); large ones go to a worker thread.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import numpy as np
import orjson
import torch
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ._http import ApiError, json_response, whole_number
from ._registry import Registry, Served, tensor_metadata

__all__ = ["v2_routes"]

_INLINE_ELEMENTS = 65_536  # inputs up to this many floats run on the event loop


def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    store = request.app.state.store
    if not store.available:  # jobs cannot be recorded: a load balancer should look elsewhere
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
    try:
        return orjson.loads(json_part), binary
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the inference request is not valid JSON ({exc}).") from None


def _input_tensor(request: Any, binary: bytes, served: Served) -> torch.Tensor:
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise ApiError(400, "inputs: expected a list with one input named 'input'.")
    spec = request["inputs"][0]
    if not isinstance(spec, dict) or spec.get("name") != "input":
        found = spec.get("name") if isinstance(spec, dict) else spec
        raise ApiError(400, f"inputs[0].name: expected 'input', but found {str(found)[:40]!r}.")
    if spec.get("datatype") != "FP32":
        raise ApiError(400, f"inputs[0].datatype: expected FP32, but found {str(spec.get('datatype'))[:20]!r}.")
    shape = spec.get("shape")
    expected = [-1, *served.input_shape]
    if (not isinstance(shape, list) or len(shape) != len(expected)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[0] < 1 or list(shape[1:]) != expected[1:]):
        raise ApiError(400, f"inputs[0].shape: expected {expected} (rows, then one sample's shape) for model "
                            f"{served.name!r}, but found {str(shape)[:60]}.")
    count = math.prod(shape)
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != count * 4 or size > len(binary):
            raise ApiError(400, f"inputs[0].parameters.binary_data_size: expected {count * 4} bytes for shape "
                                f"{shape} in FP32, with that many bytes after the JSON header, but found "
                                f"{size!r} and {len(binary)} bytes.")
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
            raise ApiError(400, f"outputs: expected the output named 'output', but found {str(output.get('name'))[:40]!r}.")
        params = output.get("parameters")
        if isinstance(params, dict) and "binary_data" in params:
            binary = bool(params["binary_data"])
    return binary


def _forward(served: Served, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if served.scale is not None:
            x = torch.addcmul(served.shift, x.reshape(x.shape[0], -1), served.scale).reshape(x.shape)
        out = served.module(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(torch.float32).reshape(x.shape[0], -1)


async def infer(request: Request) -> Response:
    served = await _registry(request).get(request.state.tenant, request.path_params["name"],
                                          request.path_params.get("version"))
    body = await request.body()
    parsed, binary = _split_body(body, request.headers.get("inference-header-content-length"))
    x = _input_tensor(parsed, binary, served)
    binary_out = _wants_binary(parsed)
    try:
        if x.numel() <= _INLINE_ELEMENTS:
            out = _forward(served, x)
        else:
            out = await anyio.to_thread.run_sync(_forward, served, x)
    except Exception as exc:  # a model that fails on valid input is the client's model's fault
        raise ApiError(400, f"the model raised {type(exc).__name__} on input of shape {list(x.shape)}: {exc}") from None
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
