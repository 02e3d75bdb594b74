"""One Config, built once from flags and environment variables (flags win), validated up front.

No other module reads the environment: `Config` is passed down to whatever needs a setting.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A flag or environment variable has a value the service cannot run with."""


@dataclass(frozen=True)
class RateLimit:
    requests: float
    per_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.per_seconds


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_pending: int = 0  # 0: four per worker (what `load` also gives when the flag is unset)
    task_timeout: float = 60.0
    max_body: int = 64 * MIB
    tasks: tuple[str, ...] = ()
    store: str = "./procbridge.db"
    executor: str = "local"
    api_keys: tuple[str, ...] = ()
    rate_limit: RateLimit | None = None
    shutdown_grace: float = 25.0
    max_tasks_per_worker: int = 0
    max_worker_memory: int = 0
    cancel_running_on_disconnect: bool = False
    worker_nice: int = 10
    job_concurrency: int = 1
    job_ttl: float = 86400.0
    job_lease: float = 30.0
    max_map_items: int = 100_000
    shm_threshold: int = 256 * 1024
    shm_budget: int | None = None  # None: 3/4 of what /dev/shm has free at start-up; 0: off
    log_level: str = "info"
    debug: bool = False
    access_log: str = "-"  # "-": stdout, "off", or a file path (appended to)

    def __post_init__(self) -> None:
        if self.max_pending == 0:
            object.__setattr__(self, "max_pending", 4 * self.workers)


