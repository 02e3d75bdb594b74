"""One Config, built once from flags and environment variables (flags win), validated up front.

No other module reads the environment: `Config` is passed down to whatever needs a setting. What the
settings are (flag, variable, parser, default, help) is the table in service/settings.py; this module
turns that table into an argparse parser and a frozen Config.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from service.converters import MIB, RateLimit, WorkerRange, parse_rate
from service.jobs.store.url import StoreURL, parse_store
from service.settings import BY_NAME, DERIVE, SETTINGS, Derived, Setting, field_default
from service.settings_docs import plain_help
from workers.cpus import available_cpus
from workers.executor_url import ExecutorURL, parse_executor

# Re-exported: importers of service.config found these here before the table had its own modules.
__all__ = ["MIB", "Config", "ConfigError", "RateLimit", "available_cpus", "load", "parse_rate", "parser"]


class ConfigError(ValueError):
    """A flag or environment variable has a value the service cannot run with."""


@dataclass(frozen=True, repr=False)
class Config:
    """Every setting, typed. Field defaults come from the table: `Config(workers=1, store=...)` (as tests
    build it) gets the others as `load` would, derived ones (max_pending, job_concurrency) included.
    `store_url` and `executor_url` are the parsed forms of `store` and `executor`, made once here.
    `workers` is the most workers; `--workers 1..8` makes it a `WorkerRange` (an int, 8) that also holds
    the fewest, read as `min_workers`: `Config(workers=WorkerRange(1, 8))` builds an elastic one."""

    host: str = field_default("host")
    port: int = field_default("port")
    workers: int = field_default("workers")  # MAX; a WorkerRange (an int) also holds MIN: `min_workers`
    worker_idle: float = field_default("worker_idle")
    max_pending: int = field_default("max_pending")
    task_timeout: float = field_default("task_timeout")
    max_body: int = field_default("max_body")
    tasks: tuple[str, ...] = field_default("tasks")
    store: str = field_default("store")
    executor: str = field_default("executor")
    api_keys: tuple[str, ...] = field_default("api_keys")
    http_processes: int = field_default("http_processes")
    cors_origins: tuple[str, ...] = field_default("cors_origins")
    rate_limit: RateLimit | None = field_default("rate_limit")  # noqa: RUF009 (None; RateLimit is frozen)
    shutdown_grace: float = field_default("shutdown_grace")
    worker_start_timeout: float = field_default("worker_start_timeout")
    max_tasks_per_worker: int = field_default("max_tasks_per_worker")
    max_worker_memory: int = field_default("max_worker_memory")
    cancel_running_on_disconnect: bool = field_default("cancel_running_on_disconnect")
    worker_nice: int = field_default("worker_nice")
    job_concurrency: int = field_default("job_concurrency")
    job_ttl: float = field_default("job_ttl")
    job_lease: float = field_default("job_lease")
    retry_backoff: float = field_default("retry_backoff")
    webhook_allow: tuple[str, ...] = field_default("webhook_allow")
    webhook_secret: str | None = field_default("webhook_secret")
    webhook_timeout: float = field_default("webhook_timeout")
    max_map_items: int = field_default("max_map_items")
    shm_threshold: int = field_default("shm_threshold")
    shm_budget: int | None = field_default("shm_budget")  # None: 3/4 of /dev/shm's free space at start-up; 0: off
    log_level: str = field_default("log_level")
    debug: bool = field_default("debug")
    access_log: str = field_default("access_log")  # "-": stdout, "off", or a file path (appended to)
    store_url: StoreURL = field(init=False, repr=False, compare=False)
    executor_url: ExecutorURL = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Fill derived defaults from the table (a field left at DERIVE), then parse the two URLs, so a
        Config built directly is as complete, and as checked for its URLs, as one from `load`."""
        resolved: dict[str, Any] = {}
        for setting in SETTINGS:  # in table order, so a derived default sees the settings above it
            value = getattr(self, setting.name)
            if value is DERIVE:
                assert isinstance(setting.default, Derived)
                value = setting.default.compute(resolved)
                object.__setattr__(self, setting.name, value)
            resolved[setting.name] = value
        object.__setattr__(self, "store_url", parse_store(self.store))
        object.__setattr__(self, "executor_url", parse_executor(self.executor))

    def __repr__(self) -> str:
        """Like the dataclass's, without secrets: a Config may be logged, its API keys and store password not."""
        shown = []
        for name in self.setting_names():
            value: Any = getattr(self, name)
            if BY_NAME[name].secret and value:
                value = "<not shown>"
            elif name == "store":
                value = self.store_url.public
            shown.append(f"{name}={value!r}")
        return f"Config({', '.join(shown)})"

    @property
    def min_workers(self) -> int:
        """The fewest workers the pool keeps: MIN of `--workers MIN..MAX`, else `workers` (a fixed pool)."""
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers

    @classmethod
    def setting_names(cls) -> list[str]:
        """The fields a flag sets, in the Config's order (the tests compare them with the table)."""
        return [f.name for f in fields(cls) if f.init]


def parser() -> argparse.ArgumentParser:
    """`procbridge serve`'s parser, one option per row of the table; --help shows each row's help, its
    default in brackets and its variable."""
    p = argparse.ArgumentParser(
        prog="procbridge serve",
        description="Serve registered Python tasks over HTTP on a supervised process pool. "
        "Every flag also reads an environment variable (shown after it, as $NAME); flags win. "
        "Defaults in brackets.",
    )
    for s in SETTINGS:
        text = plain_help(s).replace("%", "%%")  # argparse formats help with %
        if s.switch:
            p.add_argument(s.flag, dest=s.name, action="store_const", const="true", help=text)
        else:
            p.add_argument(s.flag, dest=s.name, metavar=s.name.upper(), help=text)
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from argv and env; raise ConfigError naming the bad flag or variable.

    A flag wins over its variable (even when the variable's value is bad); an empty variable counts as
    unset. Unset settings keep Config's defaults, which are the table's."""
    env = os.environ if env is None else env
    args = vars(parser().parse_args(list(argv or [])))
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if args.get(s.name) is not None:
            values[s.name] = _convert(s, args[s.name], s.flag)
        elif env.get(s.env, "") != "":
            values[s.name] = _convert(s, env[s.env], s.env)
    return Config(**values)


def _convert(setting: Setting, text: str, where: str) -> Any:
    try:
        return setting.parse(text.strip())
    except (ValueError, OSError) as exc:
        shown = "<not shown>" if setting.secret and not text.strip().startswith("@") else repr(text)
        raise ConfigError(f"{where}={shown}: {exc}") from None


if Config.setting_names() != list(BY_NAME):  # a row without a field, or a field without a row
    raise RuntimeError("service.config.Config's fields and service.settings.SETTINGS differ")
