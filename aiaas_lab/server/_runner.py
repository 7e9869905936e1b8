"""The training worker: one process per job, started by the server's executor.

    python -m aiaas_lab.server._runner PARENT_PID

It imports torch and the engine first, then waits for one job on stdin (one JSON line), so the
server can keep a warm one ready and a job's first event arrives in well under a second
instead of after torch's import. It runs the existing engine and writes one JSON message per
line to the protocol channel (its original stdout; whatever the model prints goes to the job's
log instead):

    {"event": EVENT}   every engine event, in order (the run_ended event last)
    {"model": INFO}    the trained weights were saved to model.safetensors (before run_ended)
    {"error": TEXT}    the job could not start (bad data, a model that does not fit, ...)

SIGUSR1 asks the engine to stop at the next step (cancel); it keeps its checkpoint. The
process dies with the server (PR_SET_PDEATHSIG on Linux, and a parent check at every step
elsewhere) so a restarted server never finds a stray worker writing the same checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, BinaryIO

__all__ = ["main", "run_job"]


def _die_with_parent(parent: int) -> None:
    # The executor starts this process with PDEATHSIG already (aiaas_lab._procs); this covers a
    # runner started by hand, and a server that died before this line.
    from .. import _procs

    _procs.die_with_parent(parent)


def _send(channel: BinaryIO, message: dict[str, Any]) -> None:
    import orjson

    from ..engine.events import to_wire

    # The event codec's wire form: a NaN or infinite loss crosses as a string and comes back a float.
    channel.write(orjson.dumps(to_wire(message)) + b"\n")
    channel.flush()


def _load_pair(path: str) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["X"], tensors["y"]


def job_of(spec: dict[str, Any]) -> Any:
    """The executor's job spec as the engine's Job: the same description every launcher runs."""
    from ..engine.job import Job, parse_hyperparameters

    h = {**spec["hyperparameters"], "checkpoint": "checkpoint", "resume": True}  # a restarted job continues
    data_ref, val = spec["data"], spec["val"]
    data = data_ref["builtin"] if "builtin" in data_ref else _load_pair(data_ref["tensors"])
    if isinstance(val, dict):
        val = _load_pair(val["tensors"])
    return Job(model=spec["model"], data=data, val=val, hyperparameters=parse_hyperparameters(h))


def model_info(prepared: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The trained model's metadata: the preparation's, with the names the client learned."""
    info = prepared.model_info()
    names = spec.get("preprocessing") or {}
    classes = names.get("classes")
    if classes is not None:
        count = prepared.data.num_classes
        if prepared.data.task != "classification" or len(set(map(str, classes))) != len(classes) or (
                count is not None and len(classes) < count):
            from .._errors import BadArgument

            raise BadArgument("preprocessing.classes", f"one distinct label for each of the data's {count} classes",
                              f"{len(classes)} labels")
    for key, value in names.items():
        if value:
            info[key] = value
    return info


def run_job(job: dict[str, Any], channel: BinaryIO, stop: Any) -> int:
    """Run one job (cwd is its directory); report through `channel`. Returns the exit code."""
    import dataclasses

    import torch

    from .._errors import AiaasError
    from ..engine.checkpoint import save_trained_model
    from ..engine.events import Event, RunEnded
    from ..engine.loop import fit
    from ..engine.prepare import prepare

    h = job["hyperparameters"]
    if h.get("workers", 1) > 1:
        from ._distributed_runner import run_distributed_job

        return run_distributed_job(job, lambda message: _send(channel, message), stop)
    torch.set_num_threads(int(job.get("threads", 1)))
    try:
        prepared = prepare(job_of(job), allow_code=bool(job.get("allow_code")))
        info = model_info(prepared, job)
    except AiaasError as exc:
        _send(channel, {"error": str(exc)})
        return 0
    except Exception as exc:  # a bad upload must fail the job with its reason, not a traceback
        print(f"aiaas_lab.server._runner: the job could not start: {exc!r}", file=sys.stderr, flush=True)
        # The type only (the message can hold server paths), but an allocation past the job's
        # memory limit says so: the executor tells "out of memory" from these words.
        memory = isinstance(exc, MemoryError) or "allocate memory" in str(exc) or "bad_alloc" in str(exc)
        _send(channel, {"error": f"the job could not start: {type(exc).__name__}"
                                 + (" (cannot allocate memory)" if memory else "")})
        return 0

    ended: list[RunEnded] = []

    def emit(event: Event) -> None:
        if isinstance(event, RunEnded):
            ended.append(event)  # sent last, once the weights are saved
        else:
            _send(channel, {"event": event.to_dict()})

    outcome = fit(prepared.module, prepared.data, prepared.config, emit, stop, run_id=job["job_id"],
                  extra_state={"preprocessing": info})
    final = ended[-1] if ended else RunEnded(status="failed", epochs_completed=len(outcome.history),
                                            steps=outcome.steps, seconds=outcome.seconds,
                                            error=outcome.error or "the engine ended without a run_ended event")
    if final.status == "completed":
        try:
            save_trained_model("model.safetensors", prepared.module.state_dict(), info)
            _send(channel, {"model": info})
        except Exception as exc:
            print(f"aiaas_lab.server._runner: saving the weights failed: {exc!r}", file=sys.stderr, flush=True)
            final = dataclasses.replace(final, status="failed",
                                        error=f"the trained weights could not be saved ({type(exc).__name__})")
    _send(channel, {"event": final.to_dict()})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parent = int(argv[0])
    _die_with_parent(parent)
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print() in user code must never corrupt the protocol

    from ..engine.stop import StopSignal

    class _Stop(StopSignal):
        def is_set(self) -> bool:
            if os.getppid() != parent:  # orphaned: the new server will resume from the checkpoint
                os._exit(3)
            return super().is_set()

    stop = _Stop()
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.request("cancelled"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # Warm up while no job is waiting: these imports are most of a cold start, and the first
    # optimizer imports torch._dynamo (seconds).
    import torch

    from ..engine import prepare  # noqa: F401  (the engine, the data and the models)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    try:
        import sklearn.datasets  # noqa: F401  (the digits data set)
    except ImportError:
        pass

    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    job = json.loads(line)
    os.chdir(job["dir"])
    log = os.open("worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    return run_job(job, channel, stop)


if __name__ == "__main__":
    sys.exit(main())
