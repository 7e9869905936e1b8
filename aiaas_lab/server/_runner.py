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
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before prctl took effect
        os._exit(3)


def _send(channel: BinaryIO, message: dict[str, Any]) -> None:
    import orjson

    # orjson writes NaN as null: a diverged loss still reaches the client as valid JSON.
    channel.write(orjson.dumps(message) + b"\n")
    channel.flush()


def _load_pair(path: str) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["X"], tensors["y"]


def _build_builtin(name: str, config: dict[str, Any], data: Any, cfg: Any, val: Any, normalize: bool) -> tuple[Any, dict[str, Any]]:
    import torch

    from ..engine.data import prepare_data
    from ..engine.models import build_model, model_spec

    if "input_shape" in config and "output_size" in config:
        shape, size = tuple(config["input_shape"]), config["output_size"]
    else:
        # Sizing the model needs the prepared data's shapes; prepare_run prepares it once more.
        prepared = prepare_data(data, val=val, loss=cfg.loss, normalize=normalize,
                                batch_size=cfg.batch_size, seed=cfg.seed)
        shape, size = prepared.input_shape, prepared.output_size
    spec = model_spec(name, shape, size)
    spec["config"].update(config)
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights as a local run
    try:
        return build_model(spec), spec
    except ValueError as exc:
        from .._errors import BadArgument

        raise BadArgument("model", f"data that fits the {name} model", str(exc)) from None


def _prepare(job: dict[str, Any], cfg: Any) -> tuple[Any, Any, dict[str, Any] | None]:
    """The module, the prepared data and the built-in spec (None for a module sent by the client)."""
    from .._api import prepare_run
    from ..engine.datasets import load_builtin_dataset
    from .._errors import AiaasError

    h = job["hyperparameters"]
    data_ref = job["data"]
    data = (load_builtin_dataset(data_ref["builtin"], cfg.seed) if "builtin" in data_ref
            else _load_pair(data_ref["tensors"]))
    val = job["val"]
    if isinstance(val, dict):
        val = _load_pair(val["tensors"])
    model_ref = job["model"]
    spec = None
    if "builtin" in model_ref and not model_ref.get("config"):
        model: Any = model_ref["builtin"]
    elif "builtin" in model_ref:
        model, spec = _build_builtin(model_ref["builtin"], model_ref["config"], data, cfg, val, h["normalize"])
    elif "export" in model_ref:
        from ..engine.export import load_exported

        with open(model_ref["export"]["graph"], "rb") as g, open(model_ref["export"]["weights"], "rb") as w:
            model = load_exported(g.read(), w.read())
    else:
        from ..engine.export import load_pickled

        if not job.get("allow_code"):
            raise AiaasError("model.pickle: this server does not run models sent as code.")
        with open(model_ref["pickle"], "rb") as f:
            model = load_pickled(f.read())
    module, prepared, built_spec = prepare_run(model, data, cfg, val=val, target=None, normalize=h["normalize"])
    return module, prepared, spec or built_spec


def _save_model(module: Any, prepared: Any, spec: dict[str, Any] | None) -> dict[str, Any]:
    """Write model.safetensors (the state dict, plus what predicting needs as metadata)."""
    from ..engine.checkpoint import model_info, save_trained_model

    info = model_info(prepared, spec)
    save_trained_model("model.safetensors", module.state_dict(), info)
    return info


def run_job(job: dict[str, Any], channel: BinaryIO, stop: Any) -> int:
    """Run one job (cwd is its directory); report through `channel`. Returns the exit code."""
    import dataclasses

    import torch

    from ..engine.loop import TrainConfig, fit
    from .._errors import AiaasError
    from ..engine.events import Event, RunEnded

    h = job["hyperparameters"]
    if h.get("workers", 1) > 1:
        from ._distributed_runner import run_distributed_job

        return run_distributed_job(job, lambda message: _send(channel, message), stop)
    torch.set_num_threads(int(job.get("threads", 1)))
    cfg = TrainConfig(epochs=h["epochs"], batch_size=h["batch_size"], lr=h["lr"], optimizer=h["optimizer"],
                      loss=h["loss"], weight_decay=h["weight_decay"], grad_accum=h["grad_accum"],
                      clip=h["clip"], patience=h["patience"], seed=h["seed"],
                      checkpoint="checkpoint", resume=True)  # resume: a restarted job continues
    try:
        module, prepared, spec = _prepare(job, cfg)
    except AiaasError as exc:
        _send(channel, {"error": str(exc)})
        return 0
    except Exception as exc:  # a bad upload must fail the job with its reason, not a traceback
        _send(channel, {"error": f"the job could not start: {type(exc).__name__}: {exc}"})
        return 0

    ended: list[RunEnded] = []

    def emit(event: Event) -> None:
        if isinstance(event, RunEnded):
            ended.append(event)  # sent last, once the weights are saved
        else:
            _send(channel, {"event": event.to_dict()})

    outcome = fit(module, prepared, cfg, emit, stop, run_id=job["job_id"])
    final = ended[-1] if ended else RunEnded(status="failed", epochs_completed=len(outcome.history),
                                            steps=outcome.steps, seconds=outcome.seconds,
                                            error=outcome.error or "the engine ended without a run_ended event")
    if final.status == "completed":
        try:
            _send(channel, {"model": _save_model(module, prepared, spec)})
        except Exception as exc:
            final = dataclasses.replace(final, status="failed",
                                        error=f"the trained weights could not be saved: {type(exc).__name__}: {exc}")
    _send(channel, {"event": final.to_dict()})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parent = int(argv[0])
    _die_with_parent(parent)
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print() in user code must never corrupt the protocol

    from .._api import StopSignal

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

    from .. import _api  # noqa: F401
    from ..engine import loop  # noqa: F401
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
