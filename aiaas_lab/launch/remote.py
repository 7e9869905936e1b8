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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import AiaasError, BadArgument, close_matches
from ..client.client import Blob, Client, ModelWeights, RemoteError, _normalize_url
from ..engine.data import InMemory, check_normalizable
from ..engine.datasets import BUILTIN_DATASETS
from ..engine.events import EpochEnd, Event, RunEnded, RunStarted
from ..engine.inputs import Preprocessing
from ..engine.job import LOCAL_ONLY, Job, check_combination, replace
from ..engine.models import BUILTIN_MODELS
from ..engine.prepare import load_model, prepare
from .handle import RemoteRun, RunHandle
from .result import TrainResult, result_of

__all__ = ["run_remote", "follow_job", "RemoteRun", "client_for", "remember_token", "SERVER_MODELS"]

# Tokens given to `%aiaas connect`, by server URL: in memory only, never written anywhere.
_TOKENS: dict[str, str] = {}
# Modules trained remotely -> (server URL, model name, version), so `predict(net, backend=URL)` asks
# the server for exactly the version that was trained.
SERVER_MODELS: weakref.WeakKeyDictionary[nn.Module, tuple[str, str, int | None]] = weakref.WeakKeyDictionary()
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
    preprocessing: Preprocessing | None  # the client's view of the raw inputs (columns, labels)
    summary: str


def _hyperparameters(job: Job) -> dict[str, Any]:
    """The job's options as the server takes them: all but those only a local run has."""
    return {k: v for k, v in job.hyperparameters.to_dict().items() if k not in LOCAL_ONLY}


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


def _submit(client: Client, job: Job) -> _Submission:
    """Validate locally (the same preparation as every launcher), upload what the server lacks,
    and create the job."""
    model, data, val = job.model, job.data, job.val
    builtin_data = isinstance(data, str) and data.replace("_", "-") in BUILTIN_DATASETS
    val_fraction = val is None or (isinstance(val, (int, float)) and not isinstance(val, bool))
    if isinstance(model, str) and model not in BUILTIN_MODELS:
        raise BadArgument("MODEL", f"an nn.Module or a built-in model ({', '.join(BUILTIN_MODELS)})",
                          repr(model), close_matches(model, BUILTIN_MODELS))

    module: nn.Module | None = None
    preprocessing: Preprocessing | None = None
    if isinstance(model, str) and builtin_data and val_fraction:
        # A built-in model on a built-in data set: nothing to prepare or send; the server sizes
        # the model to the data and the weights' metadata carries the spec to rebuild it here.
        model_ref: dict[str, Any] = {"builtin": model}
        data_ref: dict[str, Any] = {"builtin": data.replace("_", "-")}
        val_ref: Any = val
        how, data_note = f"the built-in {model!r}", f"the built-in {data!r} data"
        export_failure = ""
    else:
        # Normalisation happens on the server (its statistics travel with the model there).
        local = Job(model=model, data=data, val=val, target=job.target,
                    hyperparameters=replace(job.hyperparameters, normalize=False, checkpoint=None,
                                                    resume=False, workers=1, shard=False))
        prepared = prepare(local)
        module, spec = prepared.module, prepared.spec
        preprocessing = prepared.preprocessing
        X, y = _tensors(prepared.data.train, prepared.data.task)
        if builtin_data and val_fraction:
            data_ref, val_ref, data_note = {"builtin": data.replace("_", "-")}, val, f"the built-in {data!r} data"
        else:
            blob = _upload_data(client, X, y, "--data")
            data_ref = {"tensors": blob.sha256}
            data_note = (f"data uploaded ({_megabytes(blob.size)})" if blob.uploaded
                         else f"data already on the server ({_megabytes(blob.size)})")
            val_ref = None
            if prepared.data.val is not None:
                vX, vy = _tensors(prepared.data.val, prepared.data.task)
                val_ref = {"tensors": _upload_data(client, vX, vy, "--val").sha256}
        if spec is not None:
            model_ref, export_failure = {"builtin": spec["name"], "config": spec["config"]}, ""
            how = f"the built-in {spec['name']!r}"
        else:
            model_ref, how, export_failure = _module_payload(client, module, X[:2])

    body: dict[str, Any] = {"model": model_ref, "data": data_ref, "val": val_ref,
                            "hyperparameters": _hyperparameters(job), "name": job.name}
    if preprocessing is not None and (preprocessing.classes is not None or preprocessing.columns is not None):
        body["preprocessing"] = {"classes": preprocessing.classes, "columns": preprocessing.columns,
                                 "categories": preprocessing.categories}
    try:
        created = client.create_job(body)
    except RemoteError as exc:
        if "pickle" in model_ref and exc.status == 400:
            raise AiaasError(f"MODEL: {type(module).__name__} cannot be sent to the server at {client.url}. "
                             f"{export_failure} Sending it as code was refused: {exc}") from None
        raise
    summary = f"aiaas: job {created['id']} on {client.url}: model sent as {how}; {data_note}."
    return _Submission(job=created, module=module, preprocessing=preprocessing, summary=summary)


