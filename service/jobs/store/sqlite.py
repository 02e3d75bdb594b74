"""The SQLite job store: one file, one replica (the default).

SQLite runs on aiosqlite's own thread, so no call blocks the event loop. The file is in WAL mode with
`synchronous=FULL`: every commit is fsynced to the WAL before `create` returns, so an accepted job survives
SIGKILL or a power cut. Two connections: one for writes, serialised by an asyncio lock, each write an
explicit `BEGIN IMMEDIATE … COMMIT` (the write lock is taken up front, so several stores on one file, in one
process or several, wait on SQLite's busy timeout instead of failing); one for reads, which WAL lets run
beside a writer and which only ever sees committed rows.

Schema (version 2; a version-1 file is migrated in place at open): a `jobs` table, one row per job, a
column per `Job` field (JSON text for args, progress, result, error and last_error; a BLOB for binary
results), and a `job_events` table, the event logs, keyed (job_id, run, seq). Indexes: the queue
(priority DESC, created_at, id) and run_at, both only over queued rows; (status, created_at, id),
(task, created_at, id) and (created_at, id) for listing newest first; finished_at for expiry; pending
webhooks by webhook_next_at; the idempotency key is UNIQUE. `claim` is one
`UPDATE … WHERE id = (SELECT … WHERE run_at <= now ORDER BY priority DESC, created_at, id LIMIT 1)
RETURNING …`: jobs not yet due are skipped in the walk of the queue index.
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

from service.jobs.model import (
    CANCELLED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    STATUSES,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    EventId,
    Job,
    LoggedEvent,
)
from service.jobs.store.base import JobStore, dumps_json, loads_json

log = logging.getLogger("procbridge.jobs")

MIN_SQLITE_VERSION = (3, 35, 0)  # UPDATE … RETURNING
SCHEMA_VERSION = 2
BUSY_TIMEOUT = 30.0  # seconds a statement waits for another connection's write lock
_CHUNK = 500  # ids per `IN (…)` list

_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_COLS = ", ".join(_FIELDS)
_JSON_FIELDS = frozenset({"args", "progress", "result", "error", "last_error"})
_FINAL_SQL = ", ".join(f"'{s}'" for s in sorted(FINAL))
_OPEN_SQL = f"'{QUEUED}', '{RUNNING}'"
# a job that ends with a webhook has its delivery due at once, in the same write (one `?`: the end time)
_WEBHOOK_DUE = f"""webhook_state = CASE WHEN webhook IS NOT NULL THEN '{WEBHOOK_PENDING}' ELSE webhook_state END,
                   webhook_next_at = CASE WHEN webhook IS NOT NULL THEN ? ELSE webhook_next_at END"""

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
"""

