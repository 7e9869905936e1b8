"""Every operation of the client, written once as a *plan*: a generator that yields the requests it
needs and receives their responses. `Client` runs plans with blocking I/O and `AsyncClient` with
`await`, so the two cannot drift apart; the public methods (`get_job`, `infer`, ...) are bound here
for both, each returning what its client's `_run` returns (a value, or a coroutine).
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import torch

from ..engine.events import Event, event_from_dict
from ._tensors import Blob, ModelWeights, _decode_infer, _infer_call, _model_weights, _safetensors_blob
from ._transport import _Transport
from ._wire import Plan, T, _Call, _model_path, _quote


def _operation(plan: Callable[..., Plan[T]]) -> Callable[..., Any]:
    """The public method that runs `plan` with the client's own I/O."""
    @functools.wraps(plan)
    def method(self: _Operations, *args: Any, **kwargs: Any) -> Any:
        return self._run(plan(self, *args, **kwargs))

    method.__name__ = method.__qualname__ = plan.__name__.removeprefix("_plan_")
    return method


class _Operations(_Transport):
    """The plans, and the methods that run them through `_run` (which each client defines)."""

    def _run(self, plan: Plan[T]) -> Any:
        raise NotImplementedError

    def _plan_server_info(self) -> Plan[dict[str, Any]]:
        """`GET /v2`: the server's name, version and V2 extensions (cached)."""
        if self._info is None:
            response = yield _Call("GET", "/v2")
            self._info = response.json()
        return self._info

    def _plan_ready(self) -> Plan[bool]:
        """Whether the server answers `GET /v2/health/ready` with 200 (no token needed)."""
        response = yield _Call("GET", "/v2/health/ready", ok=tuple(range(200, 600)))
        return response.status_code == 200

    def _plan_upload(self, data: bytes) -> Plan[Blob]:
        """Store `data` on the server under its SHA-256, unless the server already has it."""
        sha = hashlib.sha256(data).hexdigest()
        head = yield _Call("HEAD", f"/v1/data/{sha}", ok=(200, 404))
        if head.status_code == 200:
            return Blob(sha, len(data), False)
        yield _Call("PUT", f"/v1/data/{sha}", content=data, headers={"Content-Type": "application/octet-stream"})
        return Blob(sha, len(data), True)

    def _plan_upload_tensors(self, tensors: dict[str, torch.Tensor]) -> Plan[Blob]:
        """Upload tensors as one safetensors file (the same tensors give the same hash)."""
        return (yield from self._plan_upload(_safetensors_blob(tensors)))

    def _plan_create_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> Plan[dict[str, Any]]:
        """`POST /v1/jobs`; resubmitting with the same key returns the same job."""
        key = idempotency_key or uuid.uuid4().hex
        response = yield _Call("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return response.json()

    def _plan_get_job(self, job_id: str) -> Plan[dict[str, Any]]:
        response = yield _Call("GET", f"/v1/jobs/{_quote(job_id)}")
        return response.json()

    def _plan_list_jobs(self) -> Plan[list[dict[str, Any]]]:
        """The tenant's jobs, newest first."""
        response = yield _Call("GET", "/v1/jobs")
        return list(response.json()["data"])

    def _plan_cancel_job(self, job_id: str) -> Plan[dict[str, Any]]:
        """Ask the server to stop the job at its next step; a finished job is left as it is."""
        response = yield _Call("POST", f"/v1/jobs/{_quote(job_id)}/cancel")
        return response.json()

    def _plan_events(self, job_id: str, after: int = 0, limit: int | None = None) -> Plan[list[tuple[int, Event]]]:
        """The job's stored events after id `after`, all pages, as (id, event) pairs."""
        out: list[tuple[int, Event]] = []
        while True:
            params: dict[str, Any] = {"after": after}
            if limit is not None:
                params["limit"] = limit
            response = yield _Call("GET", f"/v1/jobs/{_quote(job_id)}/events", params=params)
            page = response.json()
            for item in page["data"]:
                out.append((int(item["id"]), event_from_dict(item["event"])))
            if not page.get("has_more") or not page["data"]:
                return out
            after = out[-1][0]

    def _plan_models(self) -> Plan[list[dict[str, Any]]]:
        """The tenant's registered models (`GET /v1/models`)."""
        response = yield _Call("GET", "/v1/models")
        return list(response.json()["data"])

    def _plan_model_weights(self, name: str, version: int | None = None) -> Plan[ModelWeights]:
        """A registered model's trained state dict and its metadata, from safetensors (never pickle)."""
        params = {"version": version} if version is not None else None
        response = yield _Call("GET", f"/v1/models/{_quote(name)}/weights", params=params)
        return _model_weights(response.content)

    def _plan_model_metadata(self, name: str, version: int | None = None) -> Plan[dict[str, Any]]:
        """V2 model metadata: name, versions, platform, inputs, outputs (cached)."""
        key = (name, None if version is None else str(version))
        if key not in self._metadata:
            response = yield _Call("GET", _model_path(name, version))
            self._metadata[key] = response.json()
        return self._metadata[key]

    def _plan_infer(self, name: str, inputs: Any, version: int | None = None,
                    binary: bool | None = None) -> Plan[torch.Tensor]:
        """Run a V2 model on `inputs` (raw features, one row per sample) and return its first output.

        `binary=None` uses the binary tensor extension when the server advertises it in `GET /v2`,
        JSON otherwise, so the same call works against aiaas-lab, MLServer and Triton."""
        if binary is None:
            info = yield from self._plan_server_info()
            binary = "binary_tensor_data" in (info.get("extensions") or [])
        meta = yield from self._plan_model_metadata(name, version)
        call, wanted = _infer_call(name, version, meta, inputs, binary)
        response = yield call
        return _decode_infer(response, wanted)

    server_info = _operation(_plan_server_info)
    ready = _operation(_plan_ready)
    upload = _operation(_plan_upload)
    upload_tensors = _operation(_plan_upload_tensors)
    create_job = _operation(_plan_create_job)
    get_job = _operation(_plan_get_job)
    list_jobs = _operation(_plan_list_jobs)
    cancel_job = _operation(_plan_cancel_job)
    events = _operation(_plan_events)
    models = _operation(_plan_models)
    model_weights = _operation(_plan_model_weights)
    model_metadata = _operation(_plan_model_metadata)
    infer = _operation(_plan_infer)
