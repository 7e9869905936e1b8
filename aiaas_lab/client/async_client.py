"""`AsyncClient`: the same operations as `Client`, awaited, for code that already runs an event
loop (a server, a notebook's async cell). Only the I/O is here; what is sent, retried and read is
decided once in `_operations`, `_transport` and `_stream`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ._operations import _Operations
from ._stream import Frame, _EventStream
from ._wire import DEFAULT_TIMEOUT, Plan, T

__all__ = ["AsyncClient"]


class AsyncClient(_Operations):
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

    async def _run(self, plan: Plan[T]) -> T:
        exchanges, outcome = self._exchanges(plan), None
        try:
            while True:
                call, wait = exchanges.send(outcome)
                if wait:
                    await asyncio.sleep(wait)
                try:
                    outcome = await self._http.request(call.method, call.path, **self._request_args(call))
                except httpx.TransportError as exc:
                    outcome = exc
        except StopIteration as done:
            return done.value

    async def stream_events(self, job_id: str, after: int = 0) -> AsyncIterator[Frame]:
        """See `Client.stream_events`."""
        stream = _EventStream(self, job_id, after)
        while True:
            error: BaseException | None = None
            try:
                async with self._http.stream("GET", **stream.request()) as response:
                    if response.status_code != 200:
                        await response.aread()
                    stream.opened(response)
                    async for line in response.aiter_lines():
                        if (frame := stream.feed(line)) is not None:
                            yield frame
            except httpx.TransportError as exc:
                error = exc
            else:
                tail = await self._run(stream.plan_tail())
                if tail is not None:
                    for frame in tail:
                        yield frame
                    return
            await asyncio.sleep(stream.wait_s(error))
