"""Tensors on the wire: a V2 infer request built from raw inputs (JSON or the binary tensor
extension), its response decoded back to a tensor, and the safetensors blobs that carry data and
trained weights.

Kept apart from the transport because it is all about bytes and dtypes, and apart from the plans
because MLServer, Triton and aiaas-lab must all read the same way whatever operation asks.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import httpx
import numpy as np
import torch

from .._errors import AiaasError
from ._wire import _Call, _model_path

__all__ = ["Blob", "ModelWeights"]

_NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class Blob(NamedTuple):
    sha256: str
    size: int
    uploaded: bool  # False when the server already had it and nothing was sent


class ModelWeights(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]  # the "aiaas.model" metadata: task, classes, input_shape, spec, normalizer


def _safetensors_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as one safetensors file; the same tensors give the same bytes, hence the same hash."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _model_weights(blob: bytes) -> ModelWeights:
    """A trained model's state dict and metadata from its safetensors file (never pickle)."""
    from safetensors.torch import load

    size = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8:8 + size]).get("__metadata__") or {}  # read from the header alone
    return ModelWeights(load(blob), json.loads(metadata.get("aiaas.model", "{}")))


def _as_numpy(inputs: Any) -> np.ndarray:
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().cpu().numpy()
    return np.asarray(inputs)


def _infer_call(name: str, version: int | None, meta: dict[str, Any], inputs: Any, binary: bool) -> tuple[_Call, str | None]:
    """The V2 infer request for `inputs` as the model's metadata declares them, and the name of the
    output to read from the answer (None when the metadata names none)."""
    declared_inputs = meta.get("inputs") or [{}]
    input_name = declared_inputs[0].get("name") or "input"
    datatype = declared_inputs[0].get("datatype") or "FP32"
    if datatype not in _NUMPY_TYPES:
        raise AiaasError(f"Model {name!r} takes {datatype} input, which this client cannot send "
                         f"(it sends {', '.join(_NUMPY_TYPES)}).")
    array = np.ascontiguousarray(_as_numpy(inputs), dtype=_NUMPY_TYPES[datatype])
    output_names = [o["name"] for o in meta.get("outputs") or [] if o.get("name")]
    tensor: dict[str, Any] = {"name": input_name, "shape": list(array.shape), "datatype": datatype}
    request: dict[str, Any] = {"inputs": [tensor]}
    wanted = output_names[0] if output_names else None
    if not binary:
        tensor["data"] = array.reshape(-1).tolist()
        return _Call("POST", _model_path(name, version) + "/infer", json=request), wanted
    raw = array.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    if output_names:
        request["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in output_names[:1]]
    else:  # the server does not say its outputs' names: ask for all of them in binary
        request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request, separators=(",", ":")).encode()
    call = _Call("POST", _model_path(name, version) + "/infer", content=header + raw,
                 headers={"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"})
    return call, wanted


def _decode_infer(response: httpx.Response, wanted: str | None) -> torch.Tensor:
    """The named (else the first) output of a V2 infer response, JSON or binary."""
    body = response.content
    header_length = response.headers.get("Inference-Header-Content-Length")
    split = int(header_length) if header_length is not None else len(body)
    result = json.loads(body[:split])
    offset = split
    decoded: dict[str, torch.Tensor] = {}
    for output in result.get("outputs", []):
        dtype = _NUMPY_TYPES.get(output.get("datatype", "FP32"))
        if dtype is None:
            raise AiaasError(f"The server answered with a {output.get('datatype')} output, which this client "
                             "cannot read.")
        shape = [int(d) for d in output.get("shape", [-1])]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(body[offset:offset + int(size)], dtype=dtype).reshape(shape)
            offset += int(size)
        else:
            array = np.asarray(output.get("data", []), dtype=dtype).reshape(shape)
        decoded[output.get("name", "")] = torch.from_numpy(array.copy())
    if not decoded:
        raise AiaasError("The server's inference response had no outputs.")
    return decoded.get(wanted, next(iter(decoded.values()))) if wanted else next(iter(decoded.values()))
