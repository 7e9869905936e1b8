"""Training and prediction on a remote aiaas-lab server, behind the same `train` / `predict` calls,
the same progress reporters and the same `TrainResult` as local runs.

A user's `nn.Module` travels in the safest form that works: a built-in architecture by name, else
a `torch.export` graph (the server rebuilds it without running client code), else, only where
the server's operator allows code, the module by value (cloudpickle).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._api import Preprocessing, StopSignal, TrainResult, _interrupt_stops, _PREPROCESSING, prepare_run
from ..client.client import Blob, Client, ModelWeights, RemoteError, _normalize_url
from ..engine.data import InMemory, Normalizer, to_features
from ..engine.datasets import BUILTIN_DATASETS, load_builtin_dataset
from ..engine.loop import TrainConfig
from .._errors import AiaasError, BadArgument, close_matches, describe
from ..engine.events import EpochEnd, Event, RunEnded, RunStarted
from ..engine.models import BUILTIN_MODELS, build_model
from ..notebook.progress import make_reporter

__all__ = ["train_remote", "predict_remote", "follow_job", "RemoteRun", "client_for", "remember_token"]

# Tokens given to `%aiaas connect`, by server URL: in memory only, never written anywhere.
_TOKENS: dict[str, str] = {}
# Modules trained remotely -> (server URL, model name, version), so `predict(net, backend=URL)` asks
# the server for exactly the version that was trained.
_SERVER_MODELS: weakref.WeakKeyDictionary[nn.Module, tuple[str, str, int | None]] = weakref.WeakKeyDictionary()
_STATUS = {"succeeded": "completed", "cancelled": "stopped", "failed": "failed"}


def remember_token(url: str, token: str | None) -> None:
    url = _normalize_url(url)
    if token:
        _TOKENS[url] = token
    else:
        _TOKENS.pop(url, None)


def client_for(backend: str, token: str | None = None, **options: Any) -> Client:
    """A client for `backend`; the token is the argument, else the one given to `%aiaas connect`
    for that URL, else AIAAS_TOKEN."""
    url = _normalize_url(backend)
    return Client(url, token if token is not None else _TOKENS.get(url), **options)


# -- submitting a job ---------------------------------------------------------------------

@dataclass
class _Submission:
    job: dict[str, Any]
    module: nn.Module | None  # the local module the trained weights are loaded into
    classes: list[Any] | None
    summary: str


def _check_remote_config(cfg: TrainConfig, threads: int | None) -> None:
    local_only = [("--checkpoint", cfg.checkpoint, "the server keeps its own checkpoints"),
                  ("--resume", cfg.resume or None, "the server resumes its own jobs"),
                  ("--threads", threads, "the server decides its threads"),
                  ("--device", None if cfg.device == "auto" else cfg.device, "the server picks its device")]
    for argument, value, why in local_only:
        if value is not None:
            raise BadArgument(argument, f"no {argument} with --backend ({why})", repr(value))


def _hyperparameters(cfg: TrainConfig, normalize: bool, workers: int, shard: bool) -> dict[str, Any]:
    params: dict[str, Any] = {
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "loss": cfg.loss,
        "weight_decay": cfg.weight_decay, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
        "normalize": bool(normalize), "workers": int(workers), "shard": bool(shard),
    }
    for key in ("lr", "clip", "patience"):  # absent means the engine's default
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    return params


def _tensors(part: Any, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X and y of a prepared split; a Dataset is read into memory once, to be uploaded."""
    if isinstance(part, InMemory):
        return part.X, part.y
    dataset = part.dataset
    pairs = [dataset[i] for i in range(len(dataset))]
    X = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in pairs])
    y = torch.stack([torch.as_tensor(t) for _, t in pairs])
    if task == "classification":
        return X, y.to(torch.int64).reshape(-1)
    y = y.to(torch.float32)
    return X, y.reshape(-1, 1) if y.ndim == 1 else y


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _module_payload(client: Client, module: nn.Module, example: torch.Tensor) -> tuple[dict[str, Any], str, str]:
    """(model reference, how it was sent, why export failed or ""), uploading what it needs."""
    try:
        from ..engine.export import export_module

        graph, weights = export_module(module, example)
    except AiaasError as exc:  # export_module says why, as a sentence about MODEL
        export_failure = str(exc).removeprefix("MODEL: ")
    except Exception as exc:  # anything else torch raised on the way
        export_failure = f"torch.export failed: {_first_line(exc)}."
    else:
        graph_blob, weights_blob = client.upload(graph), client.upload(weights)
        return ({"export": {"graph": graph_blob.sha256, "weights": weights_blob.sha256}},
                "a torch.export graph (no code runs on the server)", "")
    try:
        import cloudpickle
    except ImportError:
        raise AiaasError(f"MODEL: {type(module).__name__} cannot be sent to the server. {export_failure} "
                         "Sending it as code needs cloudpickle, which is not installed.") from None
    payload = client.upload(cloudpickle.dumps(module))
    return {"pickle": payload.sha256}, "code (cloudpickle), as the server allows with --allow-code", export_failure


