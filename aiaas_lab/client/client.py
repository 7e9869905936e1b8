"""The HTTP client for an aiaas-lab server, and for inference, any Open Inference Protocol (KServe
V2) server such as MLServer or Triton.

Each operation is written once, as a *plan*: a generator that yields the requests it needs and
receives their responses. `Client` runs plans with blocking I/O and `AsyncClient` with `await`, so
the two cannot drift apart. Every request this client makes is idempotent (a job is created with
an `Idempotency-Key`, blobs are content-addressed, cancel and infer have no cumulative effect),
which is what makes retrying after a dropped connection or a 503 safe.

The token lives in one private attribute. It is sent in the Authorization header and nowhere
else: it is absent from every repr, and every error message is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import httpx
import numpy as np
import torch

from .._errors import AiaasError, BadArgument
from ..engine.events import Event, event_from_dict

__all__ = ["Client", "AsyncClient", "RemoteError", "Blob", "ModelWeights", "TERMINAL_STATUSES"]

T = TypeVar("T")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# The server sends a keep-alive comment every 15 s, so a stream silent for longer than this is dead.
_STREAM_READ_TIMEOUT = 45.0
# How long an event stream keeps reconnecting before it gives up: long enough to ride out a
# server restart.
_RECONNECT_S = 30.0
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

_NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class RemoteError(AiaasError):
    """The server answered with an error; `status` is the HTTP status code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Blob(NamedTuple):
    sha256: str
    size: int
    uploaded: bool  # False when the server already had it and nothing was sent


class ModelWeights(NamedTuple):
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]  # the "aiaas.model" metadata: task, classes, input_shape, spec, normalizer


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] | None = None
    ok: tuple[int, ...] = (200, 201)  # statuses the plan reads itself; any other is an error


Plan = Generator[_Call, httpx.Response, T]


def _normalize_url(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadArgument("--backend", "an http:// or https:// URL", repr(url))
    return url.rstrip("/")


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(str(name), safe="")


def _model_path(name: str, version: int | str | None) -> str:
    path = f"/v2/models/{_quote(name)}"
    return path + (f"/versions/{_quote(str(version))}" if version is not None else "")


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The str->str metadata of a safetensors file, read from its header without loading it."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    return header.get("__metadata__") or {}


class _SSEParser:
    """Server-sent events, line by line: yields (id, event) once a frame's blank line arrives."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[int, Event] | None:
        if not line:
            if not self._data or self._id is None:
                self._data = []
                return None
            data, self._data = "\n".join(self._data), []
            return self._id, event_from_dict(json.loads(data))
        if line.startswith(":"):  # a keep-alive comment
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "id":
            try:
                self._id = int(value)
            except ValueError:
                pass
        return None


class _Base:
    """State, error wording and the plans shared by `Client` and `AsyncClient`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int = 3) -> None:
        self.url = _normalize_url(url)
        token = token if token is not None else os.environ.get("AIAAS_TOKEN")
        self._token = token.strip() if token and token.strip() else None
        self.retries = int(retries)
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=min(5.0, timeout))
        self.timeout = timeout
        self._info: dict[str, Any] | None = None
        self._metadata: dict[tuple[str, str | None], dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, token={'<set>' if self._token else None})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout.connect, read=_STREAM_READ_TIMEOUT, write=self.timeout.write,
                             pool=self.timeout.pool)

    # -- error wording ----------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        # A very short token would turn every occurrence of its letters into stars, and showing
        # a 't' in a message reveals nothing.
        return text.replace(self._token, "***") if self._token and len(self._token) >= 8 else text

    def _error_for(self, call: _Call, response: httpx.Response) -> AiaasError:
        status = response.status_code
        if status == 401:
            if self._token is None:
                message = (f"The server at {self.url} needs a token: pass token=..., set the AIAAS_TOKEN "
                           f"environment variable, or run %aiaas connect {self.url} --token TOKEN.")
            else:
                message = (f"The server at {self.url} rejected the token (401 Unauthorized): check the token "
                           "given as token=..., in AIAAS_TOKEN or to %aiaas connect.")
            return RemoteError(message, status)
        text = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                text = str(body.get("error") or body.get("detail") or "")
        except (ValueError, UnicodeDecodeError):
            text = response.text[:300].strip() if call.method != "HEAD" else ""
        text = text or response.reason_phrase or "no details"
        verb = "refused" if status < 500 else "failed on"
        return RemoteError(self._redact(f"The server at {self.url} {verb} {call.method} {call.path} "
                                        f"({status}): {text}"), status)

    def _unreachable(self, exc: BaseException | None, tries: int) -> AiaasError:
        if isinstance(exc, httpx.ConnectTimeout):
            reason = f"no connection within {self.timeout.connect:g} s"
        elif isinstance(exc, httpx.TimeoutException):
            reason = "no answer in time"
        elif isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or "cannot connect"
        elif exc is not None:
            reason = f"the connection dropped ({type(exc).__name__})"
        else:
            reason = "the connection dropped"
        attempts = f" after {tries} attempts" if tries > 1 else ""
        return AiaasError(self._redact(f"Cannot reach the server at {self.url}{attempts}: {reason}. "
                                       "Is it running (aiaas-lab serve), and is the URL right?"))

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after:
            try:
                return min(float(retry_after), 10.0)
            except ValueError:
                pass
        # Exponential backoff with jitter, so clients that failed together do not retry together.
        return min(0.2 * 2 ** attempt, 4.0) * (0.5 + random.random() / 2)

    def _request_args(self, call: _Call) -> dict[str, Any]:
        headers = self._headers()
        headers.update(call.headers or {})
        args: dict[str, Any] = {"params": call.params, "headers": headers}
        if call.json is not None:
            args["json"] = call.json
        if call.content is not None:
            args["content"] = call.content
        return args

    # -- plans ------------------------------------------------------------------------------

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
        from safetensors.torch import save

        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        return (yield from self._plan_upload(blob))

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
        from safetensors.torch import load

        params = {"version": version} if version is not None else None
        response = yield _Call("GET", f"/v1/models/{_quote(name)}/weights", params=params)
        blob = response.content
        info = json.loads(_safetensors_metadata(blob).get("aiaas.model", "{}"))
        return ModelWeights(load(blob), info)

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
        if binary:
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
        else:
            tensor["data"] = array.reshape(-1).tolist()
            call = _Call("POST", _model_path(name, version) + "/infer", json=request)
        response = yield call
        return _decode_infer(response, output_names[0] if output_names else None)


