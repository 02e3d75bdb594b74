"""The `procbridge` command line against real servers, run as a user runs it (`python -m procbridge`, a
subprocess): each subcommand, the exit code of each kind of failure, and never a raw traceback."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess, free_port, metric, serving, wait_for

TASKS = "tests.support.fault_tasks,tests.support.stream_tasks"
KEY = "cli-test-key"


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("cli"), "--workers", "2", "--tasks", TASKS) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One worker, one pending slot, and an API key: for unauthorized and overloaded."""
    with serving(tmp_path_factory.mktemp("cli-keyed"), "--workers", "1", "--max-pending", "1",
                 "--api-keys", KEY, "--tasks", TASKS) as srv:
        yield srv


def cli_env(url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # any cwd
    if url is not None:
        env["PROCBRIDGE_URL"] = url
    env.update(extra)
    return env


def procbridge(*args: str, url: str | None = None, env: dict[str, str] | None = None, stdin: bytes | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    """`python -m procbridge ARGS` (the `procbridge` script's code); never a traceback on stderr."""
    done = subprocess.run([sys.executable, "-m", "procbridge", *args], cwd=cwd, input=stdin, capture_output=True,
                          env=env if env is not None else cli_env(url), timeout=60)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    return done


def out_json(done: subprocess.CompletedProcess[bytes]) -> object:
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


# -- the commands ----------------------------------------------------------------------------------


def test_call_prints_the_result_as_json(cli_server: ServerProcess) -> None:
    done = procbridge("call", "primes", "limit=1000", url=cli_server.url)
    assert out_json(done) == 168
    assert done.stdout == b"168\n"  # one line when stdout is not a terminal


def test_call_takes_values_as_json_where_they_parse_else_as_strings(cli_server: ServerProcess,
                                                                    tmp_path: Path) -> None:
    def echoed(word: str) -> object:
        result = out_json(procbridge("call", "echo", word, url=cli_server.url, cwd=tmp_path))
        assert isinstance(result, dict)
        return result["value"]

    (tmp_path / "note.txt").write_text("text from a file\n")
    assert echoed("value=[1, 2, {\"a\": true}]") == [1, 2, {"a": True}]
    assert echoed("value=3.5") == 3.5
    assert echoed("value=null") is None
    assert echoed("value=Ada Lovelace") == "Ada Lovelace"
    assert echoed("value=@note.txt") == "text from a file\n"
    assert echoed("value=@@handle") == "@handle"


def test_call_sends_a_lone_at_file_as_the_binary_body(cli_server: ServerProcess, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    (tmp_path / "blob.bin").write_bytes(data)
    done = procbridge("call", "sha256", "@blob.bin", "rounds=1", url=cli_server.url, cwd=tmp_path)
    assert out_json(done) == hashlib.sha256(data).hexdigest()
    piped = procbridge("call", "sha256", "@-", url=cli_server.url, stdin=data)
    assert out_json(piped) == hashlib.sha256(data).hexdigest()


def test_call_writes_a_binary_result_raw_to_stdout_or_to_the_output_file(cli_server: ServerProcess,
                                                                         tmp_path: Path) -> None:
    done = procbridge("call", "mandelbrot", "width=16", "height=8", url=cli_server.url)
    assert done.returncode == 0 and done.stdout.startswith(b"\x89PNG\r\n\x1a\n")
    target = tmp_path / "m.png"
    saved = procbridge("call", "mandelbrot", "width=16", "height=8", "-o", str(target), url=cli_server.url)
    assert saved.returncode == 0 and saved.stdout == b""
    assert target.read_bytes() == done.stdout


def test_stream_prints_each_item_as_one_json_line(cli_server: ServerProcess) -> None:
    done = procbridge("stream", "st_count", "n=4", url=cli_server.url)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [0, 1, 2, 3]


def test_submit_prints_the_job_id_and_job_prints_the_job(cli_server: ServerProcess) -> None:
    done = procbridge("submit", "primes", "limit=100", url=cli_server.url)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.decode().strip()
    assert job_id and "\n" not in job_id

    def finished() -> object:
        doc = out_json(procbridge("job", job_id, url=cli_server.url))
        return doc if isinstance(doc, dict) and doc["status"] == "succeeded" else None

    doc = wait_for(finished, 30, 0.1, "the job to succeed")
    assert doc["id"] == job_id and doc["result"] == 25


def test_job_follow_prints_one_json_line_per_event_when_not_on_a_terminal(cli_server: ServerProcess) -> None:
    job_id = procbridge("submit", "burn", "ms=600", url=cli_server.url).stdout.decode().strip()
    done = procbridge("job", job_id, "--follow", url=cli_server.url)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "result"
    assert events[-1]["data"]["status"] == "succeeded"
    assert any(e["event"] == "progress" for e in events) or events[0]["event"] == "status"


def test_job_follow_draws_a_progress_bar_when_stdout_is_a_terminal(cli_server: ServerProcess) -> None:
    job_id = procbridge("submit", "burn", "ms=1500", url=cli_server.url).stdout.decode().strip()
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "procbridge", "job", job_id, "--follow"], cwd=ROOT,
                            stdout=child_fd, stderr=subprocess.PIPE, env=cli_env(cli_server.url))
    os.close(child_fd)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    text = seen.decode(errors="replace")
    assert "\r" in text and "[" in text and "#" in text and "%" in text, text
    assert '"status": "succeeded"' in text  # then the final job document, indented


def test_cancel_cancels_a_queued_or_running_job(cli_server: ServerProcess, tmp_path: Path) -> None:
    job_id = procbridge("submit", "mark_then_wait", f"path={tmp_path / 'm'}", f"release={tmp_path / 'never'}",
                        url=cli_server.url).stdout.decode().strip()
    doc = out_json(procbridge("cancel", job_id, url=cli_server.url))
    assert isinstance(doc, dict) and doc["id"] == job_id
    followed = procbridge("job", job_id, "--follow", url=cli_server.url)
    assert followed.returncode == 1  # a cancelled job is a job that did not succeed
    assert b"cancelled" in followed.stderr


def test_jobs_lists_jobs_filtered_by_status_and_limited(cli_server: ServerProcess) -> None:
    for n in (10, 20, 30):
        procbridge("submit", "primes", f"limit={n}", url=cli_server.url)
    wait_for(lambda: len(out_json(procbridge("jobs", "--status", "succeeded", url=cli_server.url))) >= 3,  # type: ignore[arg-type]
             30, 0.2, "three succeeded jobs")
    listed = out_json(procbridge("jobs", "--status", "succeeded", "--limit", "2", url=cli_server.url))
    assert isinstance(listed, list) and len(listed) == 2
    assert all(job["status"] == "succeeded" for job in listed)


def test_submit_takes_the_job_options_and_jobs_follows_every_page(cli_server: ServerProcess) -> None:
    at = int(time.time()) + 7200
    first = procbridge("submit", "echo", "value=1", "--delay", "3600", "--priority", "5", "--task-retries", "2",
                       url=cli_server.url)
    second = procbridge("submit", "echo", "value=2", "--run-at", str(at), url=cli_server.url)
    iso = datetime.datetime.fromtimestamp(at + 60, datetime.UTC).isoformat()  # 2026-...T...+00:00
    third = procbridge("submit", "echo", "value=3", "--run-at", iso, url=cli_server.url)
    ids = [done.stdout.decode().strip() for done in (third, second, first)]
    listed = out_json(procbridge("jobs", "--task", "echo", "--all", "--limit", "1", url=cli_server.url))
    assert isinstance(listed, list) and [job["id"] for job in listed] == ids  # three pages of one, newest first
    assert [job["run_at"] for job in listed[:2]] == [at + 60, at] and listed[2]["status"] == "queued"
    assert (listed[2]["priority"], listed[2]["retries"]) == (5, 2)
    assert listed[2]["run_at"] == pytest.approx(listed[2]["created_at"] + 3600)
    one_page = out_json(procbridge("jobs", "--task", "echo", "--limit", "2", url=cli_server.url))
    assert isinstance(one_page, list) and [job["id"] for job in one_page] == ids[:2]


def test_tasks_lists_the_served_tasks_with_their_schemas(cli_server: ServerProcess) -> None:
    tasks = out_json(procbridge("tasks", url=cli_server.url))
    assert isinstance(tasks, list)
    by_name = {t["name"]: t for t in tasks}
    assert {"primes", "echo", "st_count"} <= set(by_name)
    assert "limit" in by_name["primes"]["params"]["properties"]


def test_workers_prints_the_pool(cli_server: ServerProcess) -> None:
    pool = out_json(procbridge("workers", url=cli_server.url))
    assert isinstance(pool, dict) and pool["size"] == 2 and len(pool["workers"]) == 2


def test_the_url_comes_from_the_flag_before_or_after_the_command_or_from_the_environment(
        cli_server: ServerProcess) -> None:
    assert out_json(procbridge("--url", cli_server.url, "call", "primes", "limit=10", env=cli_env())) == 4
    assert out_json(procbridge("call", "--url", cli_server.url, "primes", "limit=10", env=cli_env())) == 4
    assert out_json(procbridge("call", "primes", "limit=10", env=cli_env(cli_server.url))) == 4
    gone = f"http://127.0.0.1:{free_port()}"
    assert out_json(procbridge("call", "primes", "limit=10", "--url", cli_server.url, env=cli_env(gone))) == 4


def test_the_api_key_comes_from_the_flag_or_the_environment(keyed_server: ServerProcess) -> None:
    url = keyed_server.url
    assert out_json(procbridge("call", "primes", "limit=10", "--api-key", KEY, env=cli_env(url))) == 4
    assert out_json(procbridge("call", "primes", "limit=10", env=cli_env(url, PROCBRIDGE_API_KEY=KEY))) == 4


# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "slug"), [
    (("call", "fail", "message=kaput"), "task-failed"),
    (("call", "hard_exit"), "worker-crashed"),
])
def test_a_task_that_ran_and_failed_exits_1(cli_server: ServerProcess, args: tuple[str, ...], slug: str) -> None:
    done = procbridge(*args, url=cli_server.url)
    assert done.returncode == 1
    assert slug in done.stderr.decode() and done.stdout == b""


