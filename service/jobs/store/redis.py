"""The Redis job store: several replicas share one Redis (redis-py's asyncio client).

Key layout, every key under a configurable prefix P (default `procbridge:`):

- `P job:{id}`        hash, one field per `Job` field that is not None: strings as they are, floats as
                      `repr(float)`, attempts as an integer, args/progress/result/error as JSON, result_bytes raw;
- `P idem:{key}`      string, the id of the job first created with that Idempotency-Key;
- `P index`           sorted set of every job id by created_at (listing newest first);
- `P status:{status}` sorted set of the ids in each status by created_at: `status:queued` is the queue
                      (claimed from the lowest score: arrival order; ties by id, as in SQLite), the others serve
                      listing by status and `counts`;
- `P leases`          sorted set of running ids by lease_until (recovery of jobs whose runner is gone);
- `P finished`        sorted set of final ids by finished_at (expiry).

Atomicity: every operation that reads and then writes (create with its idempotency key, claim, renew,
progress, finish/cancel, recover, expire) is one Lua script, which Redis runs atomically, so replicas sharing
the store never claim the same job, a job reaches one final state (first writer wins), and an idempotency key
maps to one job. Listing is a script too, for a consistent snapshot. The scripts build job keys from ids, so
this store is for a standalone Redis (or a primary with replicas), not Redis Cluster.

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

from service.jobs.model import CANCELLED, FINAL, QUEUED, STATUSES, Job
from service.jobs.store.base import JobStore, StoreUnavailable, dumps_json, loads_json
from service.jobs.store.url import DEFAULT_REDIS_PREFIX, public_url

log = logging.getLogger("procbridge.jobs")

CONNECT_TIMEOUT = 10.0  # seconds to connect to Redis


_STR_FIELDS = frozenset({"id", "task", "status", "idempotency_key", "owner"})
_FLOAT_FIELDS = frozenset({"timeout", "created_at", "started_at", "finished_at", "lease_until"})
_INT_FIELDS = frozenset({"attempts"})
_JSON_FIELDS = frozenset({"args", "progress", "result", "error"})
_BYTES_FIELDS = frozenset({"result_bytes"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))
assert _FIELDS == _STR_FIELDS | _FLOAT_FIELDS | _INT_FIELDS | _JSON_FIELDS | _BYTES_FIELDS
_EXPIRE_BATCH = 500

# ARGV[1] is always the prefix. Missing hash fields read as false in Lua.
_CREATE = """
local p, id, created = ARGV[1], ARGV[2], ARGV[4]
local keyed, idem = string.sub(ARGV[3], 1, 1) == '1', string.sub(ARGV[3], 2)
local jk = p .. 'job:' .. id
if keyed then
  local first = redis.call('GET', p .. 'idem:' .. idem)
  if first then
    local existing = redis.call('HGETALL', p .. 'job:' .. first)
    if #existing > 0 then return {0, existing} end
  end
end
if redis.call('EXISTS', jk) == 1 then return redis.error_reply('job ' .. id .. ' exists already') end
if keyed then redis.call('SET', p .. 'idem:' .. idem, id) end
redis.call('HSET', jk, unpack(ARGV, 5))
redis.call('ZADD', p .. 'index', created, id)
redis.call('ZADD', p .. 'status:queued', created, id)
return {1}
"""

_CLAIM = """
local p, owner, lease, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queue = p .. 'status:queued'
while true do
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  if #head == 0 then return false end
  local id, created = head[1], head[2]
  redis.call('ZREM', queue, id)
  local jk = p .. 'job:' .. id
  if redis.call('HGET', jk, 'status') == 'queued' then
    redis.call('HSET', jk, 'status', 'running', 'owner', owner, 'lease_until', lease, 'started_at', now)
    redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('ZADD', p .. 'status:running', created, id)
    redis.call('ZADD', p .. 'leases', lease, id)
    return redis.call('HGETALL', jk)
  end
end
"""

_RENEW = """
local p, owner, lease = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'owner')
  if v[1] == 'running' and v[2] == owner then
    redis.call('HSET', jk, 'lease_until', lease)
    redis.call('ZADD', p .. 'leases', lease, id)
    n = n + 1
  end
end
return n
"""

_PROGRESS = """
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('HGET', jk, 'status') == 'running' then
  redis.call('HSET', jk, 'progress', ARGV[3])
  return 1
end
return 0
"""

# ARGV: prefix, id, final status, finished_at, '1' to return the job, then field/value pairs to set.
_FINISH = """
local p, id, status, fin = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. 'job:' .. id
local current = redis.call('HGET', jk, 'status')
if not current then return false end
local changed = 0
if current == 'queued' or current == 'running' then
  local created = redis.call('HGET', jk, 'created_at')
  redis.call('ZREM', p .. 'status:' .. current, id)
  redis.call('ZREM', p .. 'leases', id)
  redis.call('HDEL', jk, 'lease_until')
  redis.call('HSET', jk, 'status', status, 'finished_at', fin)
  if #ARGV >= 6 then redis.call('HSET', jk, unpack(ARGV, 6)) end
  redis.call('ZADD', p .. 'status:' .. status, created, id)
  redis.call('ZADD', p .. 'finished', fin, id)
  changed = 1
