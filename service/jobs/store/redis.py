"""The Redis job store: several replicas share one Redis (redis-py's asyncio client).

Key layout, every key under a configurable prefix P (default `procbridge:`):

- `P job:{id}`        hash, one field per `Job` field that is not None: strings as they are, floats as
                      `repr(float)`, integers in decimal, args/progress/result/error/last_error as JSON,
                      result_bytes raw;
- `P idem:{key}`      string, the id of the job first created with that Idempotency-Key;
- `P index`           sorted set of every job id by created_at (listing newest first);
- `P status:{status}` sorted set of the ids in each status by created_at (listing by status, `counts`);
- `P task:{name}`     sorted set of the ids of each task by created_at (listing by task);
- `P ready`           sorted set of the queued jobs that are due, the claim queue: score -priority (exact for
                      any 32-bit priority), member the 16 hex digits of created_at (the big-endian bytes of
                      the double: they sort as the times do) followed by the id, so equal priorities go in
                      arrival order, then by id;
- `P delayed`         sorted set of queued ids by run_at, for jobs not due yet when queued; `claim` first moves
                      those that have come due into `ready`;
- `P leases`          sorted set of running ids by lease_until (recovery of jobs whose runner is gone);
- `P finished`        sorted set of final ids by finished_at (expiry);
- `P webhooks`        sorted set of the ids whose webhook is pending, by webhook_next_at (delivery, leases);
- `P events:{id}`     stream, the job's event log: entry id `run-seq` (the `EventId`, ordered alike), fields
                      `e` (the event) and `d` (its JSON data). Deleted with the job;
- `P layout`          string, "2": the layout above (written at `open`, after bringing older data up to it).

Atomicity: every operation that reads and then writes (create with its idempotency key, claim, retry, renew,
progress, finish/cancel, recover, expire, appending events, claiming webhooks and recording their attempts) is
one Lua script (service/jobs/store/redis_scripts.py), which Redis runs atomically, so replicas sharing the store
never claim the same job (nor the same webhook delivery within its lease), a job reaches one final state
(first writer wins), and an idempotency key maps to one job. Listing runs a script per chunk of the walked set
(at most `_LIST_SCAN` entries, so one call never blocks Redis for long) and continues from a (score, id)
cursor, exactly like `before`: jobs added between chunks sort before it and are not listed. The scripts build
keys from ids, so this store is for a standalone Redis (or a primary with replicas), not Redis Cluster.

Two approximations: `next_run_at` answers "now" (or the earliest overdue run_at of `delayed`, if earlier)
while `ready` holds a job, as it keeps no run_at order of due jobs, only that one is due; `append_events`
skips an event whose id is not above the log's last one (a stream's ids only grow), so replaying an append
after a crash is harmless, and the id 0-0, which a stream refuses, is never logged.

Durability is the server's: `create` returns once Redis has applied the script; that survives a crash of Redis
itself only with `appendonly yes` and `appendfsync always` (`open` logs a warning when appendonly is off).
Times come from the replicas' clocks, which are assumed to agree to well within a lease.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service.jobs.model import CANCELLED, FAILED, FINAL, QUEUED, STATUSES, EventId, Job, LoggedEvent
from service.jobs.store import redis_scripts as scripts
from service.jobs.store.base import JobStore, StoreUnavailable, dumps_json, loads_json
from service.jobs.store.url import DEFAULT_REDIS_PREFIX, public_url

log = logging.getLogger("procbridge.jobs")

CONNECT_TIMEOUT = 10.0  # seconds to connect to Redis


_STR_FIELDS = frozenset(
    {"id", "task", "status", "idempotency_key", "owner", "webhook", "webhook_state", "webhook_error"}
)
_FLOAT_FIELDS = frozenset(
    {"timeout", "created_at", "started_at", "finished_at", "lease_until", "run_at", "webhook_next_at"}
)
_INT_FIELDS = frozenset({"attempts", "priority", "retries", "runs", "webhook_attempts"})
_JSON_FIELDS = frozenset({"args", "progress", "result", "error", "last_error"})
_BYTES_FIELDS = frozenset({"result_bytes"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
assert _FIELDS == _STR_FIELDS | _FLOAT_FIELDS | _INT_FIELDS | _JSON_FIELDS | _BYTES_FIELDS
_EXPIRE_BATCH = 500
_LIST_SCAN = 1000  # set entries one list script looks at (a script blocks Redis while it runs)
_MIGRATE_BATCH = 1000
_STREAM_ID_MAX = 2**64 - 1  # each part of a stream entry id
LAYOUT = "2"  # `P layout`: the key layout this module writes (absent: the layout before issue 19)
_SCRIPTS = {
    "create": scripts.CREATE, "claim": scripts.CLAIM, "retry": scripts.RETRY, "renew": scripts.RENEW,
    "progress": scripts.PROGRESS, "finish": scripts.FINISH, "recover": scripts.RECOVER, "expire": scripts.EXPIRE,
    "list": scripts.LIST, "append_events": scripts.APPEND_EVENTS, "claim_webhooks": scripts.CLAIM_WEBHOOKS,
    "webhook_attempted": scripts.WEBHOOK_ATTEMPTED, "migrate": scripts.MIGRATE,
}


def _time(value: float) -> str:
    return repr(float(value))


def _encode_value(name: str, value: Any) -> str | bytes:
    if name in _FLOAT_FIELDS:
        return _time(value)
    if name in _INT_FIELDS:
        return str(int(value))
    if name in _JSON_FIELDS:
        return dumps_json(value)
    if name in _BYTES_FIELDS:
        return bytes(value)
    return str(value)


def _encode(job: Job) -> list[str | bytes]:
    """The job as HSET field/value pairs (None fields left out)."""
    pairs: list[str | bytes] = []
    for field in dataclasses.fields(Job):
        value = getattr(job, field.name)
        if value is not None:
            pairs += [field.name, _encode_value(field.name, value)]
    return pairs


def _decode(flat: Sequence[Any] | Mapping[Any, Any]) -> Job:
    """A job from HGETALL: a mapping from redis-py, a flat field/value list from a script."""
    items = flat.items() if isinstance(flat, Mapping) else zip(flat[::2], flat[1::2], strict=True)
    data: dict[str, Any] = {}
    for raw_name, raw in items:
        name = raw_name.decode()
        if name in _STR_FIELDS:
            data[name] = raw.decode()
        elif name in _FLOAT_FIELDS:
            data[name] = float(raw)
        elif name in _INT_FIELDS:
            data[name] = int(raw)
        elif name in _JSON_FIELDS:
            data[name] = loads_json(raw)
        elif name in _BYTES_FIELDS:
            data[name] = bytes(raw)
        # other fields: written by a newer version; ignored
    return Job(**data)


class RedisJobStore(JobStore):
    shared = True  # the point of Redis here: several replicas share one store

    def __init__(self, url: str, *, prefix: str = DEFAULT_REDIS_PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RedisJobStore({public_url(self.url)!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        if self._client is not None:
            return
        # A host that drops packets would otherwise hold start-up for the OS's connect timeout (minutes);
        # a connect timeout given in the URL wins (redis-py lets URL options override these).
        client = aioredis.Redis.from_url(self.url, decode_responses=False, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            await client.ping()
            try:
                config: dict[Any, Any] = await client.config_get("appendonly")
                if config.get(b"appendonly", config.get("appendonly")) in (b"no", "no"):
                    log.warning("Redis at %s runs without appendonly: accepted jobs do not survive a Redis crash",
                                public_url(self.url))
            except ResponseError:  # CONFIG may be disabled (managed Redis): nothing to check
                pass
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailable(f"--store: cannot use Redis at {public_url(self.url)}: {exc}") from None
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = {name: client.register_script(source) for name, source in _SCRIPTS.items()}
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        """Bring data written before this layout up to it (once: `P layout` records it is done). Idempotent,
        so replicas starting together may all run it."""
        redis = self._redis()
        layout = await redis.get(self._key("layout"))
        if layout is not None and int(layout) > int(LAYOUT):
            raise RuntimeError(f"{self!r} holds jobs of a newer procbridge (layout {int(layout)} > {LAYOUT})")
        if layout is not None:
            return
        start, now = 0, _time(time.time())
        while int(await self._run("migrate", now, str(start), str(_MIGRATE_BATCH))) == _MIGRATE_BATCH:
            start += _MIGRATE_BATCH
        await redis.set(self._key("layout"), LAYOUT)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            await client.aclose()

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._client

    async def _run(self, script: str, *args: str | bytes) -> Any:
        self._redis()
        return await self._scripts[script](keys=[], args=[self.prefix, *args])

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    # -- JobStore ----------------------------------------------------------------------------------

    async def create(self, job: Job) -> tuple[Job, bool]:
        if job.status != QUEUED:
            raise ValueError(f"a new job must be {QUEUED}, not {job.status}")
        job = dataclasses.replace(job, run_at=job.created_at if job.run_at is None else job.run_at)
        assert job.run_at is not None
        reply = await self._run(
            "create", job.id, "0" if job.idempotency_key is None else "1" + job.idempotency_key,
            _time(job.created_at), _time(job.run_at), _time(time.time()), job.task, str(int(job.priority)),
            *_encode(job),
        )
        if int(reply[0]) == 0:
            return _decode(reply[1]), False
        return job, True

    async def get(self, job_id: str) -> Job | None:
        data = await self._redis().hgetall(self._key("job:", job_id))
        return _decode(data) if data else None

    async def list(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> builtins.list[Job]:
        if limit <= 0 or (status is not None and status not in STATUSES):
            return []
        if task is not None:  # the task's set, filtered by status in the script
            key, want = f"task:{task}", status or ""
        else:
            key, want = ("index", "") if status is None else (f"status:{status}", "")
        score: str | bytes = "+inf" if before is None else _time(before[0])
        cursor: str | bytes = "0" if before is None else "1" + before[1]
        found: builtins.list[Job] = []
        while True:
            rows, score, cursor, done = await self._run(
                "list", key, want, score, cursor, str(int(limit) - len(found)), str(_LIST_SCAN)
            )
            found += [_decode(row) for row in rows]
            if int(done) or len(found) >= limit:
                return found

    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        now = time.time()
        reply = await self._run("claim", owner, _time(now + lease_seconds), _time(now))
        return _decode(reply) if reply else None

    async def next_run_at(self) -> float | None:
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.zcard(self._key("ready"))
            pipe.zrange(self._key("delayed"), 0, 0, withscores=True)
            ready, delayed = await pipe.execute()
        earliest = float(delayed[0][1]) if delayed else None
        if int(ready):  # a job is due: "now" stands for its run_at (`ready` keeps no run_at order)
            return time.time() if earliest is None else min(earliest, time.time())
        return earliest

    async def retry(self, job_id: str, owner: str, run_at: float, error: dict[str, Any]) -> bool:
        reply = await self._run(
            "retry", job_id, owner, _time(run_at), _time(time.time()), _encode_value("last_error", error)
        )
        return int(reply) == 1

    async def renew(self, owner: str, job_ids: builtins.list[str], lease_seconds: float) -> None:
        if job_ids:
            await self._run("renew", owner, _time(time.time() + lease_seconds), *job_ids)

    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        await self._run("progress", job_id, dumps_json(progress))

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
        if events:  # before the final state: a listener that sees it final finds the whole log
            await self.append_events(job_id, builtins.list(events))
        fields: builtins.list[str | bytes] = []
        for name, value in (("result", result), ("result_bytes", result_bytes), ("error", error)):
            if value is not None:
                fields += [name, _encode_value(name, value)]
        if status == FAILED and error is not None:
            fields += ["last_error", _encode_value("last_error", error)]
        reply = await self._run(
            "finish", job_id, status, _time(time.time()), "0", "1" if status == FAILED else "0", *fields
        )
        return bool(reply) and int(reply[0]) == 1

    async def cancel(self, job_id: str, error: dict[str, Any]) -> Job | None:
        reply = await self._run(
            "finish", job_id, CANCELLED, _time(time.time()), "1", "0", "error", _encode_value("error", error)
        )
        return _decode(reply[1]) if reply else None

    async def recover(self, *, owner_gone: bool = False) -> int:
        return int(await self._run("recover", _time(time.time()), "1" if owner_gone else "0"))

    async def expire(self, finished_before: float) -> int:
        total = offset = 0
        while True:  # jobs whose webhook is pending stay in `finished`: later batches start after them
            removed, seen, kept = await self._run("expire", _time(finished_before), str(_EXPIRE_BATCH), str(offset))
            total += int(removed)
            offset += int(kept)
            if int(seen) < _EXPIRE_BATCH:
                return total

    async def counts(self) -> dict[str, int]:
        async with self._redis().pipeline(transaction=True) as pipe:
            for status in STATUSES:
                pipe.zcard(self._key("status:", status))
            values = await pipe.execute()
        return {status: int(n) for status, n in zip(STATUSES, values, strict=True)}

    # -- the event log -----------------------------------------------------------------------------

    async def append_events(self, job_id: str, events: builtins.list[LoggedEvent]) -> None:
        if not events:
            return
        args: builtins.list[str | bytes] = []
        for event in events:
            if not (0 <= event.id.run <= _STREAM_ID_MAX and 0 <= event.id.seq <= _STREAM_ID_MAX):
                raise ValueError(f"event id {event.id} out of range (each part 0 to 2**64-1)")
            args += [str(event.id.run), str(event.id.seq), event.event, bytes(event.data)]
        await self._run("append_events", job_id, *args)

    async def events(self, job_id: str, after: EventId | None = None) -> builtins.list[LoggedEvent]:
        start = "-"  # the first id above `after` (XRANGE's exclusive "(" start needs Redis 6.2)
        if after is not None:
            run, seq = (after.run, after.seq + 1) if after.seq < _STREAM_ID_MAX else (after.run + 1, 0)
            if run > _STREAM_ID_MAX:
                return []  # above every id a stream can hold
            start = f"{run}-{seq}"
        rows: Any = await self._redis().xrange(self._key("events:", job_id), min=start, max="+")
        return [
            LoggedEvent(EventId.parse(entry_id.decode()), fields[b"e"].decode(), bytes(fields[b"d"]))
            for entry_id, fields in rows
        ]

    # -- webhook deliveries ------------------------------------------------------------------------

    async def claim_webhooks(self, now: float, lease_until: float, limit: int) -> builtins.list[Job]:
        if limit <= 0:
            return []
        rows = await self._run("claim_webhooks", _time(now), _time(lease_until), str(int(limit)))
        return [_decode(row) for row in rows]

    async def webhook_attempted(
        self, job_id: str, *, delivered: bool, next_at: float | None = None, error: str | None = None
    ) -> None:
        await self._run(
            "webhook_attempted", job_id, "1" if delivered else "0", "" if next_at is None else _time(next_at),
            "0" if error is None else "1" + error,
        )

    async def next_webhook_at(self) -> float | None:
        head = await self._redis().zrange(self._key("webhooks"), 0, 0, withscores=True)
        return float(head[0][1]) if head else None
