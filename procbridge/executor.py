"""`RemoteExecutor`: a `concurrent.futures.Executor` whose calls run as tasks on a procbridge server.

Code written for `ProcessPoolExecutor` moves to a server by changing the line that makes the executor:

    with RemoteExecutor("http://127.0.0.1:8080") as pool:      # was: ProcessPoolExecutor()
        print(pool.submit(primes, 100_000).result())
        print(list(pool.map(primes, [10, 100, 1000])))

- `fn` is a registered task function (its task name is used: `@task(name=...)` is honoured when the
  function's module was imported here, else `fn.__name__`) or the task's name as a string.
  Positional arguments are bound to parameter names with `inspect.signature(fn)`; for a name given as a
  string, with the parameter order of the task's schema from `GET /v1/tasks` (fetched once).
- `submit` gives a real `concurrent.futures.Future`: `as_completed`, `wait`, callbacks all work. Its
  exception is the typed `ProblemError` (`TaskFailed`, `InvalidArguments`, `UnknownTask`, ...), a
  `ServiceUnreachable`, or a `TypeError` for arguments that do not bind.
- Calls run on a bounded pool of threads (`max_workers`; default: the server's worker count, read
  once from `GET /v1/workers`, else 8), each one HTTP request at a time. A call still waiting for a
  thread has not been sent: `cancel()` succeeds. A call sent cannot be taken back: `cancel()` is False.
- `map` sends one request to the map endpoint (`POST /v1/tasks/{name}/map`) when it is called (the
  iterables are read at once, as `Executor.map` does) and yields results in input order as they stream
  in; `timeout` counts from the call to `map`, and raises `TimeoutError` when the next result is not
  there in time. `chunksize` is accepted for compatibility: the server sizes its own chunks.
- `shutdown(wait=True, *, cancel_futures=False)` and the `with` statement behave as
  `ThreadPoolExecutor`'s do; a map still streaming counts as pending work.
"""

from __future__ import annotations

import inspect
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any

from procbridge.client import Client
from procbridge.errors import ProcbridgeError

TaskRef = Callable[..., Any] | str
DEFAULT_WORKERS = 8  # when the server's pool size cannot be read
MAX_DEFAULT_WORKERS = 64


def task_name(fn: TaskRef) -> str:
    """The task name `fn` stands for: itself when a string; the name a `@task(name=...)` registered it
    under when the `workers` registry is loaded in this process (it is never imported from here); else
    the function's `__name__`."""
    if isinstance(fn, str):
        if not fn:
            raise TypeError("a task name must be a non-empty string")
        return fn
    if not callable(fn):
        raise TypeError(f"fn must be a task function or a task name, not {type(fn).__name__}")
    registry = sys.modules.get("workers.registry")
    table = getattr(registry, "_REGISTRY", None)
    if isinstance(table, dict):
        for name, spec in list(table.items()):
            if getattr(spec, "fn", None) is fn:
                return str(name)
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{fn!r} has no task name: pass a function registered with @task, or the name as a string")
    return name


def bind_arguments(fn: TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any],
                   params: Callable[[str], list[str]]) -> dict[str, Any]:
    """The JSON arguments of one call: keywords as given, positionals bound to parameter names
    (`inspect.signature` for a function, `params(name)` for a task named by a string). Only what is
    given is sent: the server applies the defaults. A call that does not bind raises TypeError."""
    if not args:
        return dict(kwargs)
    if isinstance(fn, str):
        names = params(fn)
        if len(args) > len(names):
            raise TypeError(f"task {fn!r} takes {len(names)} arguments ({', '.join(names)}); {len(args)} given")
        bound = dict(zip(names, args, strict=False))
        twice = sorted(set(bound) & set(kwargs))
        if twice:
            raise TypeError(f"task {fn!r} got multiple values for argument {twice[0]!r}")
        return {**bound, **kwargs}
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise TypeError(f"cannot read the parameters of {fn!r}: pass its arguments by keyword") from None
    ba = signature.bind(*args, **kwargs)  # TypeError, with Python's own message, when they do not fit
    out: dict[str, Any] = {}
    for pname, value in ba.arguments.items():
        kind = signature.parameters[pname].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{task_name(fn)}: *{pname} cannot be sent; a task takes named arguments")
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[pname] = value
    return out