def _as_numpy(inputs: Any) -> np.ndarray:
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().cpu().numpy()
    return np.asarray(inputs)


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


def _blocking(plan: Callable[..., Plan[T]]) -> Callable[..., T]:
    @functools.wraps(plan)
    def method(self: Client, *args: Any, **kwargs: Any) -> T:
        return self._run(plan(self, *args, **kwargs))

    method.__name__ = method.__qualname__ = plan.__name__.removeprefix("_plan_")
    return method


def _awaitable(plan: Callable[..., Plan[T]]) -> Callable[..., Any]:
    @functools.wraps(plan)
    async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> T:
        return await self._run(plan(self, *args, **kwargs))

    method.__name__ = method.__qualname__ = plan.__name__.removeprefix("_plan_")
    return method


class _Reconnect:
    """When an event stream drops, how long to wait before resuming, and when to give up."""

    def __init__(self, client: _Base) -> None:
        self.client = client
        self.attempt = 0
        self.deadline: float | None = None

    def connected(self) -> None:
        self.attempt, self.deadline = 0, None

    def wait_s(self, exc: BaseException | None) -> float:
        now = time.monotonic()
        self.deadline = self.deadline or now + _RECONNECT_S
        if now >= self.deadline:
            raise self.client._unreachable(exc, self.attempt + 1) from None
        self.attempt += 1
        return min(0.1 * 2 ** self.attempt, 2.0)


def _stream_request(job_id: str, last: int) -> dict[str, Any]:
    headers = {"Accept": "text/event-stream"}
    if last:
        headers["Last-Event-ID"] = str(last)
    return {"url": f"/v1/jobs/{_quote(job_id)}/events", "params": {"after": last}, "headers": headers}


