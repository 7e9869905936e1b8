"""`%aiaas connect | jobs | attach | cancel | models`: the remote backend's magics.

`%aiaas connect URL [--token T]` makes URL the default `--backend` of later commands and keeps the
token in this kernel's memory only; nothing here ever prints it.
"""

from __future__ import annotations

import datetime
import html
from typing import Any

from ..client.client import Client, RemoteError, _normalize_url
from .._errors import AiaasError, BadArgument
from .parsing import Parser as _Parser
from .._api import attach
from ..launch.remote import client_for, remember_token

__all__ = ["run_remote_command", "Listing"]


class Listing(list):  # type: ignore[type-arg]
    """Rows (dicts) that show as a table: what `%aiaas jobs` and `%aiaas models` return."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str], empty: str) -> None:
        super().__init__(rows)
        self._columns = columns
        self._empty = empty

    def _cells(self) -> list[list[str]]:
        return [[_cell(row.get(c)) for c in self._columns] for row in self]

    def __repr__(self) -> str:
        if not self:
            return self._empty
        cells = self._cells()
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(self._columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self._columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        if not self:
            return f"<p>{html.escape(self._empty)}</p>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self._columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self._cells())
        return f"<table class='aiaas-listing'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _backend(magics: Any, given: str | None) -> str:
    url = given or magics.backend
    if not url:
        raise AiaasError("No server to talk to: run %aiaas connect URL [--token T] first, or pass --backend URL.")
    return _normalize_url(url)


def _job_error(exc: RemoteError, job_id: str, url: str) -> AiaasError:
    if exc.status == 404:
        return BadArgument("JOB_ID", f"a job on {url}", f"{job_id!r}, which it does not have",
                           "%aiaas jobs lists them.")
    return exc


def _connect(magics: Any, args: list[str]) -> None:
    p = _Parser(prog="%aiaas connect", add_help=False,
                description="Use the aiaas-lab server at URL for later train, predict, jobs, attach, cancel and "
                "models commands. The token (default: AIAAS_TOKEN) stays in this kernel's memory.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--token", metavar="T", help="bearer token for the server")
    opts = magics._parse(p, args)
    if opts is None:
        return None
    url = _normalize_url(opts.url)
    with Client(url, opts.token) as client:
        info = client.server_info()  # proves the server is there and accepts the token
    remember_token(url, opts.token)
    magics.backend = url
    print(f"Connected to {url} ({info.get('name', 'server')} {info.get('version', '')}".rstrip()
          + "); later %aiaas commands use it.")
    return None


def _jobs(magics: Any, args: list[str]) -> Listing | None:
    p = _Parser(prog="%aiaas jobs", add_help=False, description="List your jobs on the server, newest first.")
    p.add_argument("--backend", metavar="URL")
    opts = magics._parse(p, args)
    if opts is None:
        return None
    with client_for(_backend(magics, opts.backend)) as client:
        jobs = client.list_jobs()
    rows = []
    for job in jobs:
        metrics = job.get("metrics") or {}
        model = job.get("model") or {}
        rows.append({"id": job["id"], "status": job["status"], "created": _when(job.get("created_at")),
                     "model": f"{model['name']}:{model.get('version')}" if model else None,
                     "loss": metrics.get("loss"), "accuracy": metrics.get("accuracy"),
                     "val_accuracy": metrics.get("val_accuracy"), "error": job.get("error")})
    columns = ["id", "status", "created", "model", "loss", "accuracy", "val_accuracy"]
    if any(r["error"] for r in rows):
        columns.append("error")
    return Listing(rows, columns, "(no jobs)")


def _attach(magics: Any, args: list[str]) -> Any:
    p = _Parser(prog="%aiaas attach", add_help=False,
                description="Replay a job's progress from the start and follow it live to the end; returns its "
                "TrainResult. A built-in model is rebuilt here; pass --model NET to load a custom one's weights.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--backend", metavar="URL")
    p.add_argument("--model", metavar="NET", help="a local nn.Module to load the trained weights into")
    p.add_argument("--no-widget", action="store_true", help="text progress instead of the widget")
    p.add_argument("-o", dest="output", metavar="NAME", help="also store the result in this variable")
    opts = magics._parse(p, args)
    if opts is None:
        return None
    url = _backend(magics, opts.backend)
    module = magics._evaluate(opts.model, "--model") if opts.model else None
    if module is not None:
        from torch import nn

        if not isinstance(module, nn.Module):
            from .._errors import describe

            raise BadArgument("--model", "a torch.nn.Module to load the weights into", describe(module))
    try:
        result = attach(opts.job_id, backend=url, model=module, progress=magics._progress(opts.no_widget))
    except RemoteError as exc:
        raise _job_error(exc, opts.job_id, url) from None
    if result.model is None and result.model_name:
        print(f"{result.model_name} is a custom module, so it is not rebuilt here: pass --model NET to load its "
              f"weights into your module, or predict on the server with %aiaas predict {result.model_name} --data X.")
    magics._store(opts.output, result)
    return result


def _cancel(magics: Any, args: list[str]) -> None:
    p = _Parser(prog="%aiaas cancel", add_help=False,
                description="Stop a job at its next step; the server keeps its checkpoint.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--backend", metavar="URL")
    opts = magics._parse(p, args)
    if opts is None:
        return None
    url = _backend(magics, opts.backend)
    with client_for(url) as client:
        try:
            job = client.cancel_job(opts.job_id)
        except RemoteError as exc:
            raise _job_error(exc, opts.job_id, url) from None
    print(f"job {job['id']}: {job['status']}")
    return None


def _models(magics: Any, args: list[str]) -> Listing | None:
    p = _Parser(prog="%aiaas models", add_help=False, description="List your models on the server.")
    p.add_argument("--backend", metavar="URL")
    opts = magics._parse(p, args)
    if opts is None:
        return None
    with client_for(_backend(magics, opts.backend)) as client:
        models = client.models()
    rows = [{"name": m["name"], "version": m.get("version"), "job": m.get("job_id"), "task": m.get("task"),
             "input": _shape(m.get("inputs")), "output": _shape(m.get("outputs")),
             "created": _when(m.get("created_at"))} for m in models]
    return Listing(rows, ["name", "version", "job", "task", "input", "output", "created"], "(no models)")


def _shape(tensors: list[dict[str, Any]] | None) -> str | None:
    if not tensors:
        return None
    return "[" + ", ".join("N" if d == -1 else str(d) for d in tensors[0].get("shape", [])) + "]"


_COMMANDS = {"connect": _connect, "jobs": _jobs, "attach": _attach, "cancel": _cancel, "models": _models}


def run_remote_command(magics: Any, command: str, args: list[str]) -> Any:
    return _COMMANDS[command](magics, args)
