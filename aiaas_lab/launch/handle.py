"""The run handle every launcher returns, the stop signal, and Ctrl-C as a stop.

A launcher (local, processes, remote) takes a `Job` and a `RunHandle`, reports each engine event
through `handle.emit`, and finishes with a `TrainResult`. The handle fans events out to the
subscribers (text progress, the widget, user callbacks), keeps the events so far, and is what
`train(..., background=True)` returns: `.status`, `.stop()`, `.wait()`, `.result`, `.events`.

Subscribers observe: one that raises does not crash the loop from inside. Its error is kept, the
run is asked to stop at the next step (on a server: the job is cancelled), and the run ends
`failed` with that error, on every launcher alike.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..engine.events import Event, RunEnded, RunStarted
from ..engine.stop import StopSignal

__all__ = ["StopSignal", "RunHandle", "BackgroundRun", "RemoteRun", "interrupt_stops"]


@contextlib.contextmanager
def interrupt_stops(stop: StopSignal) -> Iterator[None]:
    """Turn the first Ctrl-C (or the notebook's Interrupt button, which sends SIGINT) into a stop
    at the next step boundary, so the model is never left mid-update; a second one interrupts as
    usual, for a forward pass that hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        stop.request("interrupted")
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class RunHandle:
    """One training run, wherever its loop runs."""

    kind = "Run"

    def __init__(self, stop: StopSignal | None = None,
                 subscribers: Iterable[Callable[[Event], None]] = ()) -> None:
        self._stop = stop or StopSignal()
        self._subscribers = list(subscribers)
        self._started = threading.Event()  # the first step is about to run, or the run is over
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._ended: RunEnded | None = None
        self.subscriber_error: str | None = None
        self.events: list[Event] = []  # every event so far, in order
        self.result: Any = None  # the TrainResult, once the run has ended
        self.job_id: str | None = None  # set by the remote launcher
        self.client: Any = None  # the remote launcher's client, while it follows the job
        self.where = ""  # "on URL" for a server job
        self._notes: list[str] | None = None  # held for the caller while the run starts on a thread

    @property
    def stop_signal(self) -> StopSignal:
        return self._stop

    @property
    def status(self) -> str:
        """"starting", "running", then the run's own status: "completed", "stopped" or "failed"."""
        if self.result is not None:
            return self.result.status
        if self._error is not None:
            return "failed"
        if self._ended is not None:
            return self._ended.status
        return "running" if any(isinstance(e, RunStarted) for e in self.events[:1]) else "starting"

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the run to stop at the next step boundary; `.wait()` then returns its result."""
        self._stop.request(reason)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends and return its TrainResult; raise TimeoutError if it has not
        ended within `timeout` seconds. Ctrl-C (or Interrupt) while waiting stops the run at the
        next step, as it does for a blocking run, and still returns its result."""
        with interrupt_stops(self._stop):
            finished = self._finished.wait(timeout)
        if not finished:
            raise TimeoutError(f"the run is still {self.status} after {timeout} s; "
                               "call .wait() again, or .stop() to end it")
        if self._error is not None:
            raise self._error
        return self.result

    # -- the launcher's side -------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Record `event` and hand it to every subscriber."""
        self.events.append(event)
        if isinstance(event, RunStarted):
            self._started.set()
        elif isinstance(event, RunEnded):
            self._ended = event
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:
                self._subscribers.remove(subscriber)
                if self.subscriber_error is None:
                    name = getattr(subscriber, "__qualname__", type(subscriber).__qualname__)
                    self.subscriber_error = f"the callback {name} raised {type(exc).__name__}: {exc}"
                    self._stop.request(self.subscriber_error)

    def say(self, text: str) -> None:
        """A line for the person who started the run (which server took the job, how the model
        travelled). From a background thread it is printed by the caller's thread, in the cell
        that started the run, once the run is under way."""
        if self._notes is None:
            print(text)
        else:
            self._notes.append(text)

    def accepted(self) -> None:
        """The run was checked and handed over (a server queued it): a background caller may
        return now, while the run waits for its first step elsewhere."""
        self._started.set()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if result is not None and self.subscriber_error and result.status != "failed":
            result.status, result.error = "failed", self.subscriber_error
        self.result, self._error = result, error
        self._finished.set()
        self._started.set()

    def run_in_thread(self, target: Callable[[], Any], name: str) -> RunHandle:
        """Run `target` (a launcher call returning the TrainResult) on a worker thread; return once
        the first step is about to run, raising here whatever failed before it (a bad argument,
        data that does not fit), exactly as a blocking run would."""

        def work() -> None:
            try:
                self.finish(target())
            except BaseException as exc:  # reported to the caller (before the start) or by .wait()
                self.finish(error=exc)

        self._notes = []
        threading.Thread(target=work, name=name, daemon=True).start()
        try:
            self._started.wait()
        except BaseException:  # Ctrl-C while the run starts: it must not go on with no handle
            self._stop.request("interrupted")
            raise
        notes, self._notes = self._notes, None
        for note in notes:
            print(note)
        if self._error is not None and not self.events and self.job_id is None:
            raise self._error
        return self

    def __repr__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        if self.result is not None:
            return f"{self.kind}: {self.status}{where}\n{self.result!r}"
        return (f"{self.kind}: {self.status}{where}. .wait() returns the TrainResult; .stop() "
                f"{'cancels the job' if self.job_id else 'stops at the next step'}.")


class BackgroundRun(RunHandle):
    """A run whose loop is in this process (or its worker processes), followed from a thread."""

    kind = "BackgroundRun"


class RemoteRun(RunHandle):
    """A job on a server, followed from here; `.job_id` names it there."""

    kind = "RemoteRun"