def _upload_data(client: Client, X: torch.Tensor, y: torch.Tensor, argument: str) -> Blob:
    try:
        return client.upload_tensors({"X": X, "y": y})
    except RemoteError as exc:
        if exc.status != 413:
            raise
        size = X.numel() * X.element_size() + y.numel() * y.element_size()
        raise BadArgument(argument, f"data small enough for the server at {client.url}",
                          f"{_megabytes(size)} of tensors, which it refused as too large",
                          "Its operator can raise aiaas-lab serve --max-upload-mb; the built-in data sets "
                          f"({', '.join(BUILTIN_DATASETS)}) need no upload.") from None


def _submit(client: Client, model: Any, data: Any, cfg: TrainConfig, *, val: Any, target: str | None,
            normalize: bool, workers: int, shard: bool, name: str | None) -> _Submission:
    """Validate locally, upload what the server lacks, and create the job."""
    builtin_data = isinstance(data, str) and data.replace("_", "-") in BUILTIN_DATASETS
    val_fraction = val is None or (isinstance(val, (int, float)) and not isinstance(val, bool))
    if isinstance(model, str) and model not in BUILTIN_MODELS:
        raise BadArgument("MODEL", f"an nn.Module or a built-in model ({', '.join(BUILTIN_MODELS)})",
                          repr(model), close_matches(model, BUILTIN_MODELS))
    if cfg.patience is not None and val is None:
        raise BadArgument("--patience", "validation data to watch (--val DATA or a fraction)", "no --val")

    module: nn.Module | None = None
    classes: list[Any] | None = None
    if isinstance(model, str) and builtin_data and val_fraction:
        # A built-in model on a built-in data set: nothing to prepare or send; the server sizes
        # the model to the data and the weights' metadata carries the spec to rebuild it here.
        model_ref: dict[str, Any] = {"builtin": model}
        data_ref: dict[str, Any] = {"builtin": data.replace("_", "-")}
        val_ref: Any = val
        how, data_note = f"the built-in {model!r}", f"the built-in {data!r} data"
        export_failure = ""
    else:
        module, prepared, spec = prepare_run(model, data, cfg, val=val, target=target, normalize=False)
        classes = prepared.classes
        X, y = _tensors(prepared.train, prepared.task)
        if builtin_data and val_fraction:
            data_ref, val_ref, data_note = {"builtin": data.replace("_", "-")}, val, f"the built-in {data!r} data"
        else:
            blob = _upload_data(client, X, y, "--data")
            data_ref = {"tensors": blob.sha256}
            data_note = (f"data uploaded ({_megabytes(blob.size)})" if blob.uploaded
                         else f"data already on the server ({_megabytes(blob.size)})")
            val_ref = None
            if prepared.val is not None:
                vX, vy = _tensors(prepared.val, prepared.task)
                val_ref = {"tensors": _upload_data(client, vX, vy, "--val").sha256}
        if spec is not None:
            model_ref, export_failure = {"builtin": spec["name"], "config": spec["config"]}, ""
            how = f"the built-in {spec['name']!r}"
        else:
            model_ref, how, export_failure = _module_payload(client, module, X[:2])

    body = {"model": model_ref, "data": data_ref, "val": val_ref,
            "hyperparameters": _hyperparameters(cfg, normalize, workers, shard), "name": name}
    try:
        job = client.create_job(body)
    except RemoteError as exc:
        if "pickle" in model_ref and exc.status == 400:
            raise AiaasError(f"MODEL: {type(module).__name__} cannot be sent to the server at {client.url}. "
                             f"{export_failure} Sending it as code was refused: {exc}") from None
        raise
    summary = f"aiaas: job {job['id']} on {client.url}: model sent as {how}; {data_note}."
    return _Submission(job=job, module=module, classes=classes, summary=summary)


