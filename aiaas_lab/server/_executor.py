"""Runs queued jobs in worker processes, at most `max_jobs` at once, and records what they report.

The event loop only starts processes and reads their output; training happens in the workers
(`_runner`). Every event a worker reports is committed to the store before anyone can read it,
and a job's last event, its terminal status and its model are committed in one transaction, so
a reader that sees the terminal status has already seen every event.

After a crash or restart, a job still marked running is launched again with the engine's
resume (it continues from its last checkpoint); one interrupted too often is failed with the
reason, so no job stays running forever.

Faults that must not stop the service: a cancel the job ignores (a model hanging in forward) is
followed by a kill after CANCEL_GRACE_S; a store that refuses writes pauses the running jobs
(their workers block on the pipe) and the scheduler until it accepts them again, instead of
losing them; a job's processes are started and stopped only through `_procs` (own process
group, dead with the server). What a tenant reads about a failure is one line with no server
paths; the log tail behind it goes to the server's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .. import _procs
from ..engine.events import event_from_dict, to_wire
from ._blobs import Blobs
from ._ledger import claim, finish, insert_events, request_cancel, synthetic_end
from ._store import StorageUnavailable, Store

__all__ = ["Executor", "JobSignals", "MAX_LAUNCHES", "CANCEL_GRACE_S", "DEFAULT_JOB_MEMORY_MB"]

MAX_LAUNCHES = 4  # the first run and three resumes after the server stopped under it
CANCEL_GRACE_S = 10.0  # a cancelled job stops at its next step; one that does not is killed after this
STOP_GRACE_S = 2.0  # SIGTERM to SIGKILL when the server stops (the jobs resume from their checkpoints)
DEFAULT_JOB_MEMORY_MB = _procs.DEFAULT_JOB_MEMORY_MB  # per process of a job (RLIMIT_DATA, see _procs)
# What an allocation past the limit says (Python, torch's CPU allocator, C++); not "out of memory",
# which a CUDA OOM and our own exit descriptions also say.
_MEMORY_SIGNS = ("memoryerror", "can't allocate memory", "cannot allocate memory", "bad_alloc")
# Any other absolute path in tenant-facing text (a traceback's file names, a temp dir): the
# directories go, the file's own name stays.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>-])/(?:[^\s/'\"(),:;]+/)+")


class JobSignals:
    """Wakes whoever waits on a job (event streams, cancel) after something about it was committed."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def waiter(self, job_id: str) -> asyncio.Event:
        """Take this before reading the store, then wait on it: nothing committed after the read is missed."""
        return self._events.setdefault(job_id, asyncio.Event())

    def fire(self, job_id: str) -> None:
        event = self._events.pop(job_id, None)
        if event is not None:
            event.set()


@dataclass
class _Running:
    process: asyncio.subprocess.Process
    task: asyncio.Task[None] | None = None
    model: dict[str, Any] | None = None
    error: str | None = None
    ended: bool = False
    killer: asyncio.Task[None] | None = None  # the kill that follows an ignored cancel


