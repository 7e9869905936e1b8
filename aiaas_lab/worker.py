"""One rank of a training job: `python -m aiaas_lab.worker JOB.json`.

Any launcher can run it. `aiaas_lab.train(..., workers=N)` starts N of these itself; torchrun runs
it unchanged on one machine or several, and so do Slurm (`srun torchrun ...`) and a Kubernetes
PyTorchJob, since it reads only torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without RANK it trains alone in this process:

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m aiaas_lab.worker JOB.json

With `-` instead of a path, it first does its slow imports, then reads the path from the first
line of stdin: a launcher can start the workers and write the job while they start up.

JOB.json (relative paths are relative to the file's own directory; only "data" is required):

    {
      "run_id": "a1b2c3",                  reported in RunStarted
      "model": {"name": "mlp"},            a built-in sized to the data; or a full spec as
                                           aiaas_lab.engine.models.model_spec makes it:
                                           {"name": "mlp", "config": {...}};
                                           or {"export": {"graph": "graph.json", "weights":
                                           "init.safetensors"}} as aiaas_lab.engine.export writes it;
                                           or {"pickle": "model.pkl"}: a cloudpickled nn.Module
      "weights": "init.safetensors",       optional state dict loaded into the model first
      "data": "digits",                    a built-in data set, or a safetensors file holding
                                           the tensors "X" (features) and "y" (targets)
      "val": 0.2,                          optional: a fraction to hold out, or a file like "data"
      "normalize": false,                  standardise features with training statistics
      "config": {"epochs": 5, "batch_size": 64, "lr": 0.001, ...},
                                           any TrainConfig field (aiaas_lab.engine.loop); batch_size
                                           is per rank: the effective batch is
                                           world size x batch_size x grad_accum; a "checkpoint"
                                           directory (written by rank 0, read by every rank on
                                           "resume") must be one that all ranks can reach
      "shard": false,                      FSDP2 (fully_shard) instead of DistributedDataParallel
      "threads": null,                     torch threads per rank; default cores / local ranks
      "events": {"file": "events.jsonl",   rank 0 appends one event.to_json() per line
                 "url": "http://...",      and/or POSTs them there as application/x-ndjson
                 "token": "..."},          with "Authorization: Bearer <token>"
      "output": "model.safetensors",       rank 0 writes the final weights (the model's state
                                           dict) with metadata "aiaas.model" (task, classes,
                                           input_shape, output_size, spec, normalizer: what
                                           predict needs, as the server stores models) and
                                           "aiaas.outcome" (status, history, error, reason,
                                           steps, seconds), before it reports run_ended
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
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .engine.data import Prepared, prepare_data
from .engine.loop import Outcome, TrainConfig, fit, resolve_device
from ._errors import AiaasError, BadArgument, close_matches, describe
from .engine.events import Event, RunEnded

__all__ = ["main", "load_job", "run_job"]

_STOP_POLL_S = 0.1
# This process's DDP/FSDP state, kept until the process ends with os._exit: dropping it runs
# torch's destructors, and the gloo process group's can deadlock against its own work thread
# (the Reducer's destructor holds the GIL and joins a thread that waits for it; seen here with
# torch 2.13).
_LIVE: list[Any] = []


@dataclass(frozen=True)
class _Job:
    run_id: str
    model: dict[str, Any]
    weights: Path | None
    data: str | Path
    val: float | Path | None
    normalize: bool
    config: TrainConfig
    shard: bool
    threads: int | None
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
    known = {"run_id", "model", "weights", "data", "val", "normalize", "config", "shard", "threads",
             "events", "output", "stop_file"}
    for key in raw:
        if key not in known:
            raise BadArgument("JOB.json", f"fields among {', '.join(sorted(known))}", repr(key),
                              close_matches(key, known))
    base = path.parent

    def file(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise BadArgument(key, "a file path", describe(value))
        return base / value

    model = raw.get("model", {"name": "mlp"})
    if isinstance(model, str):
        model = {"name": model}
    if not isinstance(model, dict) or not ({"name", "export", "pickle"} & set(model)):
        raise BadArgument("model", 'a built-in {"name": ...} (with an optional "config"), '
                          '{"export": {"graph": PATH, "weights": PATH}} or {"pickle": PATH}', repr(model))
    if "pickle" in model:
        model = {"pickle": file("model.pickle", model["pickle"])}
    elif "export" in model:
        export = model["export"] if isinstance(model["export"], dict) else {}
        model = {"export": {"graph": file("model.export.graph", export.get("graph")),
                            "weights": file("model.export.weights", export.get("weights"))}}

    if "data" not in raw:
        raise BadArgument("data", "a built-in data set name or a safetensors file with X and y", "no data")
    data = raw["data"]
    from .engine.datasets import BUILTIN_DATASETS

    data = data if data in BUILTIN_DATASETS else file("data", data)
    val = raw.get("val")
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = float(val)
    elif val is not None:
        val = file("val", val)

    config = raw.get("config", {})
    names = {f.name for f in fields(TrainConfig)}
    if not isinstance(config, dict):
        raise BadArgument("config", "an object of TrainConfig fields", describe(config))
    for key in config:
        if key not in names:
            raise BadArgument("config", f"TrainConfig fields ({', '.join(sorted(names))})", repr(key),
                              close_matches(key, names))
    cfg = TrainConfig(**config)
    _check_config(cfg)
    if cfg.checkpoint and raw.get("shard"):
        raise BadArgument("config.checkpoint", "no checkpoint with shard (sharded checkpoints are not supported)",
                          repr(cfg.checkpoint))
    if cfg.checkpoint:
        cfg = replace(cfg, checkpoint=str(base / cfg.checkpoint))

    events = raw.get("events") or {}
    if not isinstance(events, dict) or set(events) - {"file", "url", "token"}:
        raise BadArgument("events", 'an object with "file", "url" and "token"', repr(events))
    threads = raw.get("threads")
    if threads is not None and not (isinstance(threads, int) and threads > 0):
        raise BadArgument("threads", "a positive whole number or null", repr(threads))
    return _Job(
        run_id=str(raw.get("run_id", "")),
        model=model,
        weights=file("weights", raw["weights"]) if raw.get("weights") else None,
        data=data,
        val=val,
        normalize=bool(raw.get("normalize", False)),
        config=cfg,
        shard=bool(raw.get("shard", False)),
        threads=threads,
        events_file=file("events.file", events["file"]) if events.get("file") else None,
        events_url=events.get("url"),
        events_token=events.get("token"),
        output=file("output", raw["output"]) if raw.get("output") else None,
        stop_file=file("stop_file", raw["stop_file"]) if raw.get("stop_file") else None,
    )


def _check_config(cfg: TrainConfig) -> None:
    from ._api import _check_choice, _check_positive
    from .engine.loop import DEVICES, LOSSES, OPTIMIZERS

    for name in ("epochs", "batch_size", "grad_accum"):
        _check_positive(f"config.{name}", getattr(cfg, name))
    for name in ("lr", "clip"):
        _check_positive(f"config.{name}", getattr(cfg, name), float, allow_none=True)
    _check_positive("config.patience", cfg.patience, allow_none=True)
    _check_choice("config.optimizer", cfg.optimizer, OPTIMIZERS)
    _check_choice("config.loss", cfg.loss, LOSSES)
    _check_choice("config.device", cfg.device, DEVICES)


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


class _EventSink:
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


class _Rank:
    """This process's part in a data-parallel run: the engine's DistContext."""

    def __init__(self, model: nn.Module, device: torch.device, shard: bool) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sharded = shard
        self._device = device
        if shard:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            # Innermost first: each module that owns weights gathers them only for its own
            # forward, then the root takes whatever is left.
            for module in reversed(list(model.modules())):
                if module is not model and next(module.parameters(recurse=False), None) is not None:
                    fully_shard(module, mesh=mesh)
            self.net: nn.Module = fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_gradients(self, enabled: bool) -> None:
        if self.sharded:
            self.net.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        else:
            # The flag DDP's no_sync() context toggles; the loop decides per micro-batch.
            self.net.require_backward_grad_sync = enabled

    def all_sum(self, *values: float) -> list[float]:
        sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device)
        dist.all_reduce(sums)
        return sums.tolist()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (a collective when sharded; empty elsewhere)."""
        if not self.sharded:
            return model.state_dict() if self.rank == 0 else {}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_model(job: _Job, prepared: Prepared) -> tuple[nn.Module, dict[str, Any] | None]:
    from .engine.models import BUILTIN_MODELS, build_model, model_spec

    spec = None
    if "pickle" in job.model:
        from .engine.export import load_pickled

        model = load_pickled(job.model["pickle"].read_bytes())
    elif "export" in job.model:
        from .engine.export import load_exported

        model = load_exported(job.model["export"]["graph"].read_bytes(), job.model["export"]["weights"].read_bytes())
    else:
        name = job.model["name"]
        if name not in BUILTIN_MODELS:
            raise BadArgument("model.name", f"a built-in model ({', '.join(BUILTIN_MODELS)})", repr(name),
                              close_matches(str(name), BUILTIN_MODELS))
        spec = ({"name": name, "config": job.model["config"]} if "config" in job.model
                else model_spec(name, prepared.input_shape, prepared.output_size))
        torch.manual_seed(job.config.seed)  # every rank starts from the same weights
        try:
            model = build_model(spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadArgument("model", "a spec that fits the data", f"{spec} ({exc})") from None
    if job.weights is not None:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(job.weights)))
        except (OSError, RuntimeError) as exc:
            raise BadArgument("weights", "a safetensors state dict that fits the model", f"{job.weights}: {exc}") from None
    return model, spec


