"""The one table of settings: every flag, its environment variable, how its text is read, its default
and its help, written once.

Everything else is made from this table: the `argparse` parser and `load()` (service/config.py), the
`Config` dataclass's defaults, `procbridge serve --help`, and the settings tables in README.md and
docs/api.md (service/settings_docs.py writes them; a test fails when they differ). To add a setting,
add a row here and a typed field of the same name to `Config`; then run
`python -m service.settings_docs --write` to refresh the docs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service import converters as c
from workers.cpus import available_cpus


@dataclass(frozen=True)
class Derived:
    """A default computed when a Config is built, from the machine or from settings above it in the
    table (`values` holds those, by name); `text` is how --help and the docs show it."""

    text: str
    compute: Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Setting:
    """One row. `help` is markdown (backticks, links): the docs show it as written, --help as plain text.

    `default` is the value the Config gets when neither the flag nor the variable is set: a constant
    (None or an empty tuple mean "off"), or a `Derived`. `shown` is how a constant default is written
    where it differs from str(default); the tests parse it with `parse` and compare, so it cannot drift.
    """

    flag: str
    env: str
    parse: Callable[[str], Any]  # text -> value; ValueError with a sentence a user can act on
    default: Any
    help: str
    shown: str | None = None
    secret: bool = False  # a bad value is reported without its text (API keys must not reach a log)
    switch: bool = False  # a flag that takes no value (--debug); its variable takes true/false

    @property
    def name(self) -> str:
        """The Config attribute: --max-body -> max_body."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def is_constant(self) -> bool:
        """The default is a value the flag could be given (not derived, not None or empty: "off")."""
        return not isinstance(self.default, Derived) and self.default not in (None, ())

    @property
    def default_text(self) -> str:
        """The default as --help and the docs show it ("" for a setting that is simply off)."""
        if isinstance(self.default, Derived):
            return self.default.text
        if self.shown is not None:
            return self.shown
        return str(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting("--host", "PROCBRIDGE_HOST", c.host, "127.0.0.1",
            "bind address (a warning is logged when bound elsewhere without API keys)"),
    Setting("--port", "PROCBRIDGE_PORT", c.port, 8080, "TCP port"),
    Setting("--workers", "PROCBRIDGE_WORKERS", c.workers,
            Derived("CPUs this process may use", lambda _: available_cpus()),
            "worker processes: `N`, or `MIN..MAX` (e.g. `1..8`) for a pool that starts MIN, grows while calls "
            "wait and shrinks when idle ([docs/architecture.md](docs/architecture.md), \"An elastic pool\"); by "
            "default one per CPU of the affinity mask, capped by a cgroup CPU quota. Defaults derived from it "
            "use MAX"),
    Setting("--worker-idle", "PROCBRIDGE_WORKER_IDLE", c.seconds, 60.0,
            "with `--workers MIN..MAX`: seconds a worker goes without work before it is stopped, while more "
            "than MIN run", shown="60"),
    Setting("--max-pending", "PROCBRIDGE_MAX_PENDING", c.positive_int,
            Derived("4 × workers", lambda v: 4 * v["workers"]),
            "calls waiting for a worker (or a `@task(concurrency=)` slot); beyond it 503 `overloaded`"),
    Setting("--task-timeout", "PROCBRIDGE_TASK_TIMEOUT", c.seconds, 60.0,
            "seconds a task may run before its worker is killed (`?timeout=` per call; a task's own "
            "`@task(timeout=)` replaces it)", shown="60"),
    Setting("--max-body", "PROCBRIDGE_MAX_BODY", c.positive_size, 64 * c.MIB,
            "request body limit in bytes (units allowed: `1MiB`, `500KB`)", shown="64 MiB"),
    Setting("--tasks", "PROCBRIDGE_TASKS", c.modules, (), "comma-separated modules with user tasks",
            shown="none: the built-ins only"),
    Setting("--store", "PROCBRIDGE_STORE", c.store, "./procbridge.db",
            "job store: a SQLite file, or `redis://host:port/db` (several replicas share it; `?prefix=` sets "
            "the key prefix)"),
    Setting("--executor", "PROCBRIDGE_EXECUTOR", c.executor, "local",
            "`local`, or `dask://HOST:PORT[?isolate=process|thread]`: run tasks on a Dask cluster "
            "([docs/dask.md](docs/dask.md))"),
    Setting("--api-keys", "PROCBRIDGE_API_KEYS", c.api_keys, (),
            "comma-separated keys or `@FILE` (one per line, `#` comments): every `/v1/` request then needs "
            "`Authorization: Bearer <key>` (401 otherwise); `/healthz`, `/readyz`, `/metrics`, `/openapi.json` "
            "and the dashboard's page stay open ([docs/security.md](docs/security.md))", shown="no auth", secret=True),
    Setting("--http-processes", "PROCBRIDGE_HTTP_PROCESSES", c.positive_int, 1,
            "serving processes, each with its own event loop, accepting on the one port; every worker "
            "serves all of them (docs/architecture.md, \"Several serving processes\")"),
    Setting("--cors-origins", "PROCBRIDGE_CORS_ORIGINS", c.cors_origins, (),
            "comma-separated origins whose pages may call the API from a browser (`https://app.example.com`); "
            "`*`: any origin, no credentials (cookies are never used: pages send the API key themselves). "
            "Preflights are answered without a key ([docs/api.md](docs/api.md#cors))",
            shown="none: no CORS headers"),
    Setting("--rate-limit", "PROCBRIDGE_RATE_LIMIT", c.parse_rate, None,
            "requests per key (per client address without keys), e.g. `20/s`, `600/min`, `1000/h`, `5/10s`: "
            "a token bucket; beyond it 429 `rate-limited` with `Retry-After`", shown="none"),
    Setting("--shutdown-grace", "PROCBRIDGE_SHUTDOWN_GRACE", c.seconds_or_zero, 25.0,
            "seconds in-flight calls may finish after SIGTERM", shown="25"),
    Setting("--worker-start-timeout", "PROCBRIDGE_WORKER_START_TIMEOUT", c.seconds, 60.0,
            "seconds the task modules and `@preload` hooks may take to load at start-up (past it the start "
            "fails, exit 1), and each worker to get ready (past it the worker is stopped and started again with "
            "the crash back-off)", shown="60"),
    Setting("--max-tasks-per-worker", "PROCBRIDGE_MAX_TASKS_PER_WORKER", c.non_negative_int, 0,
            "replace a worker after this many tasks; `0`: never"),
    Setting("--max-worker-memory", "PROCBRIDGE_MAX_WORKER_MEMORY", c.size, 0,
            "replace a worker whose RSS passes this (e.g. `512MiB`); `0`: never"),
    Setting("--cancel-running-on-disconnect", "PROCBRIDGE_CANCEL_RUNNING_ON_DISCONNECT", c.boolean, False,
            "kill a running task when its client hangs up", shown="off", switch=True),
    Setting("--worker-nice", "PROCBRIDGE_WORKER_NICE", c.nice, 10,
            "workers' nice increment (0 to 19), so the event loop wins the CPU"),
    Setting("--job-concurrency", "PROCBRIDGE_JOB_CONCURRENCY", c.positive_int,
            Derived("half the workers (≥ 1)", lambda v: max(1, (v["workers"] + 1) // 2)),
            "async jobs running at once, so synchronous calls keep their share of the workers"),
    Setting("--job-ttl", "PROCBRIDGE_JOB_TTL", c.duration, 86400.0,
            "finished jobs are deleted this long after they end (`90m`, `3600`, `7d`)", shown="24h"),
    Setting("--job-lease", "PROCBRIDGE_JOB_LEASE", c.lease, 30.0,
            "a running job's lease, renewed every 0.5 s (at least 2 s): with Redis, how long a dead replica's "
            "running jobs wait before another replica runs them again", shown="30s"),
    Setting("--retry-backoff", "PROCBRIDGE_RETRY_BACKOFF", c.backoff, 1.0,
            "seconds before the first retry of a failed job attempt (`@task(retries=)`, a job's `retries`); "
            "each further retry doubles it, at most 5 minutes, each with jitter", shown="1"),
    Setting("--webhook-allow", "PROCBRIDGE_WEBHOOK_ALLOW", c.webhook_allow, (),
            "comma-separated `host[:port]` patterns a job's `webhook` may call: `*.example.com`, "
            "`hooks.internal:8443`, `10.0.*:*`, `[::1]:9000`; no port: the scheme's default only "
            "([docs/api.md](docs/api.md#webhooks))",
            shown="none: webhooks refused (422)"),
    Setting("--webhook-secret", "PROCBRIDGE_WEBHOOK_SECRET", c.secret, None,
            "HMAC-SHA256 key of `X-Procbridge-Signature`, or `@FILE` (its first line); at least 16 visible ASCII "
            "characters", shown="none: unsigned, with a warning at start-up", secret=True),
    Setting("--webhook-timeout", "PROCBRIDGE_WEBHOOK_TIMEOUT", c.seconds, 10.0,
            "seconds one webhook delivery attempt may take (connect and answer)", shown="10"),
    Setting("--max-map-items", "PROCBRIDGE_MAX_MAP_ITEMS", c.positive_int, 100_000,
            "items in one map request; beyond it 413"),
    Setting("--shm-threshold", "PROCBRIDGE_SHM_THRESHOLD", c.size, 256 * 1024,
            "binary payloads (bodies, bytes results) larger than this travel through shared memory; smaller "
            "ones inline", shown="256KiB"),
    Setting("--shm-budget", "PROCBRIDGE_SHM_BUDGET", c.size, None,
            "most bytes of `/dev/shm` payload segments may use; beyond it, the pipe. `0` turns shared memory off",
            shown="3/4 of `/dev/shm`'s free space at start-up"),
    Setting("--log-level", "PROCBRIDGE_LOG_LEVEL", c.log_level, "info", "`debug`, `info`, `warning` or `error`"),
    Setting("--debug", "PROCBRIDGE_DEBUG", c.boolean, False,
            "include tracebacks in `task-failed` problems", shown="off", switch=True),
    Setting("--access-log", "PROCBRIDGE_ACCESS_LOG", c.access_log, "-",
            "JSON access log, one line per response (and an audit line per refused key): `-` (stdout), `off`, "
            "or a file to append to; diagnostics stay on stderr"),
)

BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


class _Derive:
    """The placeholder a `Config` field holds until `__post_init__` computes its `Derived` default."""

    def __repr__(self) -> str:
        return "<derived>"


DERIVE: Any = _Derive()


def field_default(name: str) -> Any:
    """The dataclass default of Config's field `name`: the table's constant, or `DERIVE`."""
    default = BY_NAME[name].default
    return DERIVE if isinstance(default, Derived) else default
