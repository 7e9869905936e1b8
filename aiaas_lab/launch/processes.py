"""Data-parallel training from the notebook: `aiaas_lab.train(..., workers=N)`.

The kernel cannot itself be a rank, so it checks everything first (a mistake is still a clear
error in the cell), writes the job for `aiaas_lab.worker` into a private directory, starts N worker
processes that rendezvous on a free 127.0.0.1 port, and relays rank 0's events to the same
reporter and callbacks as local training. At the end it copies the weights back into the
kernel's own module. A stop (the widget's button, Ctrl-C) becomes the job's stop file, which all
ranks act on at the same step; a worker that dies ends the run within seconds, and no worker
outlives the call.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._errors import BadArgument, describe
from ..engine.data import InMemory, check_normalizable
from ..engine.events import EpochEnd, Event, RunEnded, event_from_json
from ..engine.inputs import Preprocessing
from ..engine.job import Job, replace
from ..engine.loop import resolve_device
from ..engine.prepare import PreparedRun, prepare
from .handle import RunHandle, StopSignal
from .result import TrainResult, result_of

__all__ = ["run_processes", "write_worker_job"]

# Once the run is over (rank 0 reported its end, or a worker exited), the workers get this long
# to exit on their own (a peer's death reaches them as a connection error at their next
# collective) before they are killed.
_GRACE_S = 5.0
_POLL_S = 0.05


def run_processes(job: Job, run: RunHandle) -> TrainResult:
    h = job.hyperparameters
    workers = int(h.workers)
    _check_options(h.device, workers)
    threads = h.threads or max(1, (os.cpu_count() or 1) // workers)
    stop = run.stop_signal
    with tempfile.TemporaryDirectory(prefix="aiaas-run-") as tmp:
        directory = Path(tmp)
        # The workers start first: their imports (seconds) overlap checking and writing the job.
        procs = _start_workers(directory, workers, threads)
        try:
            # Normalisation is the workers' (their preparation fits it on the same training split and
            # reports it with the weights); here the job is checked and split once.
            check_normalizable(job.data, h.normalize)  # refused here as on every launcher
            prepared = prepare(Job(model=job.model, data=job.data, val=job.val, target=job.target,
                                   hyperparameters=replace(h, normalize=False)))
            if not isinstance(prepared.data.train, InMemory):
                raise BadArgument("--workers", "in-memory data to shard across workers (tensors, arrays, a "
                                  "DataFrame or a built-in data set)", describe(job.data),
                                  "Pass the tensors themselves, or train with --workers 1.")
            run_id = uuid.uuid4().hex[:12]
            path = write_worker_job(directory, prepared, job, run_id=run_id, threads=threads)
            for proc in procs:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(f"{path}\n".encode())
                    proc.stdin.close()
                except BrokenPipeError:  # it died starting up; its exit status and log tell why
                    pass
            outcome, weights = _follow_workers(procs, directory, run.emit, stop)
            info = _output_info(directory / "model.safetensors")
        finally:
            _end(procs)
    module = prepared.module
    if weights:
        with torch.no_grad():
            module.load_state_dict(weights)
    preprocessing = Preprocessing.from_dict(info) if info else prepared.preprocessing
    return result_of(run, model=module, preprocessing=preprocessing, status=outcome["status"],
                     history=outcome["history"], error=outcome["error"], reason=outcome["reason"],
                     seconds=outcome["seconds"], run_id=run_id)


def _output_info(path: Path) -> dict[str, Any]:
    """The "aiaas.model" metadata rank 0 wrote with the weights (what predict needs)."""
    if not path.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("aiaas.model", "{}"))


def _names(preprocessing: Preprocessing) -> dict[str, Any]:
    """What only this side knows of the raw inputs: the workers see encoded tensors."""
    return {"classes": preprocessing.classes, "columns": preprocessing.columns,
            "categories": preprocessing.categories}


def _check_options(device_name: str, workers: int) -> None:
    device = resolve_device(device_name)
    if device.type == "mps":
        raise BadArgument("--device", "cpu or cuda with --workers (torch.distributed has no mps backend)",
                          repr(device_name))
    if device.type == "cuda" and torch.cuda.device_count() < workers:
        raise BadArgument("--workers", f"at most {torch.cuda.device_count()}, one per GPU",
                          str(workers), "Or train on the CPU with --device cpu.")


def write_worker_job(directory: Path, prepared: PreparedRun, job: Job, *, run_id: str, threads: int) -> Path:
    """JOB.json as `aiaas_lab.worker` reads it: the job's own hyperparameters, and its data
    already prepared (split, encoded, normalised), so every rank trains on exactly what the
    kernel checked."""
    from safetensors.torch import save_file

    from ..engine.checkpoint import state_dict_to_safetensors

    data = prepared.data
    train = data.train
    assert isinstance(train, InMemory)
    save_file({"X": train.X.contiguous(), "y": train.y.contiguous()}, str(directory / "train.safetensors"))
    hyperparameters = {**job.hyperparameters.to_dict(), "seed": prepared.config.seed, "threads": threads}
    if hyperparameters.get("checkpoint"):  # the worker reads paths relative to the job's directory
        hyperparameters["checkpoint"] = os.path.abspath(hyperparameters["checkpoint"])
    spec: dict[str, Any] = {"run_id": run_id, "data": {"tensors": "train.safetensors"},
                            "hyperparameters": hyperparameters, "preprocessing": _names(prepared.preprocessing),
                            "events": {"file": "events.jsonl"}, "output": "model.safetensors", "stop_file": "STOP"}
    if isinstance(data.val, InMemory):
        save_file({"X": data.val.X.contiguous(), "y": data.val.y.contiguous()}, str(directory / "val.safetensors"))
        spec["val"] = {"tensors": "val.safetensors"}
    module = prepared.module
    if prepared.spec is not None:
        spec["model"] = {"spec": prepared.spec}
        save_file(state_dict_to_safetensors(module.state_dict()), str(directory / "init.safetensors"))
        spec["weights"] = "init.safetensors"
    else:
        # The notebook's own module, class and all (cloudpickle carries classes defined in cells
        # by value); only this kernel's workers ever read the file.
        import cloudpickle

        try:
            blob = cloudpickle.dumps(module)
        except Exception as exc:
            raise BadArgument("MODEL", "a module that can be sent to worker processes (picklable)",
                              f"{describe(module)}: {type(exc).__name__}: {exc}") from None
        (directory / "model.pkl").write_bytes(blob)
        spec["model"] = {"pickle": "model.pkl"}
    path = directory / "job.json"
    path.write_text(json.dumps(spec))
    return path


class _EventTail:
    """New complete lines of a JSON-lines file that another process is appending to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [event_from_json(line) for line in lines if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failure(codes: dict[int, int], directory: Path) -> str:
    """What went wrong, cause first: of several failed workers, the one whose log was written to
    last (its error line) ended later, usually of a peer's death; a killed one writes nothing."""
    def last_write(rank: int) -> float:
        try:
            return (directory / f"rank{rank}.log").stat().st_mtime
        except OSError:
            return 0.0

    return "; ".join(_describe_exit(rank, codes[rank], directory / f"rank{rank}.log")
                     for rank in sorted(codes, key=last_write) if codes[rank])


def _agreed(codes: dict[int, int], directory: Path, outcome: dict[str, Any]) -> bool:
    """Every rank that failed did so for the reason rank 0 reported (a loss that stopped being
    finite ends all ranks at the same step, each exiting 1): that reason stands alone."""
    error = outcome.get("error")
    if outcome.get("status") != "failed" or not error:
        return False
    failed = [rank for rank, code in codes.items() if code]
    return all(codes[rank] == 1 and _last_line(rank, directory / f"rank{rank}.log") == error for rank in failed)


def _last_line(rank: int, log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].removeprefix(f"aiaas_lab.worker: rank {rank}: ").removeprefix("aiaas_lab.worker: ") if lines else ""


def _describe_exit(rank: int, code: int, log: Path) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        cause = " (out of memory, or killed by another process)" if -code == signal.SIGKILL else ""
        return f"worker {rank} was killed by {name}{cause}"
    last = _last_line(rank, log)
    return f"worker {rank} exited with status {code}" + (f": {last}" if last else "")


def _start_workers(directory: Path, workers: int, threads: int) -> list[subprocess.Popen[bytes]]:
    """`workers` ranks of `python -m aiaas_lab.worker -`, rendezvousing on a free local port;
    each waits for the job's path on stdin. Started through `_procs`: each in its own process
    group (no stray Ctrl-C, one kill) and killed by the system if this process dies."""
    from .. import _procs

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "GROUP_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(workers),
               LOCAL_WORLD_SIZE=str(workers), OMP_NUM_THREADS=str(threads),
               # the kernel's import path, so a model class from the user's own modules imports there too
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)),
               **{_procs.LAUNCHER_PID_ENV: str(os.getpid())})  # the parent each rank watches
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(workers):
            with open(directory / f"rank{rank}.log", "wb") as log:
                procs.append(_procs.popen(
                    [sys.executable, "-m", "aiaas_lab.worker", "-"],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT))
    except BaseException:
        _end(procs)
        raise
    return procs