# (flag, env var, dest, help). Defaults that depend on the machine are filled in by `load`.
_OPTIONS: list[tuple[str, str, str, str]] = [
    ("--host", "PROCBRIDGE_HOST", "host", "bind address [127.0.0.1]"),
    ("--port", "PROCBRIDGE_PORT", "port", "TCP port [8080]"),
    ("--workers", "PROCBRIDGE_WORKERS", "workers", "worker processes [CPUs this process may use]"),
    ("--max-pending", "PROCBRIDGE_MAX_PENDING", "max_pending", "tasks waiting for a worker before 503 [4 x workers]"),
    ("--task-timeout", "PROCBRIDGE_TASK_TIMEOUT", "task_timeout", "seconds a task may run [60]"),
    ("--max-body", "PROCBRIDGE_MAX_BODY", "max_body", "request body limit in bytes [64 MiB]"),
    ("--tasks", "PROCBRIDGE_TASKS", "tasks", "comma-separated modules with user tasks"),
    ("--store", "PROCBRIDGE_STORE", "store", "job store: SQLite path or redis://... [./procbridge.db]"),
    ("--executor", "PROCBRIDGE_EXECUTOR", "executor", "local or dask://HOST:PORT[?isolate=process|thread] [local]"),
    ("--api-keys", "PROCBRIDGE_API_KEYS", "api_keys", "comma-separated keys or @FILE [no auth]"),
    ("--rate-limit", "PROCBRIDGE_RATE_LIMIT", "rate_limit", "requests per key or client, e.g. 20/s [none]"),
    ("--shutdown-grace", "PROCBRIDGE_SHUTDOWN_GRACE", "shutdown_grace", "seconds in-flight work may finish [25]"),
    ("--max-tasks-per-worker", "PROCBRIDGE_MAX_TASKS_PER_WORKER", "max_tasks_per_worker",
     "replace a worker after this many tasks [0: never]"),
    ("--max-worker-memory", "PROCBRIDGE_MAX_WORKER_MEMORY", "max_worker_memory",
     "replace a worker whose RSS passes this, e.g. 512MiB [0: never]"),
    ("--cancel-running-on-disconnect", "PROCBRIDGE_CANCEL_RUNNING_ON_DISCONNECT",
     "cancel_running_on_disconnect", "kill a running task when its client hangs up [false]"),
    ("--worker-nice", "PROCBRIDGE_WORKER_NICE", "worker_nice", "nice increment of workers [10]"),
    ("--job-concurrency", "PROCBRIDGE_JOB_CONCURRENCY", "job_concurrency",
     "async jobs run at once, so synchronous calls keep their share [half the workers, at least 1]"),
    ("--job-ttl", "PROCBRIDGE_JOB_TTL", "job_ttl", "keep finished jobs this long, e.g. 3600, 90m, 24h [24h]"),
    ("--job-lease", "PROCBRIDGE_JOB_LEASE", "job_lease",
     "a running job's lease: with Redis, how long the job of a dead replica waits to run again [30s]"),
    ("--max-map-items", "PROCBRIDGE_MAX_MAP_ITEMS", "max_map_items", "items in one map request, beyond: 413 [100000]"),
    ("--shm-threshold", "PROCBRIDGE_SHM_THRESHOLD", "shm_threshold",
     "binary payloads larger than this go through shared memory, e.g. 1MiB [256KiB]"),
    ("--shm-budget", "PROCBRIDGE_SHM_BUDGET", "shm_budget",
     "bytes of /dev/shm payloads may use; 0: off [3/4 of what /dev/shm has free at start-up]"),
    ("--log-level", "PROCBRIDGE_LOG_LEVEL", "log_level", "debug, info, warning or error [info]"),
    ("--debug", "PROCBRIDGE_DEBUG", "debug", "include tracebacks in task-failed problems [false]"),
    ("--access-log", "PROCBRIDGE_ACCESS_LOG", "access_log",
     "JSON access log: - (stdout), off, or a file to append to [-]"),
]
# Settings whose values are secrets: a bad one is reported without its value (keys must not reach a log).
_SECRETS = {"api_keys"}
_FLAGS = {"cancel_running_on_disconnect", "debug"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="procbridge serve",
        description="Serve registered Python tasks over HTTP on a supervised process pool. "
        "Every flag also reads an environment variable (shown in brackets after it); flags win.",
    )
    for flag, env, dest, text in _OPTIONS:
        if dest in _FLAGS:
            p.add_argument(flag, dest=dest, action="store_const", const="true", help=f"{text} (${env})")
        else:
            p.add_argument(flag, dest=dest, metavar=dest.upper(), help=f"{text} (${env})")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from argv and env; raise ConfigError naming the bad flag or variable."""
    env = os.environ if env is None else env
    args = vars(parser().parse_args(list(argv or [])))
    raw: dict[str, tuple[str, str]] = {}  # dest -> (value, where it came from)
    for flag, var, dest, _ in _OPTIONS:
        if args.get(dest) is not None:
            raw[dest] = (args[dest], flag)
        elif env.get(var, "") != "":
            raw[dest] = (env[var], var)

    def get(dest: str, convert: Any, default: Any) -> Any:
        if dest not in raw:
            return default
        value, where = raw[dest]
        try:
            return convert(value.strip())
        except (ValueError, OSError) as exc:
            shown = "<not shown>" if dest in _SECRETS and not value.strip().startswith("@") else repr(value)
            raise ConfigError(f"{where}={shown}: {exc}") from None

    workers = get("workers", _positive_int, None) or available_cpus()
    # 0 is refused rather than passed on: the pool would read it as "the default" (4 x workers).
    max_pending = get("max_pending", _positive_int, 4 * workers)
    return Config(
        host=get("host", _host, "127.0.0.1"),
        port=get("port", _port, 8080),
        workers=workers,
        max_pending=max_pending,
        task_timeout=get("task_timeout", _positive_float, 60.0),
        max_body=get("max_body", _positive_size, 64 * MIB),
        tasks=get("tasks", _modules, ()),
        store=get("store", _store, "./procbridge.db"),
        executor=get("executor", _executor, "local"),
        api_keys=get("api_keys", _api_keys, ()),
        rate_limit=get("rate_limit", parse_rate, None),
        shutdown_grace=get("shutdown_grace", _non_negative_float, 25.0),
        max_tasks_per_worker=get("max_tasks_per_worker", _non_negative_int, 0),
        max_worker_memory=get("max_worker_memory", _size, 0),
        cancel_running_on_disconnect=get("cancel_running_on_disconnect", _bool, False),
        worker_nice=get("worker_nice", _nice, 10),
        job_concurrency=get("job_concurrency", _positive_int, max(1, (workers + 1) // 2)),
        job_ttl=get("job_ttl", _duration, 86400.0),
        job_lease=get("job_lease", _lease, 30.0),
        max_map_items=get("max_map_items", _positive_int, 100_000),
        shm_threshold=get("shm_threshold", _size, 256 * 1024),
        shm_budget=get("shm_budget", _size, None),
        log_level=get("log_level", _log_level, "info"),
        debug=get("debug", _bool, False),
        access_log=get("access_log", _access_log, "-"),
    )


# -- converters: each raises ValueError with a message a user can act on ---------------------------


def _int(s: str, requirement: str) -> int:
    """int(s), or ValueError(requirement) instead of Python's "invalid literal for int()"."""
    try:
        return int(s)
    except ValueError:
        raise ValueError(requirement) from None


