"""workers.executor_url: `--executor` parsed once into an ExecutorURL."""

from __future__ import annotations

import pytest

from workers.executor_url import LOCAL, ExecutorURL, parse_executor


def test_local_and_dask():
    assert parse_executor("local") is LOCAL
    assert parse_executor("dask://sched:8786") == ExecutorURL("dask", "sched", 8786, "process")
    assert parse_executor("dask://10.0.0.5:1?isolate=thread") == ExecutorURL("dask", "10.0.0.5", 1, "thread")
    assert parse_executor("dask://sched:8786").scheduler == "tcp://sched:8786"
    assert str(parse_executor("dask://sched:8786")) == "dask://sched:8786?isolate=process"
    assert parse_executor(str(parse_executor("dask://s:9?isolate=thread"))) == ExecutorURL("dask", "s", 9, "thread")
    with pytest.raises(ValueError):
        LOCAL.scheduler  # noqa: B018


@pytest.mark.parametrize("text", ["", "Local", "foo", "dask://nohost", "dask://sched:8786?isolate=fork",
                                  "dask://sched:0", "dask://sched:65536", "tcp://sched:1", "dask://u@sched:1",
                                  "dask://sched:1?isolate=thread&x=1", "dask://sched:1/path"])
def test_refused(text: str):
    with pytest.raises(ValueError, match=r"must be 'local' or dask://HOST:PORT \(optionally"):
        parse_executor(text)


@pytest.mark.parametrize(("text", "address", "isolate"), [
    ("dask://127.0.0.1:8786", "tcp://127.0.0.1:8786", "process"),
    ("dask://sched:1?isolate=thread", "tcp://sched:1", "thread"),
    ("dask://sched:08786?isolate=process", "tcp://sched:8786", "process"),
])
def test_the_dask_executor_is_opened_with_the_parsed_scheduler_and_isolation(text: str, address: str, isolate: str):
    from service.config import Config
    from workers.backends import open_executor
    from workers.dask.executor import DaskExecutor

    executor = open_executor(text, Config(workers=1))
    assert isinstance(executor, DaskExecutor)
    assert (executor.options.address, executor.options.isolate) == (address, isolate)
