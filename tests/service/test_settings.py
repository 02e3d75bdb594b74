"""service.settings: the one table of settings, and everything made from it agreeing with it — the
Config's fields and their types, its defaults, the flags and variables `load` reads, and --help."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from service import converters
from service.config import Config, ConfigError, load, parser
from service.jobs.store.url import StoreURL
from service.settings import BY_NAME, SETTINGS, Derived, Setting
from service.settings_docs import plain_help
from workers.cpus import available_cpus
from workers.executor_url import ExecutorURL

ROOT = Path(__file__).resolve().parents[2]

# A value each setting accepts other than its default, and what it reads as.
SAMPLES: dict[str, tuple[str, object]] = {
    "host": ("0.0.0.0", "0.0.0.0"), "port": ("9001", 9001), "workers": ("3", 3), "worker_idle": ("2.5", 2.5),
    "max_pending": ("7", 7),
    "task_timeout": ("2.5", 2.5), "max_body": ("1KiB", 1024), "tasks": ("a.b,c", ("a.b", "c")),
    "store": ("redis://h:6379/0", "redis://h:6379/0"), "executor": ("dask://s:8786", "dask://s:8786"),
    "api_keys": ("k1,k2", ("k1", "k2")), "rate_limit": ("20/s", converters.RateLimit(20, 1)),
    "http_processes": ("3", 3),
    "cors_origins": ("https://a.example, HTTPS://B.example:443", ("https://a.example", "https://b.example")),
    "shutdown_grace": ("0", 0.0), "worker_start_timeout": ("90", 90.0),
    "max_tasks_per_worker": ("5", 5), "max_worker_memory": ("1MiB", 2**20),
    "cancel_running_on_disconnect": ("true", True), "worker_nice": ("0", 0), "job_concurrency": ("4", 4),
    "job_ttl": ("90m", 5400.0), "job_lease": ("2m", 120.0), "retry_backoff": ("0.5", 0.5),
    "webhook_allow": ("*.Example.com,[::1]:9000", ("*.example.com", "[::1]:9000")),
    "webhook_secret": ("0123456789abcdef", "0123456789abcdef"), "webhook_timeout": ("3", 3.0),
    "max_map_items": ("10", 10),
    "shm_threshold": ("4096", 4096), "shm_budget": ("0", 0), "log_level": ("DEBUG", "debug"),
    "debug": ("yes", True), "access_log": ("off", "off"),
}


def test_one_field_per_row_in_the_same_order():
    assert Config.setting_names() == [s.name for s in SETTINGS]
    assert set(SAMPLES) == set(BY_NAME)


def test_flags_and_variables_are_named_after_the_field_and_unique():
    for s in SETTINGS:
        assert s.flag == "--" + s.name.replace("_", "-")
        assert s.env == "PROCBRIDGE_" + s.name.upper()
    assert len({s.flag for s in SETTINGS}) == len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_each_parser_returns_the_type_of_its_field():
    """The table's "type" is its parser: what it returns is what the Config field holds (or None,
    where None is the default that means "off")."""
    hints = typing.get_type_hints(Config)
    for s in SETTINGS:
        returned = typing.get_type_hints(s.parse)["return"]
        expected = returned | None if s.default is None else returned
        assert hints[s.name] == expected, s.name


def test_shown_defaults_read_back_as_the_defaults():
    """What --help and the docs show as a constant default is the default, read by the setting's own
    parser: `64 MiB` is 64 * 2**20, `24h` is 86400, `off` is False."""
    for s in SETTINGS:
        if s.is_constant:
            assert s.parse(s.default_text) == s.default, s.name
        elif isinstance(s.default, Derived):
            assert s.default_text
    assert [s.name for s in SETTINGS if isinstance(s.default, Derived)] == ["workers", "max_pending",
                                                                            "job_concurrency"]


def test_a_directly_built_config_has_the_defaults_load_gives():
    """Config's defaults are the table's, derived ones included: no second copy to drift."""
    assert Config() == load([], {})
    assert Config().workers == available_cpus()
    three = Config(workers=3)
    assert (three.max_pending, three.job_concurrency) == (12, 2)
    assert (Config(workers=1).job_concurrency, Config(workers=4).job_concurrency) == (1, 2)
    assert replace(three, workers=5).max_pending == 12  # replace keeps what was set, derived or not


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_row_is_read_from_its_flag_and_its_variable(setting: Setting):
    text, value = SAMPLES[setting.name]
    argv = [setting.flag] if setting.switch else [setting.flag, text]
    assert getattr(load(argv, {}), setting.name) == value
    assert getattr(load([], {setting.env: text}), setting.name) == value
    assert getattr(load([], {setting.env: ""}), setting.name) == getattr(Config(), setting.name)  # empty: unset


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.secret], ids=lambda s: s.name)
def test_a_secret_is_never_shown_in_a_refusal(setting: Setting):
    secret = "hunter2 with a space"
    for argv, env in (([setting.flag, secret], {}), ([], {setting.env: secret})):
        with pytest.raises(ConfigError) as info:
            load(argv, env)
        assert secret not in str(info.value) and "hunter2" not in str(info.value)
        assert "<not shown>" in str(info.value)


def test_help_shows_every_row_its_default_and_its_variable():
    text = " ".join(parser().format_help().split())  # argparse wraps lines
    for s in SETTINGS:
        assert s.flag in text and f"(${s.env})" in text
        assert " ".join(plain_help(s).split()) in text  # help, [default], ($VARIABLE)


def test_help_text_is_plain():
    assert plain_help(BY_NAME["executor"]) == (
        "local, or dask://HOST:PORT[?isolate=process|thread]: run tasks on a Dask cluster (docs/dask.md) "
        "[local] ($PROCBRIDGE_EXECUTOR)"
    )
    assert plain_help(BY_NAME["tasks"]).endswith("[none: the built-ins only] ($PROCBRIDGE_TASKS)")


def test_serve_help_from_the_command_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for s in SETTINGS:
        assert s.flag in done.stdout and f"${s.env}" in done.stdout


def test_config_keeps_the_parsed_store_and_executor():
    config = Config(workers=1, store="redis://:pw@h:6379/0?prefix=pb:", executor="dask://s:8786?isolate=thread")
    assert config.store_url == StoreURL("redis", "redis://:pw@h:6379/0", "pb:")
    assert config.executor_url == ExecutorURL("dask", "s", 8786, "thread")
    assert "pw" not in repr(config.store_url)
    loaded = load([], {})
    assert loaded.store_url == StoreURL("sqlite", "./procbridge.db") and not loaded.store_url.shared
    assert loaded.executor_url.kind == "local"
    assert "pw" not in repr(config) and "redis://:***@h:6379/0" in repr(config)
    assert "k1" not in repr(Config(workers=1, api_keys=("k1",))) and "api_keys=()" in repr(Config(workers=1))
    with pytest.raises(ValueError, match="SQLite file path or a redis:// URL"):
        Config(workers=1, store="ftp://x")  # built directly, a bad URL is still refused