class Executor:
    def __init__(self, store: Store, blobs: Blobs, jobs_dir: Path, signals: JobSignals, *, max_jobs: int,
                 threads_per_job: int, allow_code: bool, job_memory_mb: int | None = DEFAULT_JOB_MEMORY_MB,
                 on_model: Callable[[str, str], None] = lambda tenant, name: None) -> None:
        self.store, self.blobs, self.jobs_dir, self.signals = store, blobs, jobs_dir, signals
        self.max_jobs, self.threads_per_job, self.allow_code = max_jobs, threads_per_job, allow_code
        self.job_memory_mb = job_memory_mb
        self.on_model = on_model
        self._running: dict[str, _Running] = {}
        self._launching: set[str] = set()
        self._spare: asyncio.subprocess.Process | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._spare_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for row in self.store.all("SELECT id FROM jobs WHERE status = 'running' AND cancel_requested = 1"):
            await self._end(row["id"], synthetic_end("stopped", "cancelled"))  # cancelled while the server was down
        self._ensure_spare()
        self._loop_task = asyncio.create_task(self._schedule())
        self._wake.set()

    async def stop(self) -> None:
        """Stop the workers and everything they started; their jobs stay running and resume
        from their checkpoints at the next start."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._spare_task is not None:  # a spawn in flight: let it finish, so its process is known
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._spare_task), 10)
        processes = [r.process for r in self._running.values()] + ([self._spare] if self._spare else [])
        await asyncio.gather(*(_procs.astop(p, STOP_GRACE_S) for p in processes), return_exceptions=True)
        tasks = [t for r in self._running.values() for t in (r.task, r.killer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ scheduling

    def _next_job(self) -> str | None:
        # Jobs interrupted by a restart first (they already held a slot), then the queue in order.
        for row in self.store.all("SELECT id FROM jobs WHERE status IN ('running', 'queued') "
                                  "ORDER BY status = 'running' DESC, created_at, id"):
            if row["id"] not in self._running:
                return row["id"]
        return None

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._start_jobs()
            except StorageUnavailable as exc:  # nothing starts until the store takes writes again
                print(f"aiaas-lab serve: storage unavailable, scheduling paused: {exc.detail}", file=sys.stderr)
                await self.store.until_available()
                print("aiaas-lab serve: storage available again, scheduling resumed", file=sys.stderr)
                self._wake.set()

    async def _start_jobs(self) -> None:
        while len(self._running) < self.max_jobs and not self._stopping:
            job_id = self._next_job()
            if job_id is None:
                break
            try:
                await self._start_job(job_id)
            except StorageUnavailable:
                raise  # the job is unchanged (or running without a process): it starts again later
            except Exception as exc:  # a job that cannot even start fails alone
                print(f"aiaas-lab serve: job {job_id} could not start: {exc!r}", file=sys.stderr)
                self._running.pop(job_id, None)
                reason = self._public(job_id, f"the job could not start: {exc}")
                await self._end(job_id, synthetic_end("failed", error=reason))

    async def _start_job(self, job_id: str) -> None:
        job = await self.store.write(claim, job_id, time.time())
        if job is None:
            return
        if job["attempts"] > MAX_LAUNCHES:
            await self._end(job_id, synthetic_end(
                "failed", error=f"the server stopped {MAX_LAUNCHES} times while this job ran; it was not "
                                "restarted again (its last checkpoint is kept on the server)"))
            return
        self.signals.fire(job_id)  # queued -> running
        self._launching.add(job_id)
        try:
            process = await self._launch(self._worker_spec(job))
        finally:
            self._launching.discard(job_id)
        running = _Running(process=process)
        self._running[job_id] = running
        running.task = asyncio.create_task(self._follow(job_id, running))
        row = self.store.one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        if row is not None and row["cancel_requested"]:  # cancelled while it was being launched
            self._signal_cancel(job_id, running)

    def _worker_spec(self, job: dict[str, Any]) -> dict[str, Any]:
        """What the worker needs, with every upload hard-linked into the job's own folder so the
        job (and the model it registers) never depends on the blob store again."""
        directory = self.jobs_dir / job["id"]
        directory.mkdir(parents=True, exist_ok=True)
        request = orjson.loads(job["request"])
        tenant = job["tenant"]

        def local(sha: str, name: str) -> str:
            target = directory / name
            if not target.exists():
                source = self.blobs.find(tenant, sha)
                if source is None:
                    raise FileNotFoundError(f"the uploaded blob {sha} is missing from the server")
                try:
                    os.link(source, target)
                except OSError:
                    import shutil

                    shutil.copyfile(source, target)
            return str(target)

        model = dict(request["model"])
        if "export" in model:
            model["export"] = {"graph": local(model["export"]["graph"], "graph.json"),
                               "weights": local(model["export"]["weights"], "init.safetensors")}
        elif "pickle" in model:
            model["pickle"] = local(model["pickle"], "model.pkl")
        data = request["data"]
        if "tensors" in data:
            data = {"tensors": local(data["tensors"], "data.safetensors")}
        val = request["val"]
        if isinstance(val, dict):
            val = {"tensors": local(val["tensors"], "val.safetensors")}
        spec = {"job_id": job["id"], "dir": str(directory), "model": model, "data": data, "val": val,
                "hyperparameters": orjson.loads(job["hyperparameters"]), "threads": self.threads_per_job,
                "allow_code": self.allow_code, "attempt": job["attempts"],
                "preprocessing": request.get("preprocessing")}
        # Also on disk, for a launcher that takes a file (torchrun ... JOB.json) and for debugging.
        (directory / "job.json").write_bytes(orjson.dumps(spec, option=orjson.OPT_INDENT_2))
        return spec

    # ------------------------------------------------------------ worker processes

    async def _spawn(self) -> asyncio.subprocess.Process:
        # From the event loop's (main) thread: PR_SET_PDEATHSIG is tied to the thread that
        # forked, and this one lives as long as the server. Its own process group: a Ctrl-C in
        # the server's terminal never reaches it. Stopping its group does not reach torchrun (in a
        # session of its own): the runner passes SIGTERM on (_distributed_runner), PDEATHSIG kills.
        return await _procs.spawn([sys.executable, "-m", "aiaas_lab.server._runner", str(os.getpid())],
                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    def _ensure_spare(self) -> None:
        """One refill at a time: two launches in a row must not each start a spare (the first
        would be overwritten, an idle runner nobody stops)."""
        if self._spare_task is None or self._spare_task.done():
            self._spare_task = asyncio.create_task(self._refill_spare())

    async def _refill_spare(self) -> None:
        if self._spare is None and not self._stopping and self.max_jobs > 0:
            self._spare = await self._spawn()
            # one line per spare: the operator (and the tests) can count them
            print(f"aiaas-lab serve: spare runner started (pid {self._spare.pid})", file=sys.stderr)

    async def _launch(self, spec: dict[str, Any]) -> asyncio.subprocess.Process:
        """Start the worker process for one job. The one place a job becomes a process: a
        distributed job (workers > 1) will be launched through torchrun here."""
        spare, self._spare = self._spare, None
        for process in (spare, None):  # the warm spare, or a fresh process if the spare died
            if process is None or process.returncode is not None:
                process = await self._spawn()
            assert process.stdin is not None
            # The cap holds for the runner and whatever it starts from now on (torchrun, ranks).
            _procs.limit_memory(process.pid, self.job_memory_mb)
            try:
                process.stdin.write(orjson.dumps(spec) + b"\n")
                await process.stdin.drain()
                process.stdin.close()
                break
            except (BrokenPipeError, ConnectionResetError):
                continue
        self._ensure_spare()
        return process

    async def _follow(self, job_id: str, running: _Running) -> None:
        try:
            await self._read_worker(job_id, running)
        except Exception as exc:  # the job must end even when its output cannot be read or stored
            if self._stopping:
                return
            await _procs.astop(running.process, 0)
            print(f"aiaas-lab serve: job {job_id}: {exc!r}", file=sys.stderr)
            with contextlib.suppress(Exception):
                await self._end(job_id, synthetic_end("failed", error=f"the server lost track of the training "
                                                                       f"process ({type(exc).__name__})"))
        finally:
            if running.killer is not None:
                running.killer.cancel()
            if self._running.get(job_id) is running:
                del self._running[job_id]
            self._wake.set()

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A write for a running job: while the store refuses, wait and retry, so the job pauses
        (its worker blocks writing to the pipe) instead of being lost or failed."""
        while True:
            try:
                return await self.store.write(fn, *args)
            except StorageUnavailable as exc:
                if self._stopping:
                    raise
                print(f"aiaas-lab serve: storage unavailable, a job's events wait: {exc.detail}", file=sys.stderr)
                await self.store.until_available()

    async def _read_worker(self, job_id: str, running: _Running) -> None:
        process = running.process
        assert process.stdout is not None
        pending = b""
        while not running.ended:
            # Whatever the worker wrote since the last read, committed as one transaction: a
            # small model can report thousands of steps a second.
            chunk = await process.stdout.read(1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 2**24:
                raise ValueError("the worker wrote more than 16 MB without a line break")
            events: list[dict[str, Any]] = []
            ended = None
            for line in lines:
                try:
                    message = orjson.loads(line)
                    if "event" in message:
                        # Only well-formed engine events, stored in the codec's wire form (a NaN loss
                        # stays NaN through SQLite, SSE and the client).
                        event = to_wire(event_from_dict(message["event"]).to_dict())
                        if event["type"] == "run_ended":
                            ended = event
                            break
                        events.append(event)
                    elif "model" in message:
                        running.model = message["model"]
                    elif "error" in message:
                        running.error = str(message["error"])
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    print(f"aiaas-lab serve: job {job_id}: ignored a malformed worker message ({exc})", file=sys.stderr)
            if events:
                if await self._write(insert_events, job_id, events) is None:
                    await _procs.astop(process, 0)  # the job already ended (cancelled while it started)
                    break
                self.signals.fire(job_id)
            if ended is not None:
                running.ended = True
                if ended["status"] == "failed":
                    ended = {**ended, "error": self._failure(job_id, str(ended.get("error") or ""))}
                await self._end(job_id, ended, running.model)
        try:
            code = await asyncio.wait_for(process.wait(), 30 if running.ended else None)
        except asyncio.TimeoutError:  # finished, but something in it keeps the process alive
            code = await _procs.astop(process, 0)
        if not running.ended and not self._stopping:
            await self._end(job_id, self._unfinished(job_id, running, code))

    def _unfinished(self, job_id: str, running: _Running, code: int) -> dict[str, Any]:
        row = self.store.one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        if row is not None and row["cancel_requested"]:
            return synthetic_end("stopped", "cancelled")
        if running.error is not None:
            return synthetic_end("failed", error=self._failure(job_id, running.error))
        return synthetic_end("failed", error=self._failure(
            job_id, f"the training process exited unexpectedly ({_describe_exit(code)})"))

    def _failure(self, job_id: str, error: str) -> str:
        """The tenant's one line about a failed job; the server's log gets the whole text and
        the tail of the job's log, which can hold server paths and other tenants' nothing."""
        log = self.jobs_dir / job_id / "worker.log"
        tail = _log_tail(log)
        print(f"aiaas-lab serve: job {job_id} failed: {error}" + (f"\n  the end of {log}:\n{tail}" if tail else ""),
              file=sys.stderr)
        # Told by the error itself, not the log's tail: a job that printed "MemoryError" once
        # and failed for another reason is not out of memory. The original reason stays.
        if self.job_memory_mb and any(sign in error.lower() for sign in _MEMORY_SIGNS):
            return self._public(job_id, f"the job ran out of memory: it needed more than the server's limit of "
                                        f"{self.job_memory_mb} MB per process (--job-memory-mb); use a smaller "
                                        f"model, batch size or data set ({error})")
        return self._public(job_id, error)

    def _public(self, job_id: str, text: str) -> str:
        """`text` as one line without the server's paths (a job's own files keep their names)."""
        for path, shown in ((f"{self.jobs_dir / job_id}{os.sep}", ""), (str(self.jobs_dir / job_id), "."),
                            (str(self.jobs_dir.parent), "<data-dir>"), (sys.prefix, "<python>"),
                            (sys.base_prefix, "<python>"), (str(Path(__file__).parents[2]), "<server>")):
            text = text.replace(path, shown)
        line = " ".join(_ABSOLUTE_PATH.sub("<path>/", text).split())
        return line if len(line) <= 500 else line[:497] + "..."

    async def _end(self, job_id: str, event: dict[str, Any], model: dict[str, Any] | None = None) -> None:
        registered = await self._write(finish, job_id, event, model, time.time())
        if registered is not None:
            self.on_model(*registered)
        self.signals.fire(job_id)

    # ------------------------------------------------------------ cancel

    async def cancel(self, job_id: str) -> None:
        """Ask a job to stop; a queued one (or one waiting to resume) ends at once."""
        status = await self.store.write(request_cancel, job_id)
        if status is None:
            return
        running = self._running.get(job_id)
        if job_id in self._launching:
            return  # _start_job signals it once the process exists
        if running is None:
            reason = "cancelled before it started" if status == "queued" else "cancelled"
            await self._end(job_id, synthetic_end("stopped", reason))
            return
        self._signal_cancel(job_id, running)

    def _signal_cancel(self, job_id: str, running: _Running) -> None:
        with contextlib.suppress(ProcessLookupError):
            running.process.send_signal(signal.SIGUSR1)
        if running.killer is None:
            running.killer = asyncio.create_task(self._kill_after_grace(job_id, running))

    async def _kill_after_grace(self, job_id: str, running: _Running) -> None:
        """The engine stops at its next step; a job that never reaches one (a forward that
        hangs, a rank stuck in a collective) is killed, group and all, and ends cancelled."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(running.process.wait()), CANCEL_GRACE_S)
            return
        print(f"aiaas-lab serve: job {job_id} ignored its cancel for {CANCEL_GRACE_S:.0f} s; killing it",
              file=sys.stderr)
        await _procs.astop(running.process, STOP_GRACE_S)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            cause = " (out of memory, or killed by another process)" if -code == signal.SIGKILL else ""
            return f"killed by {signal.Signals(-code).name}{cause}"
    return f"exit code {code}"


def _log_tail(path: Path, limit: int = 2000) -> str:
    """The end of a job's log, for the server's own log (never for the tenant)."""
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""
