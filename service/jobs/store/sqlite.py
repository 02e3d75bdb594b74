"""The SQLite job store: one file, one replica (the default).

SQLite runs on aiosqlite's own thread, so no call blocks the event loop. The file is in WAL mode with
`synchronous=FULL`: every commit is fsynced to the WAL before `create` returns, so an accepted job survives
SIGKILL or a power cut. Two connections: one for writes, serialised by an asyncio lock, each write an
explicit `BEGIN IMMEDIATE … COMMIT` (the write lock is taken up front, so several stores on one file, in one
process or several, wait on SQLite's busy timeout instead of failing); one for reads, which WAL lets run
beside a writer and which only ever sees committed rows.

Schema: one `jobs` table, one row per job, a column per `Job` field (JSON text for args, progress, result
and error; a BLOB for binary results). Indexes: (status, created_at, id) for claiming in arrival order and
listing by status, (created_at, id) for listing newest first, finished_at for expiry; the idempotency key is
UNIQUE. `claim` is one `UPDATE … WHERE id = (SELECT … ORDER BY created_at, id LIMIT 1) RETURNING …`.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from service.jobs.model import CANCELLED, FINAL, QUEUED, RUNNING, STATUSES, Job
from service.jobs.store.base import JobStore, dumps_json, loads_json

log = logging.getLogger("procbridge.jobs")

MIN_SQLITE_VERSION = (3, 35, 0)  # UPDATE … RETURNING
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 30.0  # seconds a statement waits for another connection's write lock
_CHUNK = 500  # ids per `IN (…)` list

_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_COLS = ", ".join(_FIELDS)
_JSON_FIELDS = frozenset({"args", "progress", "result", "error"})
_FINAL_SQL = ", ".join(f"'{s}'" for s in sorted(FINAL))
_OPEN_SQL = f"'{QUEUED}', '{RUNNING}'"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    timeout REAL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress TEXT,
    result TEXT,
    result_bytes BLOB,
    error TEXT,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
PRAGMA user_version = {SCHEMA_VERSION};
"""


def _json(value: Any) -> str | None:
    return None if value is None else dumps_json(value).decode()


def _row_to_job(row: Sequence[Any]) -> Job:
    data = dict(zip(_FIELDS, row, strict=True))
    for name in _JSON_FIELDS:
        if data[name] is not None:
            data[name] = loads_json(data[name])
    if data["result_bytes"] is not None:
        data["result_bytes"] = bytes(data["result_bytes"])
    return Job(**data)


def _job_params(job: Job) -> tuple[Any, ...]:
    values = []
    for name in _FIELDS:
        value = getattr(job, name)
        values.append(_json(value) if name in _JSON_FIELDS else value)
    return tuple(values)


