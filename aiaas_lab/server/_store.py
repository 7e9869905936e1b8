"""The server's state in SQLite: tenants' jobs, their events and the models they registered.

Every write goes through one writer thread with its own connection, one transaction per call,
so concurrent jobs never interleave half-done updates and the event loop never waits on a
lock. Reads use a separate connection on the event loop's thread: in WAL mode readers never
block the writer, and the reads here are small indexed lookups. A commit is durable once
`write` returns (WAL with synchronous=NORMAL survives the process being killed).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Store"]

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
"""


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

    def _init(self) -> None:
        conn = _connect(self.path)
        conn.executescript(_SCHEMA)
        self._local.conn = conn

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn: sqlite3.Connection = self._local.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in one transaction on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run, fn, args)

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """The same, for start-up and shutdown code outside the event loop."""
        return self._writer.submit(self._run, fn, args).result()

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        return self._reader.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._reader.execute(sql, params).fetchall()

    def close(self) -> None:
        def close_writer() -> None:
            self._local.conn.close()

        self._writer.submit(close_writer).result()
        self._writer.shutdown()
        self._reader.close()
