"""Rank 0's events on their way out of a worker: a JSON-lines file and/or an HTTP endpoint."""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

from ..engine.events import Event

__all__ = ["EventSink"]


class EventSink:
    """Rank 0's events: appended to a JSON-lines file (flushed per event, so a reader tailing it
    sees each one at once) and/or posted to a URL from a background thread, so a slow server
    never slows training."""

    def __init__(self, file: Path | None, url: str | None, token: str | None) -> None:
        self._file = open(file, "a", encoding="utf-8") if file is not None else None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._poster: threading.Thread | None = None
        if url:
            self._poster = threading.Thread(target=self._post, args=(url, token), daemon=True)
            self._poster.start()

    def __call__(self, event: Event) -> None:
        line = event.to_json()
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        if self._poster is not None:
            self._queue.put(line)

    def _post(self, url: str, token: str | None) -> None:
        import httpx

        headers = {"Content-Type": "application/x-ndjson"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        warned = False
        with httpx.Client(timeout=10.0) as client:
            done = False
            while not done:
                lines = [self._queue.get()]
                while True:  # send what has piled up as one request
                    try:
                        lines.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                done = None in lines
                lines = [line for line in lines if line is not None]
                if not lines:
                    continue
                body = "\n".join(lines) + "\n"
                for delay in (0.5, 1.0, 2.0, None):
                    try:
                        client.post(url, content=body, headers=headers).raise_for_status()
                        break
                    except httpx.HTTPError as exc:
                        if delay is None:
                            if not warned:  # the events file, if any, still has them
                                print(f"aiaas_lab.worker: could not post events to {url}: {exc}",
                                      file=sys.stderr, flush=True)
                                warned = True
                        else:
                            time.sleep(delay)

    def close(self) -> None:
        if self._poster is not None:
            self._queue.put(None)
            self._poster.join(timeout=15)
        if self._file is not None:
            self._file.close()