# Version 2 (issue 19): the columns a version-1 file lacks, added in place (ALTER TABLE … ADD COLUMN keeps
# every row), then the indexes and the event log.
_COLUMNS_2 = (
    "priority INTEGER NOT NULL DEFAULT 0",
    "run_at REAL",
    "retries INTEGER NOT NULL DEFAULT 0",
    "last_error TEXT",
    "runs INTEGER NOT NULL DEFAULT 0",
    "webhook TEXT",
    "webhook_state TEXT",
    "webhook_attempts INTEGER NOT NULL DEFAULT 0",
    "webhook_next_at REAL",
    "webhook_error TEXT",
)
_INDEXES = f"""
DROP INDEX IF EXISTS jobs_status_created;
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
CREATE INDEX IF NOT EXISTS jobs_task_created ON jobs (task, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, created_at, id) WHERE status = '{QUEUED}';
CREATE INDEX IF NOT EXISTS jobs_run_at ON jobs (run_at) WHERE status = '{QUEUED}';
CREATE INDEX IF NOT EXISTS jobs_webhooks ON jobs (webhook_next_at) WHERE webhook_state = '{WEBHOOK_PENDING}';
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, run, seq)
) WITHOUT ROWID;
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


async def _migrate(conn: aiosqlite.Connection, path: str) -> None:
    """Create the schema, or bring a file written by an older version up to SCHEMA_VERSION, in one
    transaction; a file from a newer version is refused (its rows may mean what this one cannot read)."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        ((version,),) = list(await conn.execute_fetchall("PRAGMA user_version"))
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path} was written by a newer procbridge (job schema {version} > {SCHEMA_VERSION})")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                await conn.execute(statement)
        have = {row[1] for row in await conn.execute_fetchall("PRAGMA table_info(jobs)")}
        for column in _COLUMNS_2:
            if column.split()[0] not in have:
                await conn.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
        await conn.execute("UPDATE jobs SET run_at = created_at WHERE run_at IS NULL")
        for statement in _INDEXES.split(";"):
            if statement.strip():
                await conn.execute(statement)
        await conn.execute("COMMIT")
    except BaseException:
        await conn.rollback()
        raise


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
            await _migrate(writer, self.path)
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
        job = dataclasses.replace(job, run_at=job.created_at if job.run_at is None else job.run_at)
        params = _job_params(job)
        async with self._transaction() as conn:
            if job.idempotency_key is not None:
                rows = list(await conn.execute_fetchall(
                    f"SELECT {_COLS} FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                ))
                if rows:
                    return _row_to_job(rows[0]), False
            await conn.execute(f"INSERT INTO jobs ({_COLS}) VALUES ({', '.join('?' * len(_FIELDS))})", params)
        return job, True

    async def get(self, job_id: str) -> Job | None:
        rows = await self._read(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,))
        return _row_to_job(rows[0]) if rows else None

    async def list(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> builtins.list[Job]:
        if limit <= 0:
            return []
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if task is not None:
            where.append("task = ?")
            params.append(task)
        if before is not None:
            where.append("(created_at, id) < (?, ?)")
            params += [before[0], before[1]]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {_COLS} FROM jobs {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit)
        )
        return [_row_to_job(row) for row in rows]

    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        now = time.time()
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = '{RUNNING}', owner = ?, lease_until = ?, started_at = ?,
                       attempts = attempts + 1, runs = runs + 1
                    WHERE id = (SELECT id FROM jobs INDEXED BY jobs_queue
                                WHERE status = '{QUEUED}' AND run_at <= ?
                                ORDER BY priority DESC, created_at, id LIMIT 1)
                      AND status = '{QUEUED}'
                    RETURNING {_COLS}""",
                (owner, now + lease_seconds, now, now),
            ))
        return _row_to_job(rows[0]) if rows else None

    async def next_run_at(self) -> float | None:
        rows = await self._read(f"SELECT MIN(run_at) FROM jobs WHERE status = '{QUEUED}'")
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def retry(self, job_id: str, owner: str, run_at: float, error: dict[str, Any]) -> bool:
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = '{QUEUED}', owner = NULL, lease_until = NULL, progress = NULL,
                       run_at = ?, last_error = ?
                    WHERE id = ? AND status = '{RUNNING}' AND owner = ?
                    RETURNING id""",
                (run_at, _json(error), job_id, owner),
            ))
        return bool(rows)

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
        events: Sequence[LoggedEvent] = (),
    ) -> bool:
        if status not in FINAL:
            raise ValueError(f"{status!r} is not a final status")
        now = time.time()
        async with self._transaction() as conn:  # one fsync for the log's end and the final state
            await _log_events(conn, job_id, events)
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = ?, finished_at = ?, result = ?, result_bytes = ?, error = ?,
                       lease_until = NULL, last_error = CASE WHEN ? = '{FAILED}' THEN ? ELSE last_error END,
                       {_WEBHOOK_DUE}
                    WHERE id = ? AND status IN ({_OPEN_SQL})
                    RETURNING id""",
                (status, now, _json(result), result_bytes, _json(error), status, _json(error), now, job_id),
            ))
        return bool(rows)

    async def cancel(self, job_id: str, error: dict[str, Any]) -> Job | None:
        now = time.time()
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET status = '{CANCELLED}', finished_at = ?, error = ?, lease_until = NULL,
                       {_WEBHOOK_DUE}
                    WHERE id = ? AND status IN ({_OPEN_SQL})
                    RETURNING {_COLS}""",
                (now, _json(error), now, job_id),
            ))
            if not rows:
                rows = list(await conn.execute_fetchall(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)))
        return _row_to_job(rows[0]) if rows else None

    async def recover(self, *, owner_gone: bool = False) -> int:
        now = time.time()
        reset = f"""UPDATE jobs SET status = '{QUEUED}', owner = NULL, lease_until = NULL, progress = NULL,
                       attempts = MAX(attempts - 1, 0), run_at = ?
                    WHERE status = '{RUNNING}'"""
        async with self._transaction() as conn:
            if owner_gone:
                cursor = await conn.execute(reset, (now,))
                await conn.execute(
                    f"""UPDATE jobs SET webhook_next_at = ?
                        WHERE webhook_state = '{WEBHOOK_PENDING}' AND webhook_next_at > ?""",
                    (now, now),
                )
            else:
                cursor = await conn.execute(f"{reset} AND (lease_until IS NULL OR lease_until < ?)", (now, now))
            count = cursor.rowcount
            await cursor.close()
        return max(count, 0)

    async def expire(self, finished_before: float) -> int:
        expired = f"""finished_at < ? AND status IN ({_FINAL_SQL})
                      AND (webhook_state IS NULL OR webhook_state != '{WEBHOOK_PENDING}')"""
        async with self._transaction() as conn:
            await conn.execute(
                f"DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE {expired})", (finished_before,)
            )
            cursor = await conn.execute(f"DELETE FROM jobs WHERE {expired}", (finished_before,))
            count = cursor.rowcount
            await cursor.close()
        return max(count, 0)

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in await self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            out[status] = int(n)
        return out

    # -- the event log -----------------------------------------------------------------------------

    async def append_events(self, job_id: str, events: builtins.list[LoggedEvent]) -> None:
        if not events:
            return
        async with self._transaction() as conn:
            await _log_events(conn, job_id, events)

    async def events(self, job_id: str, after: EventId | None = None) -> builtins.list[LoggedEvent]:
        run, seq = (after.run, after.seq) if after is not None else (-1, -1)
        rows = await self._read(
            "SELECT run, seq, event, data FROM job_events WHERE job_id = ? AND (run, seq) > (?, ?) ORDER BY run, seq",
            (job_id, run, seq),
        )
        return [LoggedEvent(EventId(int(r), int(q)), str(e), bytes(d)) for r, q, e, d in rows]

    # -- webhook deliveries ------------------------------------------------------------------------

    async def claim_webhooks(self, now: float, lease_until: float, limit: int) -> builtins.list[Job]:
        if limit <= 0:
            return []
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(
                f"""UPDATE jobs SET webhook_next_at = ?
                    WHERE id IN (SELECT id FROM jobs WHERE webhook_state = '{WEBHOOK_PENDING}' AND webhook_next_at <= ?
                                 ORDER BY webhook_next_at LIMIT ?)
                    RETURNING {_COLS}""",
                (lease_until, now, limit),
            ))
        return sorted((_row_to_job(row) for row in rows), key=lambda job: (job.finished_at or 0.0, job.id))

    async def webhook_attempted(
        self, job_id: str, *, delivered: bool, next_at: float | None = None, error: str | None = None
    ) -> None:
        state = WEBHOOK_DELIVERED if delivered else (WEBHOOK_PENDING if next_at is not None else WEBHOOK_FAILED)
        async with self._transaction() as conn:
            await conn.execute(
                f"""UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_state = ?, webhook_next_at = ?,
                       webhook_error = ?
                    WHERE id = ? AND webhook_state = '{WEBHOOK_PENDING}'""",
                (state, next_at if state == WEBHOOK_PENDING else None, None if delivered else error, job_id),
            )

    async def next_webhook_at(self) -> float | None:
        rows = await self._read(f"SELECT MIN(webhook_next_at) FROM jobs WHERE webhook_state = '{WEBHOOK_PENDING}'")
        return None if not rows or rows[0][0] is None else float(rows[0][0])


async def _log_events(conn: aiosqlite.Connection, job_id: str, events: Sequence[LoggedEvent]) -> None:
    """Inside a write transaction. OR IGNORE: an id logged already (a replayed append) stays; a job
    expired meanwhile gets no orphan log."""
    if events:
        await conn.executemany(
            """INSERT OR IGNORE INTO job_events (job_id, run, seq, event, data)
               SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?)""",
            [(job_id, e.id.run, e.id.seq, e.event, e.data, job_id) for e in events],
        )


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
