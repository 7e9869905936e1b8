"""Bounds on what one request may cost the server.

- Body size (ASGI middleware): 413 before the body is read when Content-Length is too large, and
  as soon as a streamed body (no Content-Length) passes the limit.
- Body time (the same middleware): a body that pauses longer than the timeout gets 408, so a
  client that announces 1,000 bytes and sends 10 does not hold a request (and its memory)
  forever; a response sent before the body was read closes the connection, for the same reason.
- Header size and time (the HTTP protocol itself, `bounded_httptools`): uvicorn with httptools
  buffers a request's head without any limit before the app sees it (a 64 MB header was
  accepted), and waits for it forever; its only bound (h11_max_incomplete_event_size) is h11's.
  So the head gets 431 past the size limit and 408 when it has not arrived in full within the
  timeout, then the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._http import error_response

__all__ = ["BodyBoundsMiddleware", "bounded_httptools"]


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyBoundsMiddleware:
    """The request body's size (`max_bytes`) and each pause in it (`seconds`), around the whole
    app (authentication included): one wrapper of `receive` and `send` for both bounds.

    Once the body is complete, `receive` is left alone (an event stream waits on it for the
    disconnect). A response that starts before the body was all read (a 401, a 404 for an unknown
    model) closes the connection: uvicorn would otherwise go on reading that body, with no bound
    on how slowly it arrives, before the connection could serve another request."""

    def __init__(self, app: ASGIApp, max_bytes: int, seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.seconds = seconds

    def _too_large(self) -> str:
        mb = self.max_bytes / 2**20
        return (f"the request body is larger than this server's limit of {mb:g} MB "
                "(aiaas-lab serve --max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await error_response(400, "the Content-Length header is not a number",
                                     {"Connection": "close"})(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await error_response(413, self._too_large(), {"Connection": "close"})(scope, receive, send)
                return
        chunked = any(k == b"transfer-encoding" for k, _ in scope["headers"])
        complete = not chunked and not int(length or b"0")
        received = 0
        started = False

        async def bounded_receive() -> Message:
            nonlocal complete, received
            if complete:
                return await receive()
            try:
                message = await _within(self.seconds, receive())
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
                complete = not message.get("more_body", False)
            else:
                complete = True  # the client went away
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not complete:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await error_response(413, self._too_large(), {"Connection": "close"})(scope, receive, send)
        except _BodyTimeout:
            if not started:
                message = (f"the request body stopped arriving: nothing came for {self.seconds:g} s "
                           "(aiaas-lab serve --body-timeout-s)")
                await error_response(408, message, {"Connection": "close"})(scope, receive, send)


async def _within(seconds: float, awaitable: Any) -> Any:
    """`await awaitable` for at most `seconds` (TimeoutError after). asyncio.timeout (3.11+)
    cancels in place; wait_for, the fallback on 3.10, costs a Task per call."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise TimeoutError from None


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def bounded_httptools(max_header_bytes: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a bound on each request head's size and time.

    Counts what arrives while a head is incomplete (a head still streaming in), and the parsed
    URL and headers once it is complete (a head that came in one read with its body)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # between requests counts as the next one's head
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._refusal: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a request is closed too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            # Not re-armed by each arrival: a head has `header_timeout_s` in all, from its first
            # byte (from the connection for the first), so one byte a second cannot hold it for
            # as long as the size bound allows.
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A head pipelined behind a response still going out (an event stream): a raw 408
                # would land inside that response. It waits its turn; look again later.
                self._arm()
            elif self._head_bytes:
                self._refuse(408, f"the request's headers did not arrive within {header_timeout_s:g} s")
            else:
                self.transport.close()  # connected, never sent anything

        def _refuse(self, status: int, message: str) -> None:
            body = orjson.dumps({"error": message})
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes and not self.transport.is_closing():
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, self._too_large())
                else:
                    self._arm()

        def _too_large(self) -> str:
            return (f"the request's URL and headers are larger than this server's limit of "
                    f"{max_header_bytes // 1024} KiB (aiaas-lab serve --max-header-kb)")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._disarm()
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > max_header_bytes:
                self._refusal = 431
                raise ValueError("head too large")  # httptools stops parsing; send_400_response follows
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            if self._refusal == 431:
                self._refuse(431, self._too_large())
            else:
                super().send_400_response(msg)

    return BoundedHttpToolsProtocol
