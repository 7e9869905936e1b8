"""`train(..., background=True)` / `%aiaas train ... --background`: training on a worker thread.

The caller gets a `BackgroundRun` handle once the run has started, so everything that
`train_local` validates before the first step (data, model, options) still raises in the caller's
cell; after that the cell returns and the widget keeps updating while the kernel is idle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..engine.loop import TrainConfig
from ..engine.events import Event, RunEnded, RunStarted

__all__ = ["BackgroundRun", "train_in_background"]


class BackgroundRun:
    """A training run on a worker thread: `.status`, `.result`, `.wait()`, `.stop()`."""

    def __init__(self, stop: Any) -> None:
        self._stop = stop
        self._started = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended: RunEnded | None = None
        self.result: Any = None  # the TrainResult, once the run has ended

    @property
    def status(self) -> str:
        """"starting", "running", then the run's own status: "completed", "stopped" or "failed"."""
        if self.result is not None:
            return self.result.status
        if self._error is not None:
            return "failed"
        if self._ended is not None:
            return self._ended.status
        return "running" if self._started.is_set() else "starting"

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary; `.wait()` then returns its result."""
        self._stop.request("stop requested")

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends and return its TrainResult; raise TimeoutError if it has not
        ended within `timeout` seconds. Ctrl-C (or Interrupt) while waiting stops the run at the
        next step, as it does for a blocking run, and still returns its result."""
        from .._api import _interrupt_stops

        with _interrupt_stops(self._stop):
            finished = self._finished.wait(timeout)
        if not finished:
            raise TimeoutError(f"the background run is still {self.status} after {timeout} s; "
                               "call .wait() again, or .stop() to end it")
        if self._error is not None:
            raise self._error
        return self.result

    def _watch(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._started.set()
        elif isinstance(event, RunEnded):
            self._ended = event

    def __repr__(self) -> str:
        if self.result is not None:
            return f"BackgroundRun: {self.status}\n{self.result!r}"
        return f"BackgroundRun: {self.status}. .wait() returns the TrainResult; .stop() stops at the next step."


def train_in_background(model: Any, data: Any, cfg: TrainConfig, *, workers: int = 1, val: Any = None,
                        target: str | None = None, normalize: bool = False, threads: int | None = None,
                        progress: Any = "auto", callbacks: Iterable[Callable[[Event], None]] = (),
                        stop: Any = None, name: str | None = None, shard: bool = False) -> BackgroundRun:
    """Start `train_local` (or distributed training, for `workers > 1` or `shard`) on a worker
    thread and return its handle once the first step is about to run."""
    from .._api import StopSignal, train_local
    from ..notebook.progress import make_reporter

    stop = stop or StopSignal()
    run = BackgroundRun(stop)
    # The reporter is made here, on the caller's thread, so its view is displayed in the cell
    # that started the run even if other messages reach the kernel meanwhile.
    reporter = make_reporter(progress, stop)
    options: dict[str, Any] = dict(val=val, target=target, normalize=normalize, threads=threads,
                                   progress=reporter if reporter is not None else False,
                                   callbacks=[run._watch, *callbacks], stop=stop, name=name, shard=shard)
    if workers > 1 or shard:
        from .processes import train_distributed

        def runner() -> Any:
            return train_distributed(model, data, cfg, workers=workers, **options)
    else:
        def runner() -> Any:
            return train_local(model, data, cfg, **options)

    def work() -> None:
        try:
            run.result = runner()
        except BaseException as exc:  # reported to the caller (before the start) or by .wait()
            run._error = exc
        finally:
            run._finished.set()
            run._started.set()  # wakes the caller when the run failed before its first step

    run._thread = threading.Thread(target=work, name="aiaas-background-training", daemon=True)
    run._thread.start()
    run._started.wait()
    if run._error is not None and run._ended is None:
        # Failed before the first step: a bad argument, data that does not fit the model. Raise
        # it here, in the caller's cell, exactly as a blocking run would, and drop the empty view.
        close = getattr(reporter, "close", None)
        if close is not None:
            close()
        raise run._error
    return run