class RemoteExecutor(Executor):
    """A `concurrent.futures.Executor` over a procbridge server (see the module's doc)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, max_workers: int | None = None,
                 timeout: float | None = None, retries: int = 3) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._client = Client(url, api_key=api_key, timeout=timeout, retries=retries)
        self._max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._shut = False
        self._maps: set[_MapStream] = set()
        self._params: dict[str, list[str]] = {}

    @property
    def client(self) -> Client:
        """The `Client` the executor sends its calls with (for `tasks()`, `workers()`, jobs)."""
        return self._client

    # -- submit -------------------------------------------------------------------------------------

    def submit(self, fn: TaskRef, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule `fn(*args, **kwargs)` on the server; a Future of its result. Raises RuntimeError
        after `shutdown`."""
        pool = self._ensure_pool()
        return pool.submit(self._call, fn, args, kwargs)

    def _call(self, fn: TaskRef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = task_name(fn)
        return self._client.call(name, **bind_arguments(fn, args, kwargs, self._task_params))

    def _ensure_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._pool is not None:
                return self._pool
        size = self._max_workers or self._default_workers()  # a request: outside the lock
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(size, thread_name_prefix="RemoteExecutor")
            return self._pool

    def _default_workers(self) -> int:
        """As many calls in flight as the server has workers (its maximum when elastic): the server
        stays busy, and the calls beyond wait here, where they can still be cancelled."""
        try:
            info = self._client.workers()
        except ProcbridgeError:
            return DEFAULT_WORKERS
        size = info.get("max") or info.get("size") if isinstance(info, dict) else None
        return min(size, MAX_DEFAULT_WORKERS) if isinstance(size, int) and size > 0 else DEFAULT_WORKERS

    def _task_params(self, name: str) -> list[str]:
        """A task's parameter names in order, from its JSON Schema in `GET /v1/tasks` (cached)."""
        with self._lock:
            cached = self._params.get(name)
        if cached is not None:
            return cached
        for entry in self._client.tasks():
            if isinstance(entry, dict) and entry.get("name") == name:
                props = (entry.get("params") or {}).get("properties") or {}
                names = list(props)
                with self._lock:
                    self._params[name] = names
                return names
        raise TypeError(f"task {name!r} is not served at {self._client.url}: cannot bind positional arguments")

    # -- map ----------------------------------------------------------------------------------------

    def map(self, fn: TaskRef, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """`fn` over the iterables through the map endpoint: one request, sent now; the results in input
        order as they arrive. An item's error raises when its result is reached (the iterator then
        ends); `TimeoutError` when a result is not there `timeout` seconds after this call."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        name = task_name(fn)
        items = [bind_arguments(fn, tuple(args), {}, self._task_params) for args in zip(*iterables, strict=False)]
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not items:
                return iter(())
            stream = _MapStream(self, name, items)
            self._maps.add(stream)
        stream.start()
        return _results(stream, len(items), end)

    def _map_done(self, stream: _MapStream) -> None:
        with self._lock:
            self._maps.discard(stream)

    # -- shutdown -----------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; with `cancel_futures`, calls not yet sent are cancelled and maps stop reading;
        with `wait`, return once every pending call and map stream is over. The client is closed when
        the last of them is."""
        with self._lock:
            self._shut = True
            pool, maps = self._pool, list(self._maps)
        if cancel_futures:
            for stream in maps:
                stream.cancel()
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            for stream in maps:
                stream.join()
            self._client.close()
        else:
            threading.Thread(target=self._close_when_idle, args=(pool, maps), daemon=True,
                             name="RemoteExecutor-close").start()

    def _close_when_idle(self, pool: ThreadPoolExecutor | None, maps: list[_MapStream]) -> None:
        if pool is not None:
            pool.shutdown(wait=True)
        for stream in maps:
            stream.join()
        self._client.close()


_DONE = object()


class _MapStream:
    """One map request, read on its own thread into a queue, so that the request goes out when `map`
    is called and the caller can wait for each result with a timeout."""

    def __init__(self, owner: RemoteExecutor, name: str, items: list[dict[str, Any]]) -> None:
        self.owner = owner
        self.name = name
        self.items = items
        self.results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True, name=f"RemoteExecutor-map-{name}")

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        items, self.items = self.items, []  # the request holds them now; drop this reference
        try:
            results = self.owner.client.map(self.name, items, True, return_exceptions=True)
            del items
            try:
                for value in results:
                    if self.stopped.is_set():
                        break
                    self.results.put((isinstance(value, BaseException), value))
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()  # stops reading: the server cancels the items still waiting for a worker
        except BaseException as exc:  # noqa: BLE001 - the whole request failed: each result waiting raises it
            self.results.put((True, exc))
        finally:
            self.results.put((False, _DONE))
            self.owner._map_done(self)

    def cancel(self) -> None:
        self.stopped.set()

    def join(self) -> None:
        self.thread.join()


def _results(stream: _MapStream, count: int, end: float | None) -> Iterator[Any]:
    """The caller's side of a map: `count` results, each within what is left of the timeout."""
    try:
        for _ in range(count):
            try:
                if end is None:
                    failed, value = stream.results.get()
                else:
                    failed, value = stream.results.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError() from None
            if value is _DONE:  # stopped early by shutdown(cancel_futures=True)
                raise CancelledError()
            if failed:
                raise value
            yield value
    finally:
        stream.cancel()


__all__ = ["RemoteExecutor", "bind_arguments", "task_name"]
