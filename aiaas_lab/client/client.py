"""The HTTP client for an aiaas-lab server, and for inference, any Open Inference Protocol (KServe
V2) server such as MLServer or Triton.

This module is the blocking `Client`, and the place the client's names are imported from
(`AsyncClient`, `RemoteError`, `Blob`, ...). The pieces live beside it, one concern each:
`_operations` (every operation, once, as a plan of requests), `_transport` (token, error wording,
retries), `_wire` (requests as values), `_tensors` (V2 tensors and safetensors blobs), `_stream`
(following a job's events) and `async_client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from ._operations import _Operations
from ._stream import Frame, _EventStream
from ._tensors import Blob, ModelWeights
from ._wire import DEFAULT_TIMEOUT, TERMINAL_STATUSES, Plan, RemoteError, T, _normalize_url
from .async_client import AsyncClient

__all__ = ["Client", "AsyncClient", "RemoteError", "Blob", "ModelWeights", "TERMINAL_STATUSES",
           "DEFAULT_TIMEOUT", "_normalize_url"]


class Client(_Operations):
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

    def _run(self, plan: Plan[T]) -> T:
        exchanges, outcome = self._exchanges(plan), None
        try:
            while True:
                call, wait = exchanges.send(outcome)
                if wait:
                    time.sleep(wait)
                try:
                    outcome = self._http.request(call.method, call.path, **self._request_args(call))
                except httpx.TransportError as exc:
                    outcome = exc
        except StopIteration as done:
            return done.value

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[Frame]:
        """The job's events as (id, event), replayed from `after` then live, until the job ends.

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or repeated."""
        stream = _EventStream(self, job_id, after)
        while True:
            error: BaseException | None = None
            try:
                with self._http.stream("GET", **stream.request()) as response:
                    if response.status_code != 200:
                        response.read()
                    stream.opened(response)
                    for line in response.iter_lines():
                        if (frame := stream.feed(line)) is not None:
                            yield frame
            except httpx.TransportError as exc:
                error = exc
            else:
                tail = self._run(stream.plan_tail())
                if tail is not None:
                    yield from tail
                    return
            time.sleep(stream.wait_s(error))
