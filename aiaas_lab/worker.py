"""One rank of a training job: `python -m aiaas_lab.worker JOB.json`.

Any launcher can run it. `aiaas_lab.train(..., workers=N)` starts N of these itself; torchrun runs
it unchanged on one machine or several, and so do Slurm (`srun torchrun ...`) and a Kubernetes
PyTorchJob, since it reads only torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without RANK it trains alone in this process:

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m aiaas_lab.worker JOB.json

With `-` instead of a path, it first does its slow imports, then reads the path from the first
line of stdin: a launcher can start the workers and write the job while they start up.

JOB.json is the job description every launcher uses (aiaas_lab.engine.job: the same checks and
messages as `aiaas_lab.train` and `POST /v1/jobs`), plus where this process reads and writes.
Relative paths are relative to the file's own directory; only "data" is required:

    {
      "run_id": "a1b2c3",                  reported in RunStarted
      "model": {"builtin": "mlp"},         a built-in sized to the data, with an optional
                                           "config" ({"hidden": [32]} keeps the data's sizes);
                                           {"spec": SPEC}: a full built-in spec;
                                           {"export": {"graph": "graph.json", "weights":
                                           "init.safetensors"}} as aiaas_lab.engine.export writes
                                           it; or {"pickle": "model.pkl"}: a cloudpickled nn.Module
      "weights": "init.safetensors",       optional state dict loaded into the model first
      "data": {"builtin": "digits"},       a built-in data set, or {"tensors": FILE}: a
                                           safetensors file holding "X" (features), "y" (targets)
      "val": 0.2,                          optional: a fraction to hold out, or like "data"
      "hyperparameters": {"epochs": 5, "batch_size": 64, "lr": 0.001, "normalize": false, ...},
                                           any option of aiaas_lab.train (see Hyperparameters);
                                           batch_size is per rank: the effective batch is
                                           world size x batch_size x grad_accum; a "checkpoint"
                                           directory (written by rank 0, read by every rank on
                                           "resume") must be one that all ranks can reach;
                                           "shard": FSDP2 instead of DDP; "threads": torch
                                           threads per rank (default cores / local ranks)
      "preprocessing": {...},              optional: what the launcher learned of the raw
                                           inputs (classes, columns), kept in the output
      "events": {"file": "events.jsonl",   rank 0 appends one event.to_json() per line
                 "url": "http://...",      and/or POSTs them there as application/x-ndjson
                 "token": "..."},          with "Authorization: Bearer <token>"
      "output": "model.safetensors",       rank 0 writes the final weights (the model's state
                                           dict) with metadata "aiaas.model" (preprocessing
                                           and spec: what predict needs, as the server stores
                                           models) and "aiaas.outcome" (status, history, error,
                                           reason, steps, seconds), before it reports run_ended
      "stop_file": "STOP"                  when this file appears, all ranks stop at the same
                                           step and the weights so far are written; its text is
                                           the reason (write it elsewhere, then rename it here)
    }

SIGTERM and SIGINT (what torchrun forwards on cancel) stop the run the same way as the stop file.
"pickle" runs code from that file when it is loaded: a launcher may point it only at a file it
wrote itself (the notebook's own model), never at bytes a client sent. Exit status: 0 completed
or stopped, 1 failed (the error is the last line on stderr), 2 a bad job description.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._errors import AiaasError, BadArgument, close_matches, describe
from .engine.events import Event, RunEnded
from .engine.job import Hyperparameters, Job, parse_hyperparameters, seeded
from .engine.job import replace as replace_options
from .engine.loop import Outcome, fit, resolve_device
from .engine.prepare import PreparedRun, prepare
from .engine.ranks import Rank, init_process_group
from .launch.event_sink import EventSink

__all__ = ["main", "load_job", "run_job"]

_STOP_POLL_S = 0.1
# This process's DDP/FSDP state, kept until the process ends with os._exit: dropping it runs
# torch's destructors, and the gloo process group's can deadlock against its own work thread
# (the Reducer's destructor holds the GIL and joins a thread that waits for it; seen here with
# torch 2.13).
_LIVE: list[Any] = []
_FIELDS = {"run_id", "model", "weights", "data", "val", "hyperparameters", "preprocessing", "events", "output",
           "stop_file", "config", "normalize", "shard", "threads"}  # the last four: the earlier format


@dataclass(frozen=True)
class _Job:
    run_id: str
    job: Job
    weights: Path | None
    preprocessing: dict[str, Any] | None
    events_file: Path | None
    events_url: str | None
    events_token: str | None
    output: Path | None
    stop_file: Path | None


def load_job(path: str | os.PathLike[str]) -> _Job:
    """Read and check JOB.json; a mistake raises BadArgument naming the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise BadArgument("JOB.json", "a readable job file", f"{path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise BadArgument("JOB.json", "a JSON object", f"invalid JSON in {path} ({exc})") from None
    if not isinstance(raw, dict):
        raise BadArgument("JOB.json", "a JSON object", describe(raw))
    for key in raw:
        if key not in _FIELDS:
            raise BadArgument("JOB.json", f"fields among {', '.join(sorted(_FIELDS))}", repr(key),
                              close_matches(key, _FIELDS))
    base = path.parent

    def file(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise BadArgument(key, "a file path", describe(value))
        return base / value

    model = raw.get("model", {"builtin": "mlp"})
    if isinstance(model, str):
        model = {"builtin": model}
    if isinstance(model, dict) and "name" in model:  # the earlier {"name": ..., "config": ...}
        model = {"builtin": model["name"], **({"config": model["config"]} if "config" in model else {})}
    if not isinstance(model, dict) or not ({"builtin", "spec", "export", "pickle"} & set(model)):
        raise BadArgument("model", '{"builtin": NAME} (with an optional "config"), {"spec": SPEC}, '
                          '{"export": {"graph": PATH, "weights": PATH}} or {"pickle": PATH}', repr(model))
    if "pickle" in model:
        model = {"pickle": file("model.pickle", model["pickle"])}
    elif "export" in model:
        export = model["export"] if isinstance(model["export"], dict) else {}
        model = {"export": {"graph": file("model.export.graph", export.get("graph")),
                            "weights": file("model.export.weights", export.get("weights"))}}

    if "data" not in raw:
        raise BadArgument("data", "a built-in data set name or a safetensors file with X and y", "no data")
    data = _data(raw["data"], "data", file)
    val = raw.get("val")
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = float(val)
    elif val is not None:
        val = _data(val, "val", file)

    options = dict(raw.get("hyperparameters") or raw.get("config") or {})
    if "hyperparameters" not in raw and options.get("optimizer", "adam") != "sgd":
        # The earlier format wrote every TrainConfig field, momentum 0.9 included, for any
        # optimizer, and AdamW treated a weight decay of 0 as its default 0.01.
        options.pop("momentum", None)
        if options.get("optimizer") == "adamw" and not options.get("weight_decay"):
            options.pop("weight_decay", None)
    for key in ("normalize", "shard", "threads"):  # top-level in the earlier format
        if key in raw:
            options.setdefault(key, raw[key])
    h: Hyperparameters = parse_hyperparameters(options)
    if h.checkpoint:
        h = replace_options(h, checkpoint=str(base / h.checkpoint))

    events = raw.get("events") or {}
    if not isinstance(events, dict) or set(events) - {"file", "url", "token"}:
        raise BadArgument("events", 'an object with "file", "url" and "token"', repr(events))
    preprocessing = raw.get("preprocessing")
    if preprocessing is not None and not isinstance(preprocessing, dict):
        raise BadArgument("preprocessing", "an object", describe(preprocessing))
    return _Job(
        run_id=str(raw.get("run_id", "")),
        job=Job(model=model, data=data, val=val, hyperparameters=h),
        weights=file("weights", raw["weights"]) if raw.get("weights") else None,
        preprocessing=preprocessing,
        events_file=file("events.file", events["file"]) if events.get("file") else None,
        events_url=events.get("url"),
        events_token=events.get("token"),
        output=file("output", raw["output"]) if raw.get("output") else None,
        stop_file=file("stop_file", raw["stop_file"]) if raw.get("stop_file") else None,
    )


def _data(value: Any, argument: str, file: Any) -> Any:
    """A built-in name, or the (X, y) tensors of a safetensors file."""
    from .engine.datasets import BUILTIN_DATASETS

    if isinstance(value, dict) and "builtin" in value:
        value = value["builtin"]
    if isinstance(value, str) and value in BUILTIN_DATASETS:
        return value  # prepare_data loads it
    if isinstance(value, dict) and "tensors" in value:
        value = value["tensors"]
    return _load_tensors(file(argument, value), argument)


def _load_tensors(source: Path, argument: str) -> Any:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(source))
    except Exception as exc:  # missing file, not safetensors, truncated
        raise BadArgument(argument, 'a safetensors file with tensors "X" and "y"', f"{source} ({exc})") from None
    if not {"X", "y"} <= set(tensors):
        raise BadArgument(argument, 'a safetensors file with tensors "X" and "y"',
                          f"{source} with tensors {sorted(tensors)}")
    return tensors["X"], tensors["y"]


class _StopRequest:
    """The run's stop flag as the engine sees it: set by the stop file or by SIGTERM/SIGINT.
    The file is looked at a few times a second at most, so a single process, which asks every
    step, pays no system call per step."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._reason = ""
        self._checked = 0.0

    def request(self, reason: str) -> None:
        self._reason = self._reason or reason

    @property
    def reason(self) -> str:
        # Looked up afresh: another rank may have seen the file first, and the run's reason is
        # read here when the ranks have agreed to stop.
        if not self._reason and self.path is not None:
            try:
                self._reason = self.path.read_text().strip() or "stop requested"
            except FileNotFoundError:
                pass
        return self._reason

    def is_set(self) -> bool:
        if self._reason:
            return True
        now = time.monotonic()
        if now - self._checked < _STOP_POLL_S:
            return False
        self._checked = now
        return bool(self.reason)


def _watch_parent() -> None:
    """End this process if its launcher dies (a restarted kernel, a killed torchrun agent), so a
    crash upstream never leaves ranks training, or blocked in a collective, forever. The
    launcher's pid comes from the environment when it set one (ours do), so a launcher that died
    while this process was still importing is caught too; see aiaas_lab._procs."""
    from . import _procs

    launcher = os.environ.get(_procs.LAUNCHER_PID_ENV, "")
    _procs.watch_parent(int(launcher) if launcher.isdigit() else None)


def _write_output(path: Path, weights: dict[str, torch.Tensor], outcome: Outcome, run_id: str,
                  info: dict[str, Any]) -> None:
    from .engine.checkpoint import save_trained_model

    outcome_meta = json.dumps({"status": outcome.status, "history": outcome.history, "error": outcome.error,
                               "reason": outcome.reason, "steps": outcome.steps, "seconds": outcome.seconds,
                               "run_id": run_id}, allow_nan=True)
    save_trained_model(path, weights, info, {"aiaas.outcome": outcome_meta})


def _prepare(job: _Job) -> PreparedRun:
    """The one preparation; "pickle" here names a file this job's launcher wrote (see above)."""
    prepared = prepare(job.job, allow_code=True)
    if job.weights is not None:
        from safetensors.torch import load_file

        try:
            prepared.module.load_state_dict(load_file(str(job.weights)))
        except (OSError, RuntimeError) as exc:
            raise BadArgument("weights", "a safetensors state dict that fits the model", f"{job.weights}: {exc}") from None
    return prepared


def run_job(job: _Job) -> int:
    """Train as this process's rank; returns the exit status (0 completed or stopped, 1 failed)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    h = job.job.hyperparameters
    torch.set_num_threads(h.threads or max(1, (os.cpu_count() or 1) // local_world))
    _watch_parent()
    stop = _StopRequest(job.stop_file)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: stop.request(f"cancelled ({signal.Signals(s).name})"))

    device = resolve_device(h.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    if h.seed is None:
        # Every rank must shuffle and split alike: rank 0 fixes the seed (the checkpoint's, when
        # resuming one) and the others take it from there.
        from .engine.checkpoint import read_state

        chosen = [seeded(h, (read_state(h.checkpoint) or {}).get("seed") if h.resume else None).seed]
        if world > 1:
            dist.broadcast_object_list(chosen, src=0)
        job = replace(job, job=replace(job.job, hyperparameters=replace_options(h, seed=chosen[0])))
    prepared = _prepare(job)
    model, cfg = prepared.module, replace(prepared.config, device=str(device))
    model.to(device)
    info = prepared.model_info()
    if job.preprocessing:  # the launcher's view of the raw inputs (it prepared the tensors sent here)
        info.update({k: v for k, v in job.preprocessing.items() if k in ("classes", "columns", "categories") and v})

    context: Rank | None = None
    if world > 1:
        context = Rank(model, device, h.shard)
        _LIVE.append(context)
    sink = EventSink(job.events_file, job.events_url, job.events_token) if rank == 0 else None
    ended: list[RunEnded] = []

    def emit(event: Event) -> None:
        if isinstance(event, RunEnded):
            ended.append(event)  # reported once the weights are written: whoever sees it can load them
        elif sink is not None:
            sink(event)

    try:
        outcome = fit(model, prepared.data, cfg, emit, stop, run_id=job.run_id, dist=context,
                      extra_state={"preprocessing": info})
        try:
            weights = context.full_state_dict(model) if context is not None else model.state_dict()
        except Exception as exc:  # a peer died: rank 0 still reports how the run ended
            weights = {}
            if outcome.error is None:
                outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        if rank == 0 and job.output is not None:
            _write_output(job.output, weights, outcome, job.run_id, info)
        if sink is not None and ended:
            sink(replace(ended[-1], status=outcome.status, error=outcome.error))
    finally:
        if sink is not None:
            sink.close()
    if outcome.status == "failed":  # the last line is the error, for whoever reads the log
        print(f"aiaas_lab.worker: rank {rank}: {outcome.error}", file=sys.stderr, flush=True)
        return 1
    print(f"aiaas_lab.worker: rank {rank}: {outcome.status} after {outcome.steps} steps with seed {cfg.seed}"
          + (f" ({outcome.reason})" if outcome.reason else ""), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = args[0]
    if path == "-":
        # DDP, FSDP and the optimizers import torch._dynamo on first use: seconds, best spent
        # while the launcher is still writing the job.
        import torch._dynamo  # noqa: F401

        path = sys.stdin.readline().strip()
        if not path:  # the launcher gave up (bad input in the notebook): nothing to do
            return 0
    try:
        return run_job(load_job(path))
    except AiaasError as exc:  # a mistake in the job: one paragraph, no traceback
        print(f"aiaas_lab.worker: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:  # unexpected: the traceback, then the same way out
        import traceback

        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and closed. Skipping the interpreter's teardown saves most of a
    # second per run and never runs the process group's destructors (see _LIVE).
    os._exit(status)
