"""service.config: flags and environment variables (flags win), defaults, units, and refusals that name
the bad setting. (The table itself: test_settings.py; the docs' tables: test_settings_docs.py; the CPU
count: tests/workers/test_cpus.py.)"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from service.config import MIB, Config, ConfigError, RateLimit, available_cpus, load
from service.converters import WorkerRange
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


# (flag, env var, Config attribute, flag value, env value, expected from the flag, expected from the env)
SETTINGS = [
    ("--host", "PROCBRIDGE_HOST", "host", "127.0.0.2", "0.0.0.0", "127.0.0.2", "0.0.0.0"),
    ("--port", "PROCBRIDGE_PORT", "port", "9001", "9002", 9001, 9002),
    ("--workers", "PROCBRIDGE_WORKERS", "workers", "3", "5", 3, 5),
    ("--max-pending", "PROCBRIDGE_MAX_PENDING", "max_pending", "7", "11", 7, 11),
    ("--task-timeout", "PROCBRIDGE_TASK_TIMEOUT", "task_timeout", "2.5", "9", 2.5, 9.0),
    ("--max-body", "PROCBRIDGE_MAX_BODY", "max_body", "1MiB", "2048", MIB, 2048),
    ("--tasks", "PROCBRIDGE_TASKS", "tasks", "a.b, c", "d", ("a.b", "c"), ("d",)),
    ("--store", "PROCBRIDGE_STORE", "store", "/tmp/x.db", "redis://localhost:6379/0", "/tmp/x.db",
     "redis://localhost:6379/0"),
    ("--executor", "PROCBRIDGE_EXECUTOR", "executor", "dask://sched:8786", "local", "dask://sched:8786", "local"),
    ("--api-keys", "PROCBRIDGE_API_KEYS", "api_keys", "a,b", "c", ("a", "b"), ("c",)),
    ("--rate-limit", "PROCBRIDGE_RATE_LIMIT", "rate_limit", "20/s", "600/min", RateLimit(20, 1), RateLimit(600, 60)),
    ("--shutdown-grace", "PROCBRIDGE_SHUTDOWN_GRACE", "shutdown_grace", "3", "0", 3.0, 0.0),
    ("--shm-threshold", "PROCBRIDGE_SHM_THRESHOLD", "shm_threshold", "1MiB", "4096", MIB, 4096),
    ("--shm-budget", "PROCBRIDGE_SHM_BUDGET", "shm_budget", "512MiB", "0", 512 * MIB, 0),
    ("--access-log", "PROCBRIDGE_ACCESS_LOG", "access_log", "off", "/tmp/procbridge-access.log", "off",
     "/tmp/procbridge-access.log"),
    ("--job-lease", "PROCBRIDGE_JOB_LEASE", "job_lease", "2", "1m", 2.0, 60.0),
    ("--retry-backoff", "PROCBRIDGE_RETRY_BACKOFF", "retry_backoff", "0.25", "300", 0.25, 300.0),
    ("--webhook-allow", "PROCBRIDGE_WEBHOOK_ALLOW", "webhook_allow", "a.example, *.b.example:8443", "127.0.0.1:*",
     ("a.example", "*.b.example:8443"), ("127.0.0.1:*",)),
    ("--webhook-secret", "PROCBRIDGE_WEBHOOK_SECRET", "webhook_secret", "x" * 16, "y" * 40, "x" * 16, "y" * 40),
    ("--webhook-timeout", "PROCBRIDGE_WEBHOOK_TIMEOUT", "webhook_timeout", "2.5", "30", 2.5, 30.0),
    ("--http-processes", "PROCBRIDGE_HTTP_PROCESSES", "http_processes", "3", "2", 3, 2),
    ("--cors-origins", "PROCBRIDGE_CORS_ORIGINS", "cors_origins", "https://a.example", "*", ("https://a.example",),
     ("*",)),
    ("--worker-start-timeout", "PROCBRIDGE_WORKER_START_TIMEOUT", "worker_start_timeout", "5", "120", 5.0, 120.0),
    ("--max-tasks-per-worker", "PROCBRIDGE_MAX_TASKS_PER_WORKER", "max_tasks_per_worker", "100", "7", 100, 7),
    ("--max-worker-memory", "PROCBRIDGE_MAX_WORKER_MEMORY", "max_worker_memory", "1GiB", "512MiB", 1024 * MIB,
     512 * MIB),
    ("--worker-nice", "PROCBRIDGE_WORKER_NICE", "worker_nice", "0", "19", 0, 19),
    ("--job-concurrency", "PROCBRIDGE_JOB_CONCURRENCY", "job_concurrency", "3", "1", 3, 1),
    ("--job-ttl", "PROCBRIDGE_JOB_TTL", "job_ttl", "1h", "90", 3600.0, 90.0),
    ("--max-map-items", "PROCBRIDGE_MAX_MAP_ITEMS", "max_map_items", "10", "20", 10, 20),
    ("--log-level", "PROCBRIDGE_LOG_LEVEL", "log_level", "debug", "warning", "debug", "warning"),
    ("--worker-idle", "PROCBRIDGE_WORKER_IDLE", "worker_idle", "5", "120", 5.0, 120.0),
]
# The two switches (--debug, --cancel-running-on-disconnect) take no value: test_switches_win_over_their_variables.
SWITCHES = ("debug", "cancel_running_on_disconnect")


@pytest.mark.parametrize(("flag", "var", "attr", "flag_value", "env_value", "from_flag", "from_env"), SETTINGS)
def test_every_flag_has_an_env_var_and_flags_win(flag, var, attr, flag_value, env_value, from_flag, from_env):
    assert getattr(load([], {var: env_value}), attr) == from_env
    assert getattr(load([flag, flag_value], {}), attr) == from_flag
    assert getattr(load([flag, flag_value], {var: env_value}), attr) == from_flag


def test_the_table_above_covers_every_setting_that_takes_a_value():
    from service.settings import SETTINGS as TABLE

    assert sorted(row[2] for row in SETTINGS) == sorted(s.name for s in TABLE if not s.switch)
    assert sorted(SWITCHES) == sorted(s.name for s in TABLE if s.switch)


@pytest.mark.parametrize("attr", SWITCHES)
def test_switches_win_over_their_variables(attr):
    flag, var = "--" + attr.replace("_", "-"), "PROCBRIDGE_" + attr.upper()
    assert getattr(load([], {var: "true"}), attr) is True
    assert getattr(load([], {var: "0"}), attr) is False
    assert getattr(load([flag], {var: "false"}), attr) is True


def test_dask_executor_isolation_option():
    assert load(["--executor", "dask://sched:8786?isolate=thread"], {}).executor == (
        "dask://sched:8786?isolate=thread"
    )


def test_defaults():
    config = load([], {})
    assert config.host == "127.0.0.1"
    assert config.port == 8080
    assert config.workers == available_cpus()
    assert config.workers >= 1
    assert config.max_pending == 4 * config.workers
    assert config.task_timeout == 60
    assert config.max_body == 64 * MIB
    assert config.tasks == ()
    assert config.store == "./procbridge.db"
    assert config.executor == "local"
    assert config.api_keys == ()
    assert config.rate_limit is None
    assert config.shutdown_grace == 25
    assert config.shm_threshold == 256 * 1024
    assert config.shm_budget is None  # decided at start-up from /dev/shm's free space
    assert config.job_lease == 30


def test_max_pending_defaults_to_four_per_worker():
    assert load(["--workers", "3"], {}).max_pending == 12
    assert load([], {"PROCBRIDGE_WORKERS": "5"}).max_pending == 20
    assert load(["--workers", "3", "--max-pending", "1"], {}).max_pending == 1
    assert Config(workers=3).max_pending == 12  # built directly, as the tests do
    assert Config(workers=3, max_pending=2).max_pending == 2


@pytest.mark.parametrize(
    ("text", "fewest", "most"),
    [("4", 4, 4), ("1..8", 1, 8), (" 2 .. 3 ", 2, 3), ("3..3", 3, 3), ("+1..2", 1, 2)],
)
def test_workers_is_a_number_or_min_dot_dot_max(text, fewest, most):
    """`--workers N` is a fixed pool; `MIN..MAX` an elastic one: `workers` is MAX (an int, so what is
    sized by the worker count is sized by MAX) and `min_workers` MIN. The variable reads the same."""
    for config in (load(["--workers", text], {}), load([], {"PROCBRIDGE_WORKERS": text})):
        assert (config.min_workers, int(config.workers)) == (fewest, most)
        assert (config.max_pending, config.job_concurrency) == (4 * most, max(1, (most + 1) // 2))
        assert type(config.workers) is (int if fewest == most else WorkerRange)
    assert load(["--workers", "1..8"], {"PROCBRIDGE_WORKERS": "2..3"}).workers == WorkerRange(1, 8)  # flags win
    assert load([], {}).worker_idle == 60.0 and load(["--worker-idle", "0.5"], {}).worker_idle == 0.5
    assert load([], {"PROCBRIDGE_WORKER_IDLE": "90"}).worker_idle == 90.0


def test_a_worker_range_is_an_int_that_also_holds_min():
    elastic = WorkerRange(1, 4)
    assert int(elastic) == 4 and 2 * elastic == 8 and repr(elastic) == str(elastic) == "1..4"
    assert elastic == WorkerRange(1, 4) and elastic != WorkerRange(2, 4) and elastic != 4  # 1..4 is not a fixed 4
    assert WorkerRange(4, 4) == 4 and hash(WorkerRange(4, 4)) == hash(4)
    assert pickle.loads(pickle.dumps(elastic)) == elastic and copy.deepcopy(elastic).min == 1
    assert Config(workers=elastic).min_workers == 1 and Config(workers=4).min_workers == 4
    assert Config(workers=elastic) != Config(workers=4)  # the same MAX, another MIN: another config
    assert "workers=1..4" in repr(Config(workers=elastic))
    assert replace(Config(workers=elastic), task_timeout=5).min_workers == 1  # replace keeps the range
    with pytest.raises(ValueError, match="MIN must be at least 1 and at most MAX"):
        WorkerRange(3, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be a number of workers ≥ 1, or MIN..MAX"),
        ("0..4", r"MIN must be at least 1 \(a pool never shrinks to no worker\), not 0"),
        ("5..2", r"MIN \(5\) is more than MAX \(2\)"),
        ("1..", "or MIN..MAX"), ("..4", "or MIN..MAX"), ("1...4", "or MIN..MAX"), ("1-4", "or MIN..MAX"),
        ("a..b", "or MIN..MAX"), ("-1..3", "MIN must be at least 1"),
    ],
)
def test_bad_worker_ranges_are_refused_with_a_reason(text, message):
    for argv, env, named in (([f"--workers={text}"], {}, "--workers"), ([], {"PROCBRIDGE_WORKERS": text},
                                                                          "PROCBRIDGE_WORKERS")):
        with pytest.raises(ConfigError, match=f"^{named}={text!r}: .*{message}"):
            load(argv, env)


def test_empty_env_var_counts_as_unset():
    assert load([], {"PROCBRIDGE_PORT": ""}).port == 8080


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", MIB), ("1 MiB", MIB), ("512KiB", 512 * 1024), ("2GiB", 2 * 1024**3), ("10MB", 10 * 1000**2),
     ("1kb", 1000), ("4096", 4096), ("1.5KiB", 1536)],
)
def test_sizes_take_units(text, size):
    assert load(["--max-body", text], {}).max_body == size


def test_api_keys_from_a_list_or_a_file(tmp_path):
    assert load(["--api-keys", " a , b ,"], {}).api_keys == ("a", "b")
    keys = tmp_path / "keys.txt"
    keys.write_text("# operators\nfirst\n\n  second  \n")
    assert load(["--api-keys", f"@{keys}"], {}).api_keys == ("first", "second")
    assert load([], {"PROCBRIDGE_API_KEYS": f"@{keys}"}).api_keys == ("first", "second")


def test_api_keys_drop_duplicates_and_refuse_what_would_read_as_a_file_or_a_comment():
    assert load(["--api-keys", "a,b,a,b"], {}).api_keys == ("a", "b")
    for listed in ("ok-key,#comment-like", "ok-key,@file-like"):
        with pytest.raises(ConfigError, match="key 2 starts with"):
            load(["--api-keys", listed], {})


def test_a_bad_key_is_named_by_its_position_never_shown(tmp_path):
    secret = "s3cret-but-has a-space"
    listed = f"first-key,{secret}"
    for argv, env in ((["--api-keys", listed], {}), ([], {"PROCBRIDGE_API_KEYS": listed})):
        with pytest.raises(ConfigError) as info:
            load(argv, env)
        assert "key 2" in str(info.value)
        assert secret not in str(info.value) and "first-key" not in str(info.value)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"first-key\n{secret}\n")
    with pytest.raises(ConfigError) as info:
        load(["--api-keys", f"@{keys}"], {})
    assert str(keys) in str(info.value) and secret not in str(info.value)  # the file is named, not its keys


def test_webhook_settings_are_off_by_default():
    config = load([], {})
    assert (config.webhook_allow, config.webhook_secret, config.webhook_timeout) == ((), None, 10.0)
    assert config.retry_backoff == 1.0


def test_webhook_secret_from_a_file_is_its_first_line_and_never_shown(tmp_path):
    secret = "s3cr3t-" + "0123456789abcdef"
    path = tmp_path / "webhook-secret"
    path.write_text(f"  {secret}  \nsecond line ignored\n")
    config = load(["--webhook-secret", f"@{path}"], {})
    assert config.webhook_secret == secret
    assert secret not in repr(config) and "webhook_secret='<not shown>'" in repr(config)
    path.write_text("\n" + secret)
    with pytest.raises(ConfigError, match="first line is empty"):
        load([], {"PROCBRIDGE_WEBHOOK_SECRET": f"@{path}"})
    for bad in ("with a space in it, long enough", "tiny-k3y", "clé-non-ascii-mais-longue"):
        with pytest.raises(ConfigError) as info:
            load(["--webhook-secret", bad], {})
        assert bad not in str(info.value) and "<not shown>" in str(info.value)


def test_webhook_allow_refusals_name_the_pattern_and_what_to_write():
    with pytest.raises(ConfigError) as info:
        load(["--webhook-allow", "hooks.example.com, http://x.example/hook"], {})
    message = str(info.value)
    assert message.startswith("--webhook-allow=") and "'http://x.example/hook'" in message
    assert "without a scheme" in message


def test_access_log_default_is_stdout():
    assert load([], {}).access_log == "-"
    assert Config().access_log == "-"


def test_rate_limits_accept_plural_units_and_fractions():
    assert load(["--rate-limit", "20/seconds"], {}).rate_limit == RateLimit(20, 1)
    assert load(["--rate-limit", "100 / 5 mins"], {}).rate_limit == RateLimit(100, 300)
    assert load(["--rate-limit", "0.5/s"], {}).rate_limit == RateLimit(0.5, 1)


def test_rate_limits():
    per_second = load(["--rate-limit", "20/s"], {}).rate_limit
    assert per_second == RateLimit(20, 1)
    assert per_second.rate == 20
    per_minute = load(["--rate-limit", "600/min"], {}).rate_limit
    assert per_minute.rate == pytest.approx(10)
    assert load(["--rate-limit", "1000/h"], {}).rate_limit.rate == pytest.approx(1000 / 3600)
    assert load(["--rate-limit", "5/10s"], {}).rate_limit.rate == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "99999"], {}, "--port"),
        (["--port", "bad"], {}, "--port"),
        ([], {"PROCBRIDGE_PORT": "-1"}, "PROCBRIDGE_PORT"),
        ([], {"PROCBRIDGE_WORKERS": "0"}, "PROCBRIDGE_WORKERS"),
        (["--workers", "two"], {}, "--workers"),
        (["--workers", "0..2"], {}, "--workers"),
        ([], {"PROCBRIDGE_WORKERS": "4..1"}, "PROCBRIDGE_WORKERS"),
        (["--worker-idle", "0"], {}, "--worker-idle"),
        ([], {"PROCBRIDGE_WORKER_IDLE": "soon"}, "PROCBRIDGE_WORKER_IDLE"),
        (["--task-timeout", "-1"], {}, "--task-timeout"),
        (["--task-timeout", "0"], {}, "--task-timeout"),
        ([], {"PROCBRIDGE_TASK_TIMEOUT": "inf"}, "PROCBRIDGE_TASK_TIMEOUT"),
        (["--shutdown-grace", "-2"], {}, "--shutdown-grace"),
        (["--max-pending", "-3"], {}, "--max-pending"),
        (["--max-pending", "0"], {}, "--max-pending"),
        (["--max-body", "lots"], {}, "--max-body"),
        (["--max-body", "5 parsecs"], {}, "--max-body"),
        (["--max-body", "0"], {}, "--max-body"),
        ([], {"PROCBRIDGE_MAX_BODY": "-1"}, "PROCBRIDGE_MAX_BODY"),
        (["--executor", "foo"], {}, "--executor"),
        (["--executor", "dask://nohost"], {}, "--executor"),
        (["--executor", "dask://sched:8786?isolate=fork"], {}, "--executor"),
        (["--rate-limit", "x"], {}, "--rate-limit"),
        (["--rate-limit", "0/s"], {}, "--rate-limit"),
        (["--rate-limit", "10/fortnight"], {}, "--rate-limit"),
        (["--rate-limit", "10/0s"], {}, "--rate-limit"),
        ([], {"PROCBRIDGE_RATE_LIMIT": "lots"}, "PROCBRIDGE_RATE_LIMIT"),
        (["--api-keys", " , "], {}, "--api-keys"),
        (["--api-keys", "@/nonexistent/procbridge-keys"], {}, "--api-keys"),
        (["--api-keys", "good-key,bad key"], {}, "--api-keys"),
        ([], {"PROCBRIDGE_API_KEYS": "clé-non-ascii"}, "PROCBRIDGE_API_KEYS"),
        (["--rate-limit", "20/ms"], {}, "--rate-limit"),
        (["--access-log", "/nonexistent-dir/access.log"], {}, "--access-log"),
        (["--access-log", "/tmp"], {}, "--access-log"),
        (["--store", "ftp://somewhere"], {}, "--store"),
        (["--tasks", "not a module"], {}, "--tasks"),
        (["--host", "bad host"], {}, "--host"),
        ([], {"PROCBRIDGE_DEBUG": "maybe"}, "PROCBRIDGE_DEBUG"),
        (["--log-level", "loud"], {}, "--log-level"),
        (["--job-lease", "1.5"], {}, "--job-lease"),
        ([], {"PROCBRIDGE_JOB_LEASE": "soon"}, "PROCBRIDGE_JOB_LEASE"),
        (["--retry-backoff", "0"], {}, "--retry-backoff"),
        (["--retry-backoff", "301"], {}, "--retry-backoff"),
        (["--webhook-allow", " , "], {}, "--webhook-allow"),
        (["--webhook-allow", "https://hooks.example.com"], {}, "--webhook-allow"),
        (["--webhook-allow", "::1"], {}, "--webhook-allow"),
        ([], {"PROCBRIDGE_WEBHOOK_ALLOW": "hooks.example.com:99999"}, "PROCBRIDGE_WEBHOOK_ALLOW"),
        (["--webhook-secret", "short"], {}, "--webhook-secret"),
        (["--webhook-secret", "@/nonexistent/procbridge-secret"], {}, "--webhook-secret"),
        (["--webhook-timeout", "0"], {}, "--webhook-timeout"),
    ],
)
def test_bad_values_name_the_flag_or_variable(argv, env, named):
    with pytest.raises(ConfigError) as info:
        load(argv, env)
    message = str(info.value)
    assert message.startswith(named + "=")
    assert "invalid literal" not in message  # a sentence for people, not Python's parse error
    assert message.split(": ", 1)[1].strip()  # and says what is wrong with it


def test_flag_wins_even_when_the_env_value_is_bad():
    assert load(["--port", "9000"], {"PROCBRIDGE_PORT": "junk"}).port == 9000


# -- the command line --------------------------------------------------------------------------------


def test_serve_with_a_bad_flag_exits_with_a_message_and_no_traceback():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "bad"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "--port" in done.stderr
    assert "port number" in done.stderr  # says what a good value is
    assert "Traceback" not in done.stderr
    assert "Traceback" not in done.stdout


def test_serve_with_an_unreachable_redis_store_exits_with_one_line_naming_the_flag():
    """A real refused connection (a loopback port nobody listens on): exit 1, one line naming
    --store, the URL's password never shown, no traceback, nothing left running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    port = free_port()  # free a moment ago: nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0", "--workers", "1",
         "--store", f"redis://:hunter2@127.0.0.1:{port}/0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert f"--store: cannot use Redis at redis://:***@127.0.0.1:{port}/0" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