# -- following a job ----------------------------------------------------------------------

_END = object()


class RemoteRun:
    """A job on the server, followed from here: its events go to the reporter and callbacks, and
    its end becomes a `TrainResult`. `train(..., backend=URL, background=True)` returns one at once:
    `.wait()`, `.stop()`, `.result`, `.status`, `.job_id`."""

    def __init__(self, client: Client, job_id: str, *, module: nn.Module | None, classes: list[Any] | None,
                 subscribers: list[Callable[[Event], None]], stop: StopSignal) -> None:
        self.client = client
        self.job_id = job_id
        self.result: TrainResult | None = None
        self._module = module
        self._classes = classes
        self._subscribers = subscribers
        self._stop = stop
        self._cancelled = False
        self._running = False
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        """"starting" (queued on the server), "running", then the result's status."""
        if self.result is not None:
            return self.result.status
        if self._error is not None:
            return "failed"
        return "running" if self._running else "starting"

    def stop(self, reason: str = "stop requested") -> None:
        """Cancel the job on the server (it stops at its next step); `wait()` then returns its result."""
        self._stop.request(reason)

    def wait(self, timeout: float | None = None) -> TrainResult:
        """Block until the job ends and return its TrainResult; raise TimeoutError if it has not
        ended within `timeout` seconds. Ctrl-C while waiting cancels the job, as for a blocking run."""
        with _interrupt_stops(self._stop):
            finished = self._done.wait(timeout)
        if not finished:
            raise TimeoutError(f"job {self.job_id} is still {self.status} after {timeout} s; call .wait() again, "
                               "or .stop() to cancel it")
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result

    def __repr__(self) -> str:
        where = f"job {self.job_id} on {self.client.url}"
        if self.result is not None:
            return f"RemoteRun: {self.status} ({where})\n{self.result!r}"
        return f"RemoteRun: {self.status} ({where}). .wait() returns the TrainResult; .stop() cancels the job."

    def start(self) -> RemoteRun:
        self._thread = threading.Thread(target=self._follow_quietly, name=f"aiaas-job-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def _follow_quietly(self) -> None:
        try:
            self.follow()
        except BaseException as exc:  # kept for wait() to raise in the caller's thread
            self._error = exc
            self._done.set()

    def follow(self) -> TrainResult:
        """Follow the job to its end here; the first Ctrl-C cancels it on the server."""
        started: RunStarted | None = None
        ended: RunEnded | None = None
        history: dict[int, dict[str, float]] = {}
        try:
            with _interrupt_stops(self._stop):
                try:
                    for event in self._events():
                        if isinstance(event, RunStarted):
                            started, self._running = event, True
                        elif isinstance(event, EpochEnd):
                            history[event.epoch] = {"epoch": event.epoch, **event.metrics}
                        elif isinstance(event, RunEnded):
                            ended = event
                        for subscriber in self._subscribers:
                            subscriber(event)
                except KeyboardInterrupt:
                    self._cancel(quiet=True)
                    raise
            self.result = self._result(self.client.get_job(self.job_id), started, ended, list(history.values()))
        finally:
            self.client.close()
            self._done.set()
        return self.result

    def _cancel(self, quiet: bool = False) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        try:
            self.client.cancel_job(self.job_id)
        except AiaasError:
            if not quiet:
                raise

    def _events(self) -> Iterator[Event]:
        """The job's events, read by a helper thread so that this one can watch the stop signal
        (and Ctrl-C) while the stream is quiet."""
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        finished = threading.Event()

        def pump() -> None:
            try:
                for _, event in self.client.stream_events(self.job_id):
                    items.put(event)
                    if finished.is_set():
                        return
                items.put(_END)
            except BaseException as exc:
                items.put(exc)

        threading.Thread(target=pump, name=f"aiaas-events-{self.job_id}", daemon=True).start()
        try:
            while True:
                if self._stop.is_set():
                    self._cancel()
                try:
                    item = items.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            finished.set()

    def _result(self, job: dict[str, Any], started: RunStarted | None, ended: RunEnded | None,
                history: list[dict[str, float]]) -> TrainResult:
        status = _STATUS.get(job["status"], "failed")
        error = job.get("error") or (ended.error if ended else None)
        if started is None and status == "failed":
            raise AiaasError(f"Job {self.job_id} failed on the server at {self.client.url} before training "
                             f"started: {error or 'no reason given'}")
        module, info, model_name = self._module, {}, None
        if job["status"] == "succeeded" and job.get("model"):
            model_name, version = job["model"]["name"], job["model"].get("version")
            weights = self.client.model_weights(model_name, version)
            info = weights.info
            module = self._load(weights, model_name)
            if module is not None:
                _SERVER_MODELS[module] = (self.client.url, model_name, version)
        task = info.get("task") or (started.task if started else "classification")
        classes = self._classes if self._classes is not None else info.get("classes")
        if module is not None and info:
            stats = info.get("normalizer")
            normalizer = Normalizer(torch.tensor(stats["mean"]), torch.tensor(stats["std"])) if stats else None
            _PREPROCESSING[module] = Preprocessing(task=task, classes=classes, normalizer=normalizer)
        reason = ended.reason if ended else ("cancelled before training started" if status == "stopped" else "")
        if ended is not None:
            seconds = ended.seconds
        else:
            seconds = float((job.get("finished_at") or 0) - (job.get("started_at") or job.get("finished_at") or 0))
        return TrainResult(status=status, history=history, model=module, error=error, reason=reason,  # type: ignore[arg-type]
                           seconds=seconds, run_id=started.run_id if started else self.job_id, task=task,
                           classes=classes, hyperparameters=job.get("hyperparameters") or {},
                           job_id=self.job_id, model_name=model_name)

    def _load(self, weights: ModelWeights, name: str) -> nn.Module | None:
        module = self._module
        if module is None:
            spec = weights.info.get("spec")
            if spec is None:
                return None  # a user-defined module: attach --model NET loads the weights into it
            module = build_model(spec)
        try:
            module.load_state_dict(weights.state_dict)
        except RuntimeError as exc:
            raise AiaasError(f"MODEL: the trained weights of {name!r} do not fit the local "
                             f"{type(module).__name__}: {_first_line(exc)}") from None
        return module


def _subscribers(progress: Any, stop: StopSignal,
                 callbacks: Iterable[Callable[[Event], None]]) -> list[Callable[[Event], None]]:
    return [s for s in [make_reporter(progress, stop), *callbacks] if s is not None]


def train_remote(model: Any, data: Any, cfg: TrainConfig, *, backend: str, token: str | None = None,
                 workers: int = 1, background: bool = False, val: Any = None, target: str | None = None,
                 normalize: bool = False, threads: int | None = None, progress: Any = "auto",
                 callbacks: Iterable[Callable[[Event], None]] = (), stop: StopSignal | None = None,
                 name: str | None = None, shard: bool = False) -> TrainResult | RemoteRun:
    """Train on the server at `backend`: the same arguments and result as local training."""
    _check_remote_config(cfg, threads)
    client = client_for(backend, token)
    try:
        submission = _submit(client, model, data, cfg, val=val, target=target, normalize=normalize,
                             workers=workers, shard=shard, name=name)
    except BaseException:
        client.close()
        raise
    stop = stop or StopSignal()
    if progress is not False:
        print(submission.summary)
    run = RemoteRun(client, submission.job["id"], module=submission.module, classes=submission.classes,
                    subscribers=_subscribers(progress, stop, callbacks), stop=stop)
    return run.start() if background else run.follow()


def follow_job(backend: str, job_id: str, *, token: str | None = None, module: nn.Module | None = None,
               progress: Any = "auto", callbacks: Iterable[Callable[[Event], None]] = (),
               stop: StopSignal | None = None) -> TrainResult:
    """Replay a job's events from the start into a new reporter, follow it live to its end and
    return its result (`%aiaas attach`, e.g. after a kernel restart). The trained weights are
    loaded into `module` when given, else into a built-in model rebuilt from its spec."""
    client = client_for(backend, token)
    try:
        client.get_job(job_id)  # a clear error for an unknown id before any reporter appears
    except BaseException:
        client.close()
        raise
    stop = stop or StopSignal()
    run = RemoteRun(client, job_id, module=module, classes=None, subscribers=_subscribers(progress, stop, callbacks),
                    stop=stop)
    return run.follow()


# -- prediction ---------------------------------------------------------------------------

def _server_model(model: Any, url: str) -> tuple[str, int | None]:
    if isinstance(model, TrainResult):
        if model.model_name is None:
            raise BadArgument("MODEL", "a server model's name or a model trained with --backend",
                              "a TrainResult of local training", "Predict without --backend to use it here.")
        known = _SERVER_MODELS.get(model.model) if model.model is not None else None
        return model.model_name, known[2] if known and known[1] == model.model_name else None
    if isinstance(model, str):
        return model, None
    if isinstance(model, nn.Module):
        known = _SERVER_MODELS.get(model)
        if known is None:
            raise BadArgument("MODEL", "a server model's name or a model trained with --backend",
                              f"a {type(model).__name__} trained locally", "Predict without --backend to use it here.")
        if known[0] != url:
            raise BadArgument("MODEL", f"a model on {url}", f"a {type(model).__name__} trained on {known[0]}")
        return known[1], known[2]
    raise BadArgument("MODEL", "a server model's name, a TrainResult or an nn.Module trained with --backend",
                      describe(model))


def _features(data: Any) -> torch.Tensor:
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        data = data[0]  # (X, y): predict on X
    if isinstance(data, str):
        if data.replace("_", "-") not in BUILTIN_DATASETS:
            raise BadArgument("--data", f"features or a built-in data set ({', '.join(BUILTIN_DATASETS)})", repr(data))
        data = load_builtin_dataset(data.replace("_", "-"))[0]
    X = to_features(data)
    if X.shape[0] == 0:
        raise BadArgument("--data", "at least one row", "an empty input (0 rows)")
    return X


def predict_remote(model: Any, data: Any, *, batch_size: int = 1024, classes: bool = False, backend: str,
                   token: str | None = None) -> torch.Tensor:
    """Run a model served at `backend` over the V2 inference protocol (so also MLServer or Triton).
    Raw features are sent; the server applies the model's normalizer."""
    url = _normalize_url(backend)
    name, version = _server_model(model, url)
    X = _features(data)
    with client_for(url, token) as client:
        try:
            out = torch.cat([client.infer(name, X[i:i + int(batch_size)], version=version)
                             for i in range(0, X.shape[0], int(batch_size))])
        except RemoteError as exc:
            if exc.status != 404:
                raise
            raise BadArgument("MODEL", f"a model served at {url}", f"{name!r}, which it does not have",
                              _known_models(client, name)) from None
    if classes:
        return out.argmax(dim=1) if out.ndim == 2 and out.shape[1] > 1 else (out.reshape(-1) > 0).to(torch.int64)
    return out


def _known_models(client: Client, name: str) -> str:
    try:
        names = sorted({m["name"] for m in client.models()})
    except AiaasError:  # not an aiaas-lab server (MLServer, Triton): no /v1/models to list
        return ""
    if not names:
        return "The server has no models yet."
    return (close_matches(name, names) + f" Models there: {', '.join(names[:20])}.").strip()