def _load_tensors(source: str | Path, argument: str) -> Any:
    if isinstance(source, str):
        return source  # a built-in name; prepare_data loads it
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(source))
    except Exception as exc:  # missing file, not safetensors, truncated
        raise BadArgument(argument, 'a safetensors file with tensors "X" and "y"', f"{source} ({exc})") from None
    if not {"X", "y"} <= set(tensors):
        raise BadArgument(argument, 'a safetensors file with tensors "X" and "y"',
                          f"{source} with tensors {sorted(tensors)}")
    return tensors["X"], tensors["y"]


def _watch_parent() -> None:
    """End this process if its launcher dies (a restarted kernel, a killed torchrun agent), so a
    crash upstream never leaves ranks training, or blocked in a collective, forever."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="aiaas-parent-watch").start()


def _write_output(path: Path, weights: dict[str, torch.Tensor], outcome: Outcome, run_id: str,
                  prepared: Prepared, spec: dict[str, Any] | None) -> None:
    from .engine.checkpoint import model_info, save_trained_model

    outcome_meta = json.dumps({"status": outcome.status, "history": outcome.history, "error": outcome.error,
                               "reason": outcome.reason, "steps": outcome.steps, "seconds": outcome.seconds,
                               "run_id": run_id})
    save_trained_model(path, weights, model_info(prepared, spec), {"aiaas.outcome": outcome_meta})


def run_job(job: _Job) -> int:
    """Train as this process's rank; returns the exit status (0 completed or stopped, 1 failed)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(job.threads or max(1, (os.cpu_count() or 1) // local_world))
    _watch_parent()
    stop = _StopRequest(job.stop_file)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: stop.request(f"cancelled ({signal.Signals(s).name})"))

    cfg = job.config
    prepared = prepare_data(_load_tensors(job.data, "data"),
                            val=job.val if not isinstance(job.val, Path) else _load_tensors(job.val, "val"),
                            loss=cfg.loss, normalize=job.normalize, batch_size=cfg.batch_size, seed=cfg.seed)
    model, spec = _load_model(job, prepared)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    cfg = replace(cfg, device=str(device))
    model.to(device)

    context: _Rank | None = None
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        context = _Rank(model, device, job.shard)
        _LIVE.append(context)
    sink = _EventSink(job.events_file, job.events_url, job.events_token) if rank == 0 else None
    ended: list[RunEnded] = []

    def emit(event: Event) -> None:
        if isinstance(event, RunEnded):
            ended.append(event)  # reported once the weights are written: whoever sees it can load them
        elif sink is not None:
            sink(event)

    try:
        outcome = fit(model, prepared, cfg, emit, stop, run_id=job.run_id, dist=context)
        try:
            weights = context.full_state_dict(model) if context is not None else model.state_dict()
        except Exception as exc:  # a peer died: rank 0 still reports how the run ended
            weights = {}
            if outcome.error is None:
                outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        if rank == 0 and job.output is not None:
            _write_output(job.output, weights, outcome, job.run_id, prepared, spec)
        if sink is not None and ended:
            sink(replace(ended[-1], status=outcome.status, error=outcome.error))
    finally:
        if sink is not None:
            sink.close()
    if outcome.status == "failed":  # the last line is the error, for whoever reads the log
        print(f"aiaas_lab.worker: rank {rank}: {outcome.error}", file=sys.stderr, flush=True)
        return 1
    print(f"aiaas_lab.worker: rank {rank}: {outcome.status} after {outcome.steps} steps"
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