# -- following a job ----------------------------------------------------------------------

_END = object()


def run_remote(job: Job, run: RunHandle, *, backend: str, token: str | None = None, quiet: bool = False) -> TrainResult:
    """The remote launcher: submit the job to the server at `backend` and follow it to its end
    through `run`, exactly as the local launcher reports a loop in this process."""
    check_combination(job.hyperparameters, has_val=job.val is not None, remote=True)
    check_normalizable(job.data, job.hyperparameters.normalize)  # the server would fit it on the upload
    client = client_for(backend, token)
    try:
        submission = _submit(client, job)
    except BaseException:
        client.close()
        raise
    if not quiet:
        run.say(submission.summary)
    return _Follower(client, submission.job["id"], run, module=submission.module,
                     preprocessing=submission.preprocessing).follow()


def follow_job(backend: str, job_id: str, run: RunHandle, *, token: str | None = None,
               module: nn.Module | None = None) -> TrainResult:
    """Replay a job's events from the start into `run`, follow it live to its end and return its
    result (`%aiaas attach`, e.g. after a kernel restart). The trained weights are loaded into
    `module` when given, else into a built-in model rebuilt from its spec."""
    client = client_for(backend, token)
    try:
        client.get_job(job_id)  # a clear error for an unknown id before any reporter appears
    except BaseException:
        client.close()
        raise
    return _Follower(client, job_id, run, module=module, preprocessing=None).follow()


class _Follower:
    """A job on the server, followed from here: its events go through the run handle, a stop
    (the widget's button, Ctrl-C, a subscriber that raised) cancels it there, and its end
    becomes a TrainResult."""

    def __init__(self, client: Client, job_id: str, run: RunHandle, *, module: nn.Module | None,
                 preprocessing: Preprocessing | None) -> None:
        self.client, self.job_id, self.run = client, job_id, run
        self._module, self._preprocessing = module, preprocessing
        self._cancelled = False
        run.job_id, run.where, run.client = job_id, f"job {job_id} on {client.url}", client
        run.accepted()  # queued on the server: a background caller has its handle now

    def follow(self) -> TrainResult:
        ended: RunEnded | None = None
        history: dict[int, dict[str, float]] = {}
        try:
            try:
                for event in self._events():
                    if isinstance(event, EpochEnd):
                        history[event.epoch] = {"epoch": event.epoch, **event.metrics}
                    elif isinstance(event, RunEnded):
                        ended = event
                    self.run.emit(event)
            except BaseException:
                # Whatever ends the following here (Ctrl-C twice, a lost connection, a bug)
                # must not leave the job training on the server with nobody watching.
                self._cancel(quiet=True)
                raise
            return self._result(self.client.get_job(self.job_id), ended, list(history.values()))
        finally:
            self.client.close()

    def _cancel(self, quiet: bool = False) -> None:
        if self._cancelled:
            return
        try:
            self.client.cancel_job(self.job_id)
        except AiaasError:
            if not quiet:
                raise
        else:
            self._cancelled = True  # only once the server took it: a failed cancel is tried again

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
        stop = self.run.stop_signal
        try:
            while True:
                if stop.is_set():
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

    def _result(self, job: dict[str, Any], ended: RunEnded | None, history: list[dict[str, float]]) -> TrainResult:
        status = _STATUS.get(job["status"], "failed")
        error = job.get("error") or (ended.error if ended else None)
        started = next((e for e in self.run.events if isinstance(e, RunStarted)), None)
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
                SERVER_MODELS[module] = (self.client.url, model_name, version)
        preprocessing = Preprocessing.from_dict(info) if info else self._preprocessing
        if preprocessing is not None and self._preprocessing is not None and info:
            # The server saw encoded tensors; the names of columns and labels are this side's.
            for key in ("classes", "columns", "categories"):
                if getattr(preprocessing, key) in (None, {}):
                    setattr(preprocessing, key, getattr(self._preprocessing, key))
        reason = ended.reason if ended else ("cancelled before training started" if status == "stopped" else "")
        if ended is not None:
            seconds = ended.seconds
        else:
            seconds = float((job.get("finished_at") or 0) - (job.get("started_at") or job.get("finished_at") or 0))
        result = result_of(self.run, model=module, preprocessing=preprocessing, status=status, history=history,
                           error=error, reason=reason, seconds=seconds,
                           run_id=started.run_id if started else self.job_id, job_id=self.job_id,
                           model_name=model_name)
        if not result.hyperparameters:
            result.hyperparameters = job.get("hyperparameters") or {}
        return result

    def _load(self, weights: ModelWeights, name: str) -> nn.Module | None:
        module = self._module
        if module is None:
            spec = weights.info.get("spec")
            if spec is None:
                return None  # a user-defined module: attach --model NET loads the weights into it
            module, _ = load_model({"spec": spec})
        try:
            module.load_state_dict(weights.state_dict)
        except RuntimeError as exc:
            raise AiaasError(f"MODEL: the trained weights of {name!r} do not fit the local "
                             f"{type(module).__name__}: {_first_line(exc)}") from None
        return module