def test_a_job_that_timed_out_exits_1_when_followed(cli_server: ServerProcess) -> None:
    job_id = procbridge("submit", "spin_forever", "--task-timeout", "0.5", url=cli_server.url).stdout.decode().strip()
    done = procbridge("job", job_id, "--follow", url=cli_server.url)
    assert done.returncode == 1
    assert b"failed" in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    (("call", "primes", "limit=many"), "invalid-arguments"),
    (("call", "primes"), "invalid-arguments"),
    (("call", "no_such_task"), "unknown-task"),
    (("job", "0123456789abcdef0123456789abcdef"), "unknown-job"),
    (("submit", "no_such_task"), "unknown-task"),
    (("call", "primes", "limit"), "expected key=value"),
    (("call", "primes", "limit=1", "limit=2"), "given twice"),
    (("call", "sha256", "@/no/such/file"), "cannot read"),
    (("frobnicate",), "invalid choice"),
    ((), "a command is needed"),
    (("jobs", "--limit", "-3"), "--limit"),
    (("submit", "echo", "--delay", "5", "--run-at", "5"), "not allowed with argument --delay"),
    (("submit", "echo", "--run-at", "tomorrow"), "invalid time value"),
])
def test_a_request_that_is_wrong_exits_2_with_a_message_and_no_traceback(cli_server: ServerProcess,
                                                                       args: tuple[str, ...], says: str) -> None:
    done = procbridge(*args, url=cli_server.url)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr.decode()


