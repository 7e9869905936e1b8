"""The stop request every launcher hands the loop: the widget's button, Ctrl-C, a cancel from a
server, a policy. The loop only asks `is_set()` between steps (see `loop.StopFlag`)."""

from __future__ import annotations

import threading

__all__ = ["StopSignal"]


class StopSignal(threading.Event):
    """A stop request the loop checks between steps; `reason` says who asked."""

    reason = ""

    def request(self, reason: str = "stop requested") -> None:
        if not self.is_set():
            self.reason = reason
        self.set()
