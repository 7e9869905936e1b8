"""The server's state in SQLite: tenants' jobs, their events and the models they registered.

Every write goes through one writer thread with its own connection, one transaction per call,
so concurrent jobs never interleave half-done updates and the event loop never waits on a
lock. Reads use a separate connection on the event loop's thread: in WAL mode readers never
block the writer, and the reads here are small indexed lookups. A commit is durable once
`write` returns (WAL with synchronous=NORMAL survives the process being killed).

When the disk refuses (full, read-only, an I/O error), a call raises `StorageUnavailable`, an
ApiError, so a request that needed the store gets 503 with Retry-After rather than a 500; the
store stays marked unavailable until a write succeeds again: any write, the executor's
`until_available` while a job waits, or `probe`, which the ready endpoint calls so that it
recovers on its own when no job is running. Errors that are bugs (bad SQL) are not storage failures and propagate as they are.

For tests, AIAAS_LAB_FAULT_STORE=PATH makes every write fail as an unwritable disk would while
the file PATH exists (a disk cannot be filled or frozen on demand without root).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ._http import ApiError

__all__ = ["Store", "StorageUnavailable"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    request TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    error TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    model_name TEXT,
    model_version INTEGER,
    idempotency_key TEXT,
    request_hash TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_event INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version)
);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, checked_at REAL NOT NULL);
"""

RETRY_AFTER_S = 5
_PROBE_S = 1.0  # how often an unavailable store is tried again

# SQLite's primary result codes that mean the disk, not the statement, failed.
_STORAGE_CODES = {3, 5, 6, 8, 10, 13, 14, 26}  # PERM BUSY LOCKED READONLY IOERR FULL CANTOPEN NOTADB
_STORAGE_WORDS = ("disk", "readonly", "read-only", "locked", "unable to open", "i/o error", "full")


class StorageUnavailable(ApiError):
    """The server's storage refused a read or a write; retry later (503)."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, f"the server's storage is unavailable ({detail}); nothing was changed. "
                              f"Retry in a few seconds.", {"Retry-After": str(RETRY_AFTER_S)})
        self.detail = detail


def _storage_failure(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _STORAGE_CODES
    return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc).lower() for w in _STORAGE_WORDS)


def _touch(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="aiaas-store-writer")
        self._writer.submit(self._init).result()
        self._reader = _connect(self.path)
        self.available = True
        self.unavailable_reason = ""
        self._probe: asyncio.Future[None] | None = None
        self._probed_at = 0.0
        self._fault = os.environ.get("AIAAS_LAB_FAULT_STORE")

    def _init(self) -> None:
        conn = _connect(self.path)
        conn.executescript(_SCHEMA)
        self._local.conn = conn

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn: sqlite3.Connection = self._local.conn
        try:
            if self._fault and os.path.exists(self._fault):
                raise sqlite3.OperationalError("disk I/O error (injected: AIAAS_LAB_FAULT_STORE)")
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # a failed COMMIT may have rolled back already; the cause is what matters
                raise
        except sqlite3.Error as exc:
            if not _storage_failure(exc):
                raise
            self._failed(exc)
            raise StorageUnavailable(str(exc)) from None
        self.available = True
        return result

    def _failed(self, exc: Exception) -> None:
        self.available, self.unavailable_reason = False, str(exc)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in one transaction on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run, fn, args)

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """The same, for start-up and shutdown code outside the event loop."""
        return self._writer.submit(self._run, fn, args).result()

    async def until_available(self) -> None:
        """Return once a write succeeds again (at once if the store is available). One probe
        loop serves every waiter: a write to a tiny table every second, not one per waiter."""
        if self.available:
            return
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_until_writable())
        await asyncio.shield(self._probe)

    async def probe(self) -> bool:
        """Whether the store takes writes. Once marked unavailable, it tries one tiny write, at
        most once per _PROBE_S however often it is asked (a load balancer polls ready often)."""
        if not self.available and time.monotonic() - self._probed_at >= _PROBE_S:
            self._probed_at = time.monotonic()
            try:
                await self.write(_touch)
            except StorageUnavailable:
                pass
        return self.available

    async def _probe_until_writable(self) -> None:
        while True:
            try:
                await self.write(_touch)
                return
            except StorageUnavailable:
                await asyncio.sleep(_PROBE_S)

    def _read(self, sql: str, params: tuple[Any, ...], many: bool) -> Any:
        try:
            cursor = self._reader.execute(sql, params)
            return cursor.fetchall() if many else cursor.fetchone()
        except sqlite3.Error as exc:
            if not _storage_failure(exc):
                raise
            self._failed(exc)
            raise StorageUnavailable(str(exc)) from None

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        return self._read(sql, params, False)  # type: ignore[no-any-return]

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._read(sql, params, True)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()

        def close_writer() -> None:
            self._local.conn.close()

        self._writer.submit(close_writer).result()
        self._writer.shutdown()
        self._reader.close()
