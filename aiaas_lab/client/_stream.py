"""Following a job's events over Server-Sent Events: the frame parser and the bookkeeping of one
`stream_events` call (what to ask for, which frames are new, when a dropped stream gives up), kept
apart from the I/O so that the blocking and the async client differ only in how they read lines.

The parser is a few lines of the SSE format (data, id, comments) rather than a dependency: the
server writes exactly that subset, and the frames become engine events here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import httpx

from ..engine.events import Event, event_from_dict
from ._operations import _Operations
from ._wire import TERMINAL_STATUSES, Plan, _Call, _quote

# How long an event stream keeps reconnecting before it gives up: long enough to ride out a
# server restart.
_RECONNECT_S = 30.0

Frame = tuple[int, Event]


class _SSEParser:
    """Server-sent events, line by line: yields (id, event) once a frame's blank line arrives."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Frame | None:
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


class _EventStream:
    """One `stream_events` call. A dropped connection is resumed with `Last-Event-ID` and frames
    at or before the last one delivered are dropped, so no event is lost or repeated."""

    def __init__(self, client: _Operations, job_id: str, after: int) -> None:
        self.client, self.job_id, self.last = client, job_id, after
        self._parser = _SSEParser()
        self._attempt = 0
        self._deadline: float | None = None

    def request(self) -> dict[str, Any]:
        """The arguments of the streaming GET, resuming after the last frame delivered."""
        headers = {**self.client._headers(), "Accept": "text/event-stream"}
        if self.last:
            headers["Last-Event-ID"] = str(self.last)
        return {"url": f"/v1/jobs/{_quote(self.job_id)}/events", "params": {"after": self.last},
                "headers": headers, "timeout": self.client._stream_timeout()}

    def opened(self, response: httpx.Response) -> None:
        """Check the stream's answer (its body already read when it is an error)."""
        if response.status_code != 200:
            raise self.client._error_for(_Call("GET", f"/v1/jobs/{self.job_id}/events"), response)
        self._attempt, self._deadline = 0, None
        self._parser = _SSEParser()

    def feed(self, line: str) -> Frame | None:
        """The frame this line completes, if it is one not delivered yet."""
        frame = self._parser.feed(line)
        if frame is None or frame[0] <= self.last:
            return None
        self.last = frame[0]
        return frame

    def plan_tail(self) -> Plan[list[Frame] | None]:
        """After the stream ended: the frames stored since its last one when the job is over (the
        server ends a stream once the terminal state is stored; this makes sure, and picks up
        anything sent after the last frame), or None to reconnect."""
        job = yield from self.client._plan_get_job(self.job_id)
        if job["status"] not in TERMINAL_STATUSES:
            return None
        frames: Iterable[Frame] = yield from self.client._plan_events(self.job_id, after=self.last)
        return [f for f in frames if f[0] > self.last]

    def wait_s(self, exc: BaseException | None) -> float:
        """How long to wait before reconnecting; the unreachable error once that has gone on too long."""
        now = time.monotonic()
        self._deadline = self._deadline or now + _RECONNECT_S
        if now >= self._deadline:
            raise self.client._unreachable(exc, self._attempt + 1) from None
        self._attempt += 1
        return min(0.1 * 2 ** self._attempt, 2.0)
