"""The ASGI application: routes, middleware, error handling and the executor's lifetime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from .._errors import AiaasError
from ._auth import AuthMiddleware
from ._blobs import Blobs
from ._executor import DEFAULT_JOB_MEMORY_MB, Executor, JobSignals
from ._http import ApiError, error_response
from ._limits import BodyBoundsMiddleware
from ._registry import Registry
from ._routes import v1_routes
from ._store import Store
from ._v2 import InferencePool, v2_routes

__all__ = ["ServerConfig", "create_app"]


@dataclass
class ServerConfig:
    data_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)  # token -> tenant; empty only with --insecure
    max_jobs: int = 2  # 0 accepts and queues jobs without running any (tests, maintenance)
    max_upload_mb: float = 256
    allow_code: bool = False
    threads_per_job: int = 0  # 0: the cores but one (the server's) shared out among max_jobs
    keepalive_s: float = 15.0
    job_memory_mb: int = DEFAULT_JOB_MEMORY_MB  # each process of a job may allocate this much; 0: no limit
    infer_threads: int = 0  # forward passes at once; 0: the cores, at most 8
    infer_queue: int = 64  # inference requests that may wait for a thread; more get 503
    body_timeout_s: float = 30.0  # a request body that pauses longer gets 408

    def inference_threads(self) -> int:
        return self.infer_threads or max(1, min(8, os.cpu_count() or 1))

    def threads(self) -> int:
        # Oversubscribed torch threads spin against each other: on 2 busy cores, 2 threads per
        # job trained several times slower than 1.
        return self.threads_per_job or max(1, ((os.cpu_count() or 1) - 1) // max(self.max_jobs, 1))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"no endpoint {request.url.path[:100]}", 405: f"{request.method} is not allowed on {request.url.path[:100]}"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # A bug. Starlette re-raises it after this response, so uvicorn logs the traceback for the
    # operator; the client gets one line.
    return error_response(500, "the server failed to handle this request; its log has the details")


def _lock(data_dir: Path) -> IO[str]:
    """One server per data dir: two would run the same jobs into the same checkpoints. The
    kernel drops the lock when the process dies, however it dies, so a restart is never blocked."""
    handle = open(data_dir / "server.lock", "a+")  # noqa: SIM115 - held for the app's lifetime
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one server per data dir is up to the operator
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AiaasError(f"--data-dir {data_dir} is in use by another aiaas-lab serve; stop it first or "
                         "give this one another --data-dir") from None
    return handle


def create_app(config: ServerConfig) -> Starlette:
    """The app over `config.data_dir`, which it locks; raises AiaasError if another server holds it."""
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs_dir = data_dir / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    lock = _lock(data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        if state.lock.closed:  # a second lifespan of the same app
            state.lock = _lock(data_dir)
        state.blobs.remove_partial()
        state.store = Store(data_dir / "aiaas.sqlite3")
        state.registry = Registry(state.store, jobs_dir, config.allow_code)
        state.executor = Executor(state.store, state.blobs, jobs_dir, state.signals, max_jobs=config.max_jobs,
                                  threads_per_job=config.threads(), allow_code=config.allow_code,
                                  job_memory_mb=config.job_memory_mb or None,
                                  on_model=state.registry.invalidate)
        state.infer_pool = InferencePool(config.inference_threads(), config.infer_queue)
        await state.executor.start()
        try:
            yield
        finally:
            state.infer_pool.close()
            await state.executor.stop()
            state.store.close()
            state.lock.close()

    app = Starlette(
        routes=v2_routes() + v1_routes(),  # routes match in order: inference, the hot path, first
        # The body's bounds outermost: they must see a 401 sent before the body was read too.
        middleware=[Middleware(BodyBoundsMiddleware, max_bytes=int(config.max_upload_mb * 2**20),
                               seconds=config.body_timeout_s),
                    Middleware(AuthMiddleware, tokens=config.tokens)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.lock = lock
    app.state.jobs_dir = jobs_dir
    app.state.blobs = Blobs(data_dir / "blobs")
    app.state.signals = JobSignals()
    return app