def _float(s: str, requirement: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise ValueError(requirement) from None


def _positive_int(s: str) -> int:
    n = _int(s, "must be a whole number ≥ 1")
    if n < 1:
        raise ValueError("must be a whole number ≥ 1")
    return n


def _non_negative_int(s: str) -> int:
    n = _int(s, "must be a whole number ≥ 0")
    if n < 0:
        raise ValueError("must be a whole number ≥ 0")
    return n


def _positive_float(s: str) -> float:
    x = _float(s, "must be a number of seconds > 0")
    if not math.isfinite(x) or x <= 0:
        raise ValueError("must be a number of seconds > 0")
    return x


def _non_negative_float(s: str) -> float:
    x = _float(s, "must be a number of seconds ≥ 0")
    if not math.isfinite(x) or x < 0:
        raise ValueError("must be a number of seconds ≥ 0")
    return x


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", s.lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError("must be a duration > 0 in seconds, or with a unit: 90s, 30m, 24h, 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _lease(s: str) -> float:
    """A lease renewed every 0.5 s (service/job_runner.py): under 2 s, a loop stalled for a moment
    would lose it and the job would run twice."""
    x = _duration(s)
    if x < 2:
        raise ValueError("must be a duration of at least 2 s (e.g. 30s, 2m)")
    return x


def _port(s: str) -> int:
    n = _int(s, "must be a port number from 0 to 65535")
    if not 0 <= n <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return n


def _host(s: str) -> str:
    if not s or any(c.isspace() for c in s):
        raise ValueError("must be a host name or IP address")
    return s


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MIB,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def _size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", s)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("must be a size in bytes, optionally with a unit (KiB, MiB, GiB, KB, MB, GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _positive_size(s: str) -> int:
    n = _size(s)
    if n < 1:
        raise ValueError("must be at least 1 byte")
    return n


def _modules(s: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in s.split(",") if part.strip())
    for name in names:
        if not all(piece.isidentifier() for piece in name.split(".")):
            raise ValueError(f"{name!r} is not an importable module name")
    return names


def _store(s: str) -> str:
    if not s:
        raise ValueError("must be a SQLite file path or a redis:// URL")
    if s.startswith(("redis://", "rediss://", "unix://")):
        return s
    if "://" in s:
        raise ValueError("must be a SQLite file path or a redis:// URL")
    return s


def _executor(s: str) -> str:
    if s == "local" or re.fullmatch(r"dask://[^\s:/?]+:\d+(\?isolate=(process|thread))?", s):
        return s
    raise ValueError("must be 'local' or dask://HOST:PORT (optionally ?isolate=process or ?isolate=thread)")


def _api_keys(s: str) -> tuple[str, ...]:
    """Keys from "k1,k2" or from "@FILE" (one per line; blank lines and `#` comments skipped).

    A key must be something a client can send as `Authorization: Bearer <key>`: visible ASCII, no
    spaces or commas; and not start with `@` or `#`, which would read as a file or a comment.
    Messages name a bad key by its position, never by its text.
    """
    if s.startswith("@"):
        try:
            text = Path(s[1:]).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError("the key file is not UTF-8 text") from None
        keys = [line.strip() for line in text.splitlines()]
        keys = [k for k in keys if not k.startswith("#")]
    else:
        keys = [part.strip() for part in s.split(",")]
    keys = [k for k in keys if k]
    if not keys:
        raise ValueError("no keys given")
    for position, key in enumerate(keys, 1):
        if not all("!" <= c <= "~" for c in key) or "," in key:
            raise ValueError(f"key {position} has a character a Bearer token cannot carry "
                             "(use visible ASCII without spaces or commas, e.g. letters, digits, -._~+/=)")
        if key.startswith(("@", "#")):
            raise ValueError(f"key {position} starts with {key[0]!r}, which would read as a file or a comment")
    return tuple(dict.fromkeys(keys))  # duplicates dropped, order kept


def _access_log(s: str) -> str:
    if s in ("-", "off"):
        return s
    path = Path(s)
    if not s or "\0" in s or path.is_dir():
        raise ValueError("must be - (stdout), off, or a file path")
    if not path.parent.is_dir():
        raise ValueError(f"the directory {str(path.parent)!r} does not exist")
    return s


_PERIODS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
            "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0}


def parse_rate(s: str) -> RateLimit:
    """'20/s' -> 20 per second, '600/min', '1000/h', '5/10s' (5 per 10 s)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+)", s.lower())
    if not m or m.group(3) not in _PERIODS or float(m.group(1)) <= 0 or float(m.group(2) or 1) <= 0:
        raise ValueError("must look like 20/s, 600/min or 1000/h")
    return RateLimit(float(m.group(1)), float(m.group(2) or 1) * _PERIODS[m.group(3)])


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _nice(s: str) -> int:
    n = _int(s, "must be from 0 to 19")
    if not 0 <= n <= 19:
        raise ValueError("must be from 0 to 19")
    return n


def _log_level(s: str) -> str:
    v = s.lower()
    if v not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return v


# -- CPUs this process may use ----------------------------------------------------------------------


def available_cpus(
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup"
) -> int:
    """CPUs in this process's affinity mask, capped by a cgroup CPU quota (v2 cpu.max or v1 CFS).

    A container limited to 2 CPUs on a 64-core host gets 2; a fractional quota rounds up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(cgroup_root), Path(proc_self_cgroup))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path, proc_self_cgroup: Path) -> float | None:
    """The CPU limit (in CPUs) the cgroup imposes on this process, or None if there is none."""
    paths = _own_cgroup_paths(proc_self_cgroup)
    # cgroup v2: cpu.max is "QUOTA PERIOD" or "max PERIOD". The limit in force is the tightest of our
    # cgroup and its ancestors (a parent slice may cap a child that says "max"), down to the mount root.
    found_v2 = False
    limits: list[float] = []
    for rel in _ancestors(paths.get("", "")):
        try:
            quota_s, period_s = (root / rel / "cpu.max").read_text().split()[:2]
            found_v2 = True
            if quota_s != "max" and int(period_s) > 0 and int(quota_s) > 0:
                limits.append(int(quota_s) / int(period_s))
        except (OSError, ValueError):
            continue
    if found_v2:
        return min(limits, default=None)
    # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us, under the cpu controller.
    v1 = paths.get("cpu", paths.get("cpu,cpuacct", paths.get("cpuacct,cpu"))) or ""
    for base in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for rel in _ancestors(v1):
            d = root / base / rel
            try:
                quota = int((d / "cpu.cfs_quota_us").read_text())
                period = int((d / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
        if limits:
            return min(limits)
    return None


def _ancestors(cgroup_path: str) -> list[str]:
    """'/a/b' -> ['a/b', 'a', '']: a cgroup's path relative to the mount, then its parents'."""
    parts = [p for p in cgroup_path.split("/") if p and p != ".."]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _own_cgroup_paths(proc_self_cgroup: Path) -> dict[str, str]:
    """controller list -> path, from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                out[parts[1]] = parts[2]
                for controller in parts[1].split(","):
                    out.setdefault(controller, parts[2])
    except OSError:
        pass
    return out