def _follow_workers(procs: list[subprocess.Popen[bytes]], directory: Path, emit: Callable[[Event], None],
                    stop: StopSignal) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Relay the run's events until every worker has ended (or, once one has, until the others
    had their grace period); return the outcome and the final weights."""
    workers = len(procs)
    tail = _EventTail(directory / "events.jsonl")
    history: list[dict[str, float]] = []
    ended: RunEnded | None = None
    exits: dict[int, int] = {}  # rank -> exit status, as each worker ended on its own
    t0 = time.time()

    def relay() -> None:
        nonlocal ended
        for event in tail.read():
            if isinstance(event, RunEnded):
                ended = event  # held back: a worker's death may still change how the run ended
                continue
            if isinstance(event, EpochEnd):
                history.append({"epoch": event.epoch, **event.metrics})
            emit(event)

    try:
        over_since: float | None = None
        while len(exits) < workers:
            relay()
            if stop.is_set() and not (directory / "STOP").exists():
                (directory / "STOP.tmp").write_text(stop.reason or "stop requested")
                os.replace(directory / "STOP.tmp", directory / "STOP")  # appears with its reason
            for rank, proc in enumerate(procs):
                if rank not in exits and proc.poll() is not None:
                    exits[rank] = proc.returncode
            # Ranks other than 0 finish as soon as their loop does, while rank 0 still writes the
            # weights: the grace period starts when rank 0 is done, reported the end, or a rank failed.
            if over_since is None and (0 in exits or ended is not None or any(exits.values())):
                over_since = time.monotonic()
            if over_since is not None and time.monotonic() - over_since > _GRACE_S:
                break  # the rest are stuck: waiting for a peer that is gone, or in teardown
            time.sleep(_POLL_S)
    finally:
        _end(procs)
    relay()
    failure = _failure(exits, directory)

    outcome: dict[str, Any] = {"status": "failed", "history": history, "error": None, "reason": "",
                               "seconds": time.time() - t0, "steps": 0}
    weights: dict[str, torch.Tensor] = {}
    output = directory / "model.safetensors"
    if output.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(output), framework="pt") as f:
            outcome.update(json.loads((f.metadata() or {})["aiaas.outcome"]))
        weights = load_file(str(output))
    if failure and not _agreed(exits, directory, outcome):
        # A crash, a kill, a success with a dead peer, or ranks that failed differently: the
        # exits tell it, cause first.
        outcome["status"], outcome["error"] = "failed", failure
    elif outcome["error"] is None and outcome["status"] == "failed":
        outcome["error"] = "the workers ended without a result"
    steps = ended.steps if ended is not None else outcome["steps"]
    emit(RunEnded(status=outcome["status"], epochs_completed=len(outcome["history"]), steps=steps,
                  seconds=outcome["seconds"], reason=outcome["reason"], error=outcome["error"], time=time.time()))
    return outcome, weights


def _end(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop whatever is still running, with everything it started, and reap it: SIGTERM (a
    rank stops at its next step), SIGKILL for what is left a second later (stuck in a collective)."""
    from .. import _procs

    _procs.stop_all(procs, grace=1.0)
