"""RemoteExecutor against a real server: the behaviours CPython's own executor tests check
(Lib/test/test_concurrent_futures/: executor.py, test_shutdown.py, test_as_completed.py, test_wait.py)
that apply to an executor whose calls run elsewhere, each named after the claim it checks."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procbridge import InvalidArguments, ServiceUnreachable, TaskFailed, UnknownTask, WorkerCrashed
from procbridge.executor import RemoteExecutor, task_name
from tests.conftest import ServerProcess, free_port, serving, wait_for
from tests.support import executor_tasks as et
from tests.support import fault_tasks as ft
from workers.builtin_tasks import primes, sha256

TASKS = "tests.support.fault_tasks,tests.support.executor_tasks"


@pytest.fixture(scope="module")
def exec_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("executor"), "--workers", "2", "--tasks", TASKS) as srv:
        yield srv


@pytest.fixture
def executor(exec_server: ServerProcess) -> Iterator[RemoteExecutor]:
    with RemoteExecutor(exec_server.url, max_workers=2) as ex:
        yield ex


def gated(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(marker, gate): mark_then_wait writes `marker` when it starts and runs until `gate` exists."""
    return tmp_path / f"{name}.started", tmp_path / f"{name}.gate"


# -- submit (executor.py: test_submit, test_submit_keyword) ------------------------------------------


def test_submit_returns_a_future_of_the_tasks_result(executor: RemoteExecutor) -> None:
    future = executor.submit(primes, 1000)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=30) == 168


def test_submit_binds_positional_and_keyword_arguments_to_the_parameters(executor: RemoteExecutor) -> None:
    assert executor.submit(et.ex_mul, 2, 8).result(30) == 16
    assert executor.submit(et.ex_mul, 2, y=8).result(30) == 16
    assert executor.submit(et.ex_mul, x=2, y=8).result(30) == 16


def test_submit_takes_a_task_name_and_binds_positionals_in_the_schemas_order(executor: RemoteExecutor) -> None:
    assert executor.submit("ex_mul", 3, y=5).result(30) == 15
    assert executor.submit("primes", limit=100).result(30) == 25