class SQLiteJobStore(JobStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteJobStore({self.path!r})"

    # -- connections -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(
                f"the SQLite job store needs SQLite >= {'.'.join(map(str, MIN_SQLITE_VERSION))}; "
                f"this Python has {sqlite3.sqlite_version}"
            )
        memory = self.path == ":memory:" or self.path == ""
        writer = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
        reader: aiosqlite.Connection | None = None
        try:
            (mode,) = next(iter(await writer.execute_fetchall("PRAGMA journal_mode = WAL")))
            if not memory and str(mode).lower() != "wal":
                raise RuntimeError(f"could not put {self.path} in WAL mode (journal_mode is {mode})")
            await writer.execute("PRAGMA synchronous = FULL")
            await writer.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
            if not memory:  # a second connection to ":memory:" would be another, empty database
                reader = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
                await reader.execute("PRAGMA query_only = ON")
        except BaseException:
            await writer.close()
            if reader is not None:
                await reader.close()
            raise
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        async with self._lock:
            writer, reader = self._writer, self._reader
            self._writer = self._reader = None
            if reader is not None:
                await reader.close()
            if writer is not None:
                await writer.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._writer

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time on the write connection, holding SQLite's write lock throughout."""
        async with self._lock:
            conn = self._conn()
            if conn.in_transaction:  # a caller cancelled mid-transaction left it open
                await conn.rollback()
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                try:
                    await conn.rollback()
                except Exception:  # the original error is what the caller needs: raised below
                    log.warning("could not roll back a failed transaction on %s", self.path, exc_info=True)
                raise

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is not None:
            return list(await self._reader.execute_fetchall(sql, params))
        async with self._lock:  # ":memory:": the write connection is the only one
            return list(await self._conn().execute_fetchall(sql, params))

    # -- JobStore ----------------------------------------------------------------------------------

    async def create(self, job: Job) -> tuple[Job, bool]:
        if job.status != QUEUED:
            raise ValueError(f"a new job must be {QUEUED}, not {job.status}")
        params = _job_params(job)
        async with self._transaction() as conn:
            if job.idempotency_key is not None:
                rows = list(await conn.execute_fetchall(
                    f"SELECT {_COLS} FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                ))
                if rows:
                    return _row_to_job(rows[0]), False
            await conn.execute(f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join('?' * len(_FIELDS))})", params)
        return dataclasses.replace(job), True

    async def get(self, job_id: str) -> Job | None:
        rows = await self._read(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    async def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        if limit <= 0:
            return []
        if status is None:
            rows = await self._read(f"SELECT {_COLS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        else:
            rows = await self._read(
                f"SELECT {_COLS} FROM jobs WHERE status = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                (status, limit),
            )
        return [_row_to_job(row) for row in rows]

    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        now = time.time()
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = '{RUNNING}', owner = ?, lease_until = ?, started_at = ?,
                       attempts = attempts + 1
                    WHERE id = (SELECT id FROM jobs WHERE status = '{QUEUED}' ORDER BY created_at, id LIMIT 1)
                      AND status = '{QUEUED}'
                    RETURNING {_COLS}""",
                (owner, now + lease_seconds, now),
            ))
        return _row_to_job(rows[0]) if rows else None

    async def renew(self, owner: str, job_ids: builtins.list[str], lease_seconds: float) -> None:
        if not job_ids:
            return
        lease_until = time.time() + lease_seconds
        async with self._transaction() as conn:
            for chunk in _chunks(job_ids):
                await conn.execute(
                    f"""UPDATE jobs SET lease_until = ?
                        WHERE owner = ? AND status = '{RUNNING}' AND id IN ({", ".join("?" * len(chunk))})""",
                    (lease_until, owner, *chunk),
                )

    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                f"UPDATE jobs SET progress = ? WHERE id = ? AND status = '{RUNNING}'", (_json(progress), job_id)
            )

    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Any = None,
        result_bytes: bytes | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        if status not in FINAL:
            raise ValueError(f"{status!r} is not a final status")
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = ?, finished_at = ?, result = ?, result_bytes = ?, error = ?,
                       lease_until = NULL
                    WHERE id = ? AND status IN ({_OPEN_SQL})
                    RETURNING id""",
                (status, time.time(), _json(result), result_bytes, _json(error), job_id),
            ))
        return bool(rows)

    async def cancel(self, job_id: str, error: dict[str, Any]) -> Job | None:
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = '{CANCELLED}', finished_at = ?, error = ?, lease_until = NULL
                    WHERE id = ? AND status IN ({_OPEN_SQL})
                    RETURNING {_COLS}""",
                (time.time(), _json(error), job_id),
            ))
            if not rows:
                rows = list(await conn.execute_fetchall(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)))
        return _row_to_job(rows[0]) if rows else None

    async def recover(self, *, owner_gone: bool = False) -> int:
        reset = f"""UPDATE jobs SET status = '{QUEUED}', owner = NULL, lease_until = NULL, progress = NULL
                    WHERE status = '{RUNNING}'"""
        async with self._transaction() as conn:
            if owner_gone:
                cursor = await conn.execute(reset)
            else:
                cursor = await conn.execute(f"{reset} AND (lease_until IS NULL OR lease_until < ?)", (time.time(),))
            count = cursor.rowcount
            await cursor.close()
        return max(count, 0)

    async def expire(self, finished_before: float) -> int:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                f"DELETE FROM jobs WHERE finished_at < ? AND status IN ({_FINAL_SQL})", (finished_before,)
            )
            count = cursor.rowcount
            await cursor.close()
        return max(count, 0)

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in await self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            out[status] = int(n)
        return out


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