class Client(_Base):
    """A blocking client: `Client(url, token=None, timeout=30, retries=3)`; the token defaults to
    the `AIAAS_TOKEN` environment variable. Use it as a context manager, or call `close()`."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int = 3) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._http.request(call.method, call.path, **self._request_args(call))
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(exc, attempt + 1) from None
            else:
                if response.status_code != 503 or attempt == self.retries:
                    return response
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")

    def _run(self, plan: Plan[T]) -> T:
        try:
            call = next(plan)
            while True:
                response = self._send(call)
                if response.status_code not in call.ok:
                    raise self._error_for(call, response)
                call = plan.send(response)
        except StopIteration as done:
            return done.value

    server_info = _blocking(_Base._plan_server_info)
    ready = _blocking(_Base._plan_ready)
    upload = _blocking(_Base._plan_upload)
    upload_tensors = _blocking(_Base._plan_upload_tensors)
    create_job = _blocking(_Base._plan_create_job)
    get_job = _blocking(_Base._plan_get_job)
    list_jobs = _blocking(_Base._plan_list_jobs)
    cancel_job = _blocking(_Base._plan_cancel_job)
    events = _blocking(_Base._plan_events)
    models = _blocking(_Base._plan_models)
    model_weights = _blocking(_Base._plan_model_weights)
    model_metadata = _blocking(_Base._plan_model_metadata)
    infer = _blocking(_Base._plan_infer)

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[tuple[int, Event]]:
        """The job's events as (id, event), replayed from `after` then live, until the job ends.

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or repeated."""
        last, retry = after, _Reconnect(self)
        while True:
            error: BaseException | None = None
            try:
                with self._http.stream("GET", timeout=self._stream_timeout(),
                                       **_merge_auth(self, _stream_request(job_id, last))) as response:
                    if response.status_code != 200:
                        response.read()
                        raise self._error_for(_Call("GET", f"/v1/jobs/{job_id}/events"), response)
                    retry.connected()
                    parser = _SSEParser()
                    for line in response.iter_lines():
                        frame = parser.feed(line)
                        if frame is not None and frame[0] > last:
                            last = frame[0]
                            yield frame
            except httpx.TransportError as exc:
                error = exc
            else:
                # The server ends the stream once the job's terminal state is stored; make sure,
                # and pick up anything sent after the stream's last frame.
                if self.get_job(job_id)["status"] in TERMINAL_STATUSES:
                    yield from (f for f in self.events(job_id, after=last) if f[0] > last)
                    return
            time.sleep(retry.wait_s(error))


class AsyncClient(_Base):
    """The same methods as `Client`, as coroutines (`stream_events` is an async iterator)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retries: int = 3) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = await self._http.request(call.method, call.path, **self._request_args(call))
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise self._unreachable(exc, attempt + 1) from None
            else:
                if response.status_code != 503 or attempt == self.retries:
                    return response
            await asyncio.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")

    async def _run(self, plan: Plan[T]) -> T:
        try:
            call = next(plan)
            while True:
                response = await self._send(call)
                if response.status_code not in call.ok:
                    raise self._error_for(call, response)
                call = plan.send(response)
        except StopIteration as done:
            return done.value

    server_info = _awaitable(_Base._plan_server_info)
    ready = _awaitable(_Base._plan_ready)
    upload = _awaitable(_Base._plan_upload)
    upload_tensors = _awaitable(_Base._plan_upload_tensors)
    create_job = _awaitable(_Base._plan_create_job)
    get_job = _awaitable(_Base._plan_get_job)
    list_jobs = _awaitable(_Base._plan_list_jobs)
    cancel_job = _awaitable(_Base._plan_cancel_job)
    events = _awaitable(_Base._plan_events)
    models = _awaitable(_Base._plan_models)
    model_weights = _awaitable(_Base._plan_model_weights)
    model_metadata = _awaitable(_Base._plan_model_metadata)
    infer = _awaitable(_Base._plan_infer)

    async def stream_events(self, job_id: str, after: int = 0) -> AsyncIterator[tuple[int, Event]]:
        """See `Client.stream_events`."""
        last, retry = after, _Reconnect(self)
        while True:
            error: BaseException | None = None
            try:
                async with self._http.stream("GET", timeout=self._stream_timeout(),
                                             **_merge_auth(self, _stream_request(job_id, last))) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise self._error_for(_Call("GET", f"/v1/jobs/{job_id}/events"), response)
                    retry.connected()
                    parser = _SSEParser()
                    async for line in response.aiter_lines():
                        frame = parser.feed(line)
                        if frame is not None and frame[0] > last:
                            last = frame[0]
                            yield frame
            except httpx.TransportError as exc:
                error = exc
            else:
                if (await self.get_job(job_id))["status"] in TERMINAL_STATUSES:
                    for frame in await self.events(job_id, after=last):
                        if frame[0] > last:
                            yield frame
                    return
            await asyncio.sleep(retry.wait_s(error))


def _merge_auth(client: _Base, request: dict[str, Any]) -> dict[str, Any]:
    request["headers"] = {**client._headers(), **request["headers"]}
    return request