def test_submit_without_fn_or_with_fn_as_keyword_raises_type_error(executor: RemoteExecutor) -> None:
    with pytest.raises(TypeError):
        executor.submit(fn=et.ex_mul, x=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        executor.submit(x=1)  # type: ignore[call-arg]


def test_arguments_that_do_not_bind_give_a_future_with_type_error_and_send_nothing(executor: RemoteExecutor) -> None:
    future = executor.submit(et.ex_mul, 1, 2, 3)
    assert isinstance(future.exception(30), TypeError)
    assert isinstance(executor.submit("ex_mul", 1, 2, 3).exception(30), TypeError)


def test_a_task_registered_under_another_name_is_called_by_that_name(executor: RemoteExecutor) -> None:
    assert task_name(et.cube) == "ex_cube"
    assert executor.submit(et.cube, 3).result(30) == 27


def test_bytes_arguments_travel_as_base64(executor: RemoteExecutor) -> None:
    assert executor.submit(sha256, b"procbridge", rounds=1).result(30) == hashlib.sha256(b"procbridge").hexdigest()


# -- exception propagation ---------------------------------------------------------------------------


def test_a_failing_task_gives_a_future_whose_exception_is_task_failed(executor: RemoteExecutor) -> None:
    future = executor.submit(ft.fail, "boom here")
    error = future.exception(30)
    assert isinstance(error, TaskFailed)
    assert error.status == 500 and error.slug == "task-failed" and "boom here" in error.detail
    with pytest.raises(TaskFailed):
        future.result()


def test_each_failure_kind_gives_its_typed_problem_error(executor: RemoteExecutor) -> None:
    assert isinstance(executor.submit(et.ex_divmod, 1, 0).exception(30), TaskFailed)
    assert isinstance(executor.submit("no_such_task").exception(30), UnknownTask)
    assert isinstance(executor.submit(primes, "many").exception(30), InvalidArguments)
    assert isinstance(executor.submit(ft.hard_exit).exception(30), WorkerCrashed)


def test_a_server_that_is_not_there_gives_service_unreachable_on_the_future() -> None:
    with RemoteExecutor(f"http://127.0.0.1:{free_port()}", max_workers=1, retries=0) as ex:
        error = ex.submit(primes, 10).exception(30)
    assert isinstance(error, ServiceUnreachable)


def test_max_workers_must_be_greater_than_zero() -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            RemoteExecutor("http://127.0.0.1:1", max_workers=number)


def test_the_default_max_workers_is_the_servers_pool_size(exec_server: ServerProcess) -> None:
    with RemoteExecutor(exec_server.url) as ex:
        ex.submit(primes, 10).result(30)
        assert ex._pool is not None and ex._pool._max_workers == 2


# -- map (executor.py: test_map, test_map_exception, test_map_timeout) --------------------------------


def test_map_gives_the_results_in_input_order(executor: RemoteExecutor) -> None:
    limits = [10, 10_000, 1, 100, 1000, 0, 50_000, 7, 2, 3]
    expected = [primes(n) for n in limits]
    assert list(executor.map(primes, limits)) == expected
    assert list(executor.map(primes, limits, chunksize=3)) == expected
    assert list(executor.map("primes", limits)) == expected


def test_map_zips_several_iterables_into_positional_arguments(executor: RemoteExecutor) -> None:
    assert list(executor.map(et.ex_mul, range(10), range(10))) == [x * x for x in range(10)]
    assert list(executor.map(et.ex_mul, range(10), [2, 3])) == [0, 3]  # the shortest iterable wins


def test_map_raises_an_items_error_when_its_result_is_reached(executor: RemoteExecutor) -> None:
    results = executor.map(et.ex_divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == [0, 1]
    assert next(results) == [0, 1]
    with pytest.raises(TaskFailed) as caught:
        next(results)
    assert caught.value.index == 2


def test_map_timeout_raises_timeout_error_when_a_result_is_late(executor: RemoteExecutor) -> None:
    got = []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        for value in executor.map(ft.nap, [0, 0, 6000], timeout=1.5):
            got.append(value["ms"])
    assert got == [0, 0]
    assert time.monotonic() - start < 4


def test_map_sends_its_request_when_called_not_when_first_iterated(executor: RemoteExecutor, tmp_path: Path) -> None:
    marker = tmp_path / "mapped"
    results = executor.map(ft.mark, [str(marker)])
    wait_for(marker.exists, 15, what="the map's item to run before anything is read")
    assert [r["pid"] for r in results] == [int(marker.read_text())]


def test_map_yields_each_result_as_it_streams_in(executor: RemoteExecutor, tmp_path: Path) -> None:
    """Lazily: the first result is there while the second item still runs (held by its gate)."""
    open_gate = tmp_path / "open"
    open_gate.touch()
    marker, gate = gated(tmp_path, "second")
    results = executor.map(ft.mark_then_wait, [str(tmp_path / "first"), str(marker)], [str(open_gate), str(gate)])
    assert next(results)["released"] is True
    assert not gate.exists()
    wait_for(marker.exists, 15, what="the second item to start")
    gate.touch()
    assert next(results)["released"] is True


def test_map_over_nothing_yields_nothing(executor: RemoteExecutor) -> None:
    assert list(executor.map(primes, [])) == []


# -- cancel ------------------------------------------------------------------------------------------


def test_cancelling_a_call_not_yet_sent_succeeds_and_a_running_one_cannot_be(exec_server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    never = tmp_path / "never-ran"
    with RemoteExecutor(exec_server.url, max_workers=1) as ex:
        running = ex.submit(ft.mark_then_wait, str(marker), str(gate))
        wait_for(marker.exists, 15, what="the first call to run on the server")
        waiting = ex.submit(ft.append_pid, str(never))
        assert waiting.cancel() is True
        assert waiting.cancelled()
        assert running.cancel() is False
        gate.touch()
        assert running.result(30)["released"] is True
    assert not never.exists(), "a cancelled call reached the server"
    with pytest.raises(cf.CancelledError):
        waiting.result()


# -- shutdown (test_shutdown.py) ---------------------------------------------------------------------


def test_submit_and_map_after_shutdown_raise_runtime_error(exec_server: ServerProcess) -> None:
    ex = RemoteExecutor(exec_server.url, max_workers=1)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(primes, 2)
    with pytest.raises(RuntimeError):
        ex.map(primes, [2])


def test_shutdown_waits_for_every_pending_call(exec_server: ServerProcess) -> None:
    ex = RemoteExecutor(exec_server.url, max_workers=2)
    futures = [ex.submit(ft.nap, 20) for _ in range(12)]
    ex.shutdown()
    assert all(f.done() for f in futures)
    assert [f.result()["ms"] for f in futures] == [20] * 12


def test_shutdown_waits_for_a_map_still_streaming(exec_server: ServerProcess) -> None:
    ex = RemoteExecutor(exec_server.url, max_workers=1)
    results = ex.map(ft.nap, [300, 300])
    ex.shutdown(wait=True)
    assert [r["ms"] for r in results] == [300, 300]  # already read: no request is open any more


def test_shutdown_with_cancel_futures_cancels_the_calls_not_sent(exec_server: ServerProcess, tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    ex = RemoteExecutor(exec_server.url, max_workers=1)
    first = ex.submit(ft.mark_then_wait, str(marker), str(gate))
    wait_for(marker.exists, 15, what="the first call to run")
    rest = [ex.submit(ft.nap, 10) for _ in range(20)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in rest)
    gate.touch()
    assert first.result(30)["released"] is True


def test_shutdown_right_after_a_cancel_does_not_hang(exec_server: ServerProcess) -> None:
    ex = RemoteExecutor(exec_server.url, max_workers=1)
    ex.submit(primes, 10).result(30)
    ex.submit(primes, 10).cancel()
    start = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - start < 10


def test_the_with_statement_shuts_down_after_the_block(exec_server: ServerProcess) -> None:
    with RemoteExecutor(exec_server.url, max_workers=2) as ex:
        assert list(ex.map(primes, [10, 100])) == [4, 25]
        late = ex.submit(ft.nap, 200)
    assert late.done() and late.result()["ms"] == 200
    with pytest.raises(RuntimeError):
        ex.submit(primes, 2)


# -- as_completed and wait (test_as_completed.py, test_wait.py) --------------------------------------


def test_as_completed_yields_each_future_once_as_it_finishes(executor: RemoteExecutor) -> None:
    slow = executor.submit(ft.nap, 800)
    fast = executor.submit(ft.nap, 0)
    order = list(cf.as_completed([slow, fast, fast], timeout=30))
    assert order == [fast, slow]


def test_as_completed_raises_timeout_error_while_a_future_is_pending(executor: RemoteExecutor,
                                                                     tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    done = executor.submit(ft.nap, 0)
    held = executor.submit(ft.mark_then_wait, str(marker), str(gate))
    seen = []
    with pytest.raises(TimeoutError):
        for future in cf.as_completed([done, held], timeout=1.0):
            seen.append(future)
    assert seen == [done]
    gate.touch()
    held.result(30)


def test_wait_first_completed_returns_when_one_call_is_done(executor: RemoteExecutor, tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    held = executor.submit(ft.mark_then_wait, str(marker), str(gate))
    quick = executor.submit(ft.nap, 0)
    done, not_done = cf.wait([held, quick], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert done == {quick} and not_done == {held}
    gate.touch()
    held.result(30)


def test_wait_first_exception_returns_at_the_first_failed_call(executor: RemoteExecutor, tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    held = executor.submit(ft.mark_then_wait, str(marker), str(gate))
    failed = executor.submit(ft.fail, "first")
    done, not_done = cf.wait([held, failed], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert done == {failed} and not_done == {held}
    assert isinstance(failed.exception(), TaskFailed)
    gate.touch()
    held.result(30)


def test_wait_all_completed_returns_every_call_done(executor: RemoteExecutor) -> None:
    futures = [executor.submit(primes, n) for n in (10, 100, 1000)] + [executor.submit(ft.fail)]
    done, not_done = cf.wait(futures, timeout=30, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not_done == set()


def test_wait_with_a_timeout_returns_the_calls_still_running(executor: RemoteExecutor, tmp_path: Path) -> None:
    marker, gate = gated(tmp_path, "hold")
    held = executor.submit(ft.mark_then_wait, str(marker), str(gate))
    quick = executor.submit(ft.nap, 0)
    quick.result(30)
    done, not_done = cf.wait([held, quick], timeout=0.5)
    assert done == {quick} and not_done == {held}
    gate.touch()
    held.result(30)


# -- the one-line move -------------------------------------------------------------------------------


def count_all(pool: cf.Executor) -> tuple[int, list[int]]:
    """Code written for ProcessPoolExecutor, unchanged: submit, map, as_completed."""
    single = pool.submit(primes, 10_000).result()
    futures = [pool.submit(primes, n) for n in (10, 100, 1000)]
    assert {f.result() for f in cf.as_completed(futures)} == {4, 25, 168}
    return single, list(pool.map(primes, [10, 100, 1000]))


def test_code_written_for_process_pool_executor_runs_on_the_server_by_changing_one_line(
        exec_server: ServerProcess) -> None:
    with cf.ProcessPoolExecutor(max_workers=2) as pool:
        local = count_all(pool)
    with RemoteExecutor(exec_server.url) as pool:  # the one line that changed
        remote = count_all(pool)
    assert remote == local == (1229, [4, 25, 168])