def test_cancelling_a_finished_job_exits_2(cli_server: ServerProcess) -> None:
    job_id = procbridge("submit", "primes", "limit=10", url=cli_server.url).stdout.decode().strip()
    assert procbridge("job", job_id, "--follow", url=cli_server.url).returncode == 0
    done = procbridge("cancel", job_id, url=cli_server.url)
    assert done.returncode == 2 and b"job-finished" in done.stderr


def test_a_server_that_is_not_there_exits_3() -> None:
    done = procbridge("call", "primes", "limit=10", "--retries", "0", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3
    assert b"ConnectError" in done.stderr or b"refused" in done.stderr.lower()


def test_a_missing_or_wrong_key_exits_3(keyed_server: ServerProcess) -> None:
    for env in (cli_env(keyed_server.url), cli_env(keyed_server.url, PROCBRIDGE_API_KEY="wrong")):
        done = procbridge("tasks", env=env)
        assert done.returncode == 3 and b"unauthorized" in done.stderr


def test_no_answer_within_the_timeout_exits_3(cli_server: ServerProcess) -> None:
    done = procbridge("call", "nap", "ms=3000", "--timeout", "0.5", url=cli_server.url)
    assert done.returncode == 3


def test_an_overloaded_service_exits_4_once_the_retries_are_spent(keyed_server: ServerProcess,
                                                                   tmp_path: Path) -> None:
    """One worker held, one call pending: the next is refused with 503 overloaded."""
    env = cli_env(keyed_server.url, PROCBRIDGE_API_KEY=KEY)
    gate = tmp_path / "gate"
    args = ["call", "mark_then_wait", f"release={gate}"]
    holders = [subprocess.Popen([sys.executable, "-m", "procbridge", *args, f"path={tmp_path / str(i)}"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i in range(2)]
    try:
        wait_for(lambda: any((tmp_path / str(i)).exists() for i in range(2)), 30, what="the worker to be held")
        wait_for(lambda: metric(keyed_server, "procbridge_pending_tasks") >= 1, 30, 0.05,
                 what="the second call to wait for the worker")
        done = procbridge("call", "primes", "limit=10", "--retries", "0", env=env)
        assert done.returncode == 4, done.stderr
        assert b"overloaded" in done.stderr
    finally:
        gate.touch()
        for proc in holders:
            proc.wait(30)


# -- serve and loadtest ----------------------------------------------------------------------------


def test_serve_and_loadtest_are_handed_to_the_server_command_line() -> None:
    serve = procbridge("serve", "--help")
    assert serve.returncode == 0 and b"--max-pending" in serve.stdout
    loadtest = procbridge("loadtest", "--help")
    assert loadtest.returncode == 0, loadtest.stderr


def test_serve_where_the_server_is_not_installed_says_how_to_install_it() -> None:
    """As with `pip install procbridge` (no server extra): service/ is in the wheel, aiohttp is not."""
    code = ("import sys; sys.modules['aiohttp'] = None; from procbridge.cli import main; "
            "sys.exit(main(['serve']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env=cli_env(), timeout=60)
    assert done.returncode == 2
    assert b"procbridge[server]" in done.stderr and b"Traceback" not in done.stderr


def test_the_procbridge_script_runs_the_client_command_line() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["procbridge"] == "procbridge.cli:main"