end
if ARGV[5] == '1' then return {changed, redis.call('HGETALL', jk)} end
return {changed}
"""

_RECOVER = """
local p, now, all = ARGV[1], ARGV[2], ARGV[3]
local ids
if all == '1' then
  ids = redis.call('ZRANGE', p .. 'status:running', 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', '(' .. now)
end
local n = 0
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  if redis.call('HGET', jk, 'status') == 'running' then
    local created = redis.call('HGET', jk, 'created_at')
    redis.call('HSET', jk, 'status', 'queued')
    redis.call('HDEL', jk, 'owner', 'lease_until', 'progress')
    redis.call('ZREM', p .. 'status:running', id)
    redis.call('ZADD', p .. 'status:queued', created, id)
    n = n + 1
  end
  redis.call('ZREM', p .. 'leases', id)
end
return n
"""

_EXPIRE = """
local p, before, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', p .. 'finished', '-inf', '(' .. before, 'LIMIT', 0, batch)
local n = 0
for _, id in ipairs(ids) do
  local jk = p .. 'job:' .. id
  local v = redis.call('HMGET', jk, 'status', 'idempotency_key')
  if v[1] == 'succeeded' or v[1] == 'failed' or v[1] == 'cancelled' then
    if v[2] then
      local ik = p .. 'idem:' .. v[2]
      if redis.call('GET', ik) == id then redis.call('DEL', ik) end
    end
    redis.call('DEL', jk)
    redis.call('ZREM', p .. 'status:' .. v[1], id)
    redis.call('ZREM', p .. 'index', id)
    n = n + 1
  end
  redis.call('ZREM', p .. 'finished', id)
end
return {n, #ids}
"""

_LIST = """
local p, key, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call('ZREVRANGE', p .. key, 0, limit - 1)
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HGETALL', p .. 'job:' .. id)
  if #h > 0 then out[#out + 1] = h end
end
return out
"""


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
        for name, source in (
            ("create", _CREATE), ("claim", _CLAIM), ("renew", _RENEW), ("progress", _PROGRESS),
            ("finish", _FINISH), ("recover", _RECOVER), ("expire", _EXPIRE), ("list", _LIST),
        ):
            self._scripts[name] = client.register_script(source)

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
        reply = await self._run(
            "create", job.id, "0" if job.idempotency_key is None else "1" + job.idempotency_key,
            _time(job.created_at), *_encode(job),
        )
        if int(reply[0]) == 0:
            return _decode(reply[1]), False
        return dataclasses.replace(job), True

    async def get(self, job_id: str) -> Job | None:
        data = await self._redis().hgetall(self._key("job:", job_id))
        return _decode(data) if data else None

    async def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        if limit <= 0:
            return []
        if status is not None and status not in STATUSES:
            return []
        key = "index" if status is None else f"status:{status}"
        rows = await self._run("list", key, str(int(limit)))
        return [_decode(row) for row in rows]

    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        now = time.time()
        reply = await self._run("claim", owner, _time(now + lease_seconds), _time(now))
        return _decode(reply) if reply else None

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
    ) -> bool:
        if status not in FINAL:
            raise ValueError(f"{status!r} is not a final status")
        fields: list[str | bytes] = []
        for name, value in (("result", result), ("result_bytes", result_bytes), ("error", error)):
            if value is not None:
                fields += [name, _encode_value(name, value)]
        reply = await self._run("finish", job_id, status, _time(time.time()), "0", *fields)
        return bool(reply) and int(reply[0]) == 1

    async def cancel(self, job_id: str, error: dict[str, Any]) -> Job | None:
        reply = await self._run(
            "finish", job_id, CANCELLED, _time(time.time()), "1", "error", _encode_value("error", error)
        )
        return _decode(reply[1]) if reply else None

    async def recover(self, *, owner_gone: bool = False) -> int:
        return int(await self._run("recover", _time(time.time()), "1" if owner_gone else "0"))

    async def expire(self, finished_before: float) -> int:
        total = 0
        while True:
            removed, seen = await self._run("expire", _time(finished_before), str(_EXPIRE_BATCH))
            total += int(removed)
            if int(seen) < _EXPIRE_BATCH:
                return total

    async def counts(self) -> dict[str, int]:
        async with self._redis().pipeline(transaction=True) as pipe:
            for status in STATUSES:
                pipe.zcard(self._key("status:", status))
            values = await pipe.execute()
        return {status: int(n) for status, n in zip(STATUSES, values, strict=True)}
