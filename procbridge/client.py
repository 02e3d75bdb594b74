"""The synchronous client: `Client` and its `Job`. See docs/client.md; procbridge/aio.py is the same
API for asyncio, and procbridge/_core.py and procbridge/_events.py hold everything the two share (the
resumed job event stream is procbridge/_sync_events.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import httpx

from procbridge import _core
from procbridge._core import END, FINAL_STATUSES, Backoff, Request, Settings
from procbridge._events import Event
from procbridge._sync_events import EventStream
from procbridge.errors import ProblemError, ProtocolError, Timeout

T = TypeVar("T")


class Client:
    """A procbridge service, called synchronously.

        with Client("http://127.0.0.1:8080") as pb:
            pb.call("primes", limit=1000)          # -> 168

    `url` and `api_key` default to $PROCBRIDGE_URL (else http://127.0.0.1:8080) and
    $PROCBRIDGE_API_KEY. `timeout` (seconds, None: no limit) bounds each request and the total time
    spent retrying it; `retries` is how often a 503 `overloaded`, a 429 or a failed connect is retried.
    Safe to share between threads (httpx's connection pool is).
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float | None = None,
                 retries: int = 3) -> None:
        self._settings = Settings.resolve(url, api_key, timeout, retries)
        self._http = httpx.Client(**self._settings.http_options())

    @property
    def url(self) -> str:
        return self._settings.url

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- sending ----------------------------------------------------------------------------------

    def _open(self, req: Request, headers: Mapping[str, str] | None = None, *, retries: int | None = None,
              timeout: httpx.Timeout | None = None) -> httpx.Response:
        """Send `req` (retrying as Backoff allows); a successful answer, its body not read yet."""
        backoff = Backoff(self._settings, retries)
        while True:
            try:
                request = self._http.build_request(
                    req.method, req.path, params=req.params, content=req.content,
                    headers={**req.headers(), **(headers or {})},
                    timeout=timeout if timeout is not None else self._settings.http_timeout(),
                )
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                if _core.is_connect_error(exc) and (delay := backoff.after_connect_error()) is not None:
                    time.sleep(delay)
                    continue
                raise _core.transport_error(exc, self.url + req.path) from None
            if response.status_code < 300:
                return response
            try:
                body = self._read(response, req)
            finally:
                response.close()
            error = _core.error_for(response, body)
            if (delay := backoff.after_answer(error)) is None:
                raise error
            time.sleep(delay)

    def _read(self, response: httpx.Response, req: Request) -> bytes:
        try:
            return response.read()
        except httpx.HTTPError as exc:
            raise _core.transport_error(exc, self.url + req.path) from None

    def _request(self, req: Request, headers: Mapping[str, str] | None = None, *,
                 retries: int | None = None) -> tuple[httpx.Response, bytes]:
        response = self._open(req, headers, retries=retries)
        try:
            return response, self._read(response, req)
        finally:
            response.close()

    def _json(self, req: Request, headers: Mapping[str, str] | None = None, *, retries: int | None = None) -> Any:
        response, body = self._request(req, headers, retries=retries)
        return _core.parse_json(body, f"the answer to {req.method} {req.path}", response.status_code)

    def _lines(self, req: Request, headers: Mapping[str, str] | None = None, *, retries: int | None = None,
               timeout: httpx.Timeout | None = None) -> _Lines:
        return _Lines(self, req, self._open(req, headers, retries=retries, timeout=timeout))

    # -- tasks ------------------------------------------------------------------------------------

    def call(self, task: str, data: bytes | bytearray | memoryview | None = None, /, **args: Any) -> Any:
        """Run `task` and return its result: JSON data, bytes for a binary result, a list of the items
        for a generator task. With `data`, the bytes are the binary body (the task's `bytes`
        parameter) and `args` go in the query string. Raises the ProblemError subclass of the answer."""
        req = _core.call_request(task, data, args)
        response, body = self._request(req)
        return _core.decode_result(response, body)

    def stream(self, task: str, data: bytes | bytearray | memoryview | None = None, /,
               **args: Any) -> Iterator[Any]:
        """A generator task's items, each as soon as the service sends it (read incrementally). The
        task's error after some items raises when reached. A task that is not a generator yields its
        one result. Close the iterator (or leave a `with` block on it) to stop the stream early."""
        req = _core.call_request(task, data, args)
        response = self._open(req, timeout=httpx.Timeout(self._settings.timeout,
                                                         connect=_core.CONNECT_TIMEOUT))
        if _core.media_type(response) != _core.NDJSON_TYPE:
            try:
                body = self._read(response, req)
            finally:
                response.close()
            return iter([_core.decode_result(response, body)])
        return _Items(_Lines(self, req, response), _stream_items())

    def map(self, task: str, items: Iterable[Mapping[str, Any]], ordered: bool = True, *,
            return_exceptions: bool = False, timeout: float | None = None,
            task_timeout: float | None = None) -> Iterator[Any]:
        """`task` over each argument mapping of `items` in one request; the results as the answer
        streams in: in input order, or with `ordered=False` in completion order. An item's error raises
        its ProblemError (with `.index`) when reached, or is yielded as the exception object with
        `return_exceptions=True`. The request is sent now; `timeout` (seconds from now) bounds the whole
        iteration (then `procbridge.Timeout`); `task_timeout` shortens each item's task timeout."""
        stream = self._map(task, items, ordered, timeout, task_timeout)
        return _Items(stream.lines, _map_values(stream, return_exceptions))

    def map_unordered(self, task: str, items: Iterable[Mapping[str, Any]], *, return_exceptions: bool = False,
                      timeout: float | None = None, task_timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        """Like `map(ordered=False)`, but yields `(index, result)` pairs, so each result can be matched
        to its item."""
        stream = self._map(task, items, False, timeout, task_timeout)
        return _Items(stream.lines, _map_pairs(stream, return_exceptions))

    def _map(self, task: str, items: Iterable[Mapping[str, Any]], ordered: bool, timeout: float | None,
             task_timeout: float | None) -> _MapStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        req = _core.map_request(task, items, ordered, task_timeout)
        total = len(_core.parse_json(req.content or b"{}", "items")["items"])
        read = timeout if timeout is not None else self._settings.timeout
        lines = self._lines(req, timeout=httpx.Timeout(read, connect=min(read or _core.CONNECT_TIMEOUT,
                                                                         _core.CONNECT_TIMEOUT)))
        return _MapStream(lines, _core.MapOrder(total), deadline)

    def tasks(self) -> list[dict[str, Any]]:
        """The service's tasks: [{"name", "doc", "params": <JSON Schema>}, ...]."""
        doc = self._json(Request("GET", "/v1/tasks"))
        return list(_field(doc, "tasks", list))

    def workers(self) -> dict[str, Any]:
        """The pool: {"size", "min", "max", "workers": [{"pid", "state", "task", "tasks_done"}, ...], ...}."""
        doc = self._json(Request("GET", "/v1/workers"))
        _field(doc, "workers", list)
        return dict(doc)

    def health(self) -> bool:
        """True when the service answers /healthz with 200; False when it does not, or cannot be reached."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """True when /readyz answers 200 (a worker is alive, not draining); False otherwise."""
        return self._probe("/readyz")

    def _probe(self, path: str) -> bool:
        try:
            response = self._http.get(path)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, task: str, args: Mapping[str, Any] | None = None, /, *, idempotency_key: str | None = None,
               priority: int | None = None, delay: float | None = None, run_at: float | None = None,
               retries: int | None = None, webhook: str | None = None, timeout: float | None = None,
               **kwargs: Any) -> Job:
        """Store a job running `task`; returns its `Job` once the service has stored it (202).

        The task's arguments are the keywords, and/or the mapping `args` (positional): pass an argument
        whose name is one of this method's keywords there, e.g. `submit("t", {"timeout": 5})`.
        Options of the job, each sent only when given (else the service's default holds):
        `idempotency_key` (the same key returns the same job), `priority` (an integer, higher runs
        first; 0), `delay` (seconds from now) or `run_at` (epoch seconds), not both (at once),
        `retries` (how often a failed attempt runs again; the task's `retries`), `webhook` (an http(s)
        URL the service POSTs the final job document to; hosts allowed by the service's
        `--webhook-allow` only), `timeout` (the task timeout of each attempt, seconds)."""
        req, headers = _core.submit_request(task, _core.merge_args(args, kwargs), idempotency_key, priority,
                                            delay, timeout, run_at=run_at, retries=retries, webhook=webhook)
        doc = self._json(req, headers)
        return Job(self, str(_field(doc, "id", str)), doc)

    def job(self, job_id: str) -> Job:
        """The job with this id (nothing is asked of the service until a method is called)."""
        return Job(self, job_id)

    def jobs(self, status: str | None = None, limit: int | None = None,
             task: str | None = None) -> list[dict[str, Any]]:
        """One page of stored jobs, newest first, as documents: `status` and `task` filter, `limit`
        caps (the service's default 100, at most 1000). `iter_jobs` goes through every page."""
        doc = self._json(_core.jobs_request(status, limit, task))
        return _core.jobs_page(doc)[0]

    def iter_jobs(self, status: str | None = None, task: str | None = None,
                  page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every stored job (filtered by `status` and `task`), newest first, one request per `page_size`
        jobs as the iteration reaches them (following the listing's `next` cursor): each job once,
        jobs submitted meanwhile (newer than the first page) not at all."""
        cursor: str | None = None
        while True:
            page, cursor = _core.jobs_page(self._json(_core.jobs_request(status, page_size, task, cursor)))
            yield from page
            if cursor is None:
                return


class Job(_core.JobHandle):
    """An async job of a `Client`: `.id`, and methods that ask the service about it."""

    _client: Client

    def info(self) -> dict[str, Any]:
        """The job document: {"id", "task", "status", "created_at", ..., "progress", "result"?, "error"?}."""
        doc = self._client._json(Request("GET", _core.job_path(self.id)))
        if not isinstance(doc, dict):
            raise ProtocolError(f"the job document is not an object: {doc!r}")
        self._doc = doc
        return doc

    def status(self) -> str:
        """"queued", "running", "succeeded", "failed" or "cancelled"."""
        return str(self.info().get("status"))

    def cancel(self) -> dict[str, Any]:
        """Cancel the job (a running job's worker is stopped); the job document. JobFinished if it had ended."""
        doc = self._client._json(Request("DELETE", _core.job_path(self.id)), retries=0)
        self._doc = doc
        return dict(doc)

    def events(self, timeout: float | None = None, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events as they happen (read incrementally): `status` (`running`; `queued` again,
        with `attempt`, `retry_at` and `error`, when a failed attempt will be retried), `progress` and
        `item`, then the final `result` or `error` event; then the iterator ends. Each `Event` has its
        `id`. A connection that breaks is opened again with `Last-Event-ID`, so every event comes once
        (`procbridge._events.StreamResume`: up to the client's `retries` failed reopenings in a row, then
        ServiceUnreachable). `last_event_id`: go on after that event (the `id` of the last event a
        stream read earlier, in this process or another). `timeout`: the longest wait for the next
        event (then `procbridge.Timeout`); None waits as long as the job runs. The request is sent
        now; close the iterator (or leave a `with` block on it) to stop early."""
        return EventStream(self._client, self.id, timeout, last_event_id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end (on its event stream, resumed as `events` does) and return its result:
        JSON data, or bytes for a binary result. A failed job raises its error (TaskFailed, TaskTimeout,
        ...), a cancelled one JobCancelled; `timeout` seconds without an end raise `procbridge.Timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            doc = self._doc if self._doc and self._doc.get("status") in FINAL_STATUSES else None
            if doc is None:
                doc = self._wait(deadline)
            if doc is not None:
                return self._outcome(doc)

    def _wait(self, deadline: float | None) -> dict[str, Any] | None:
        """The final job (as its last event shows it), or None after a stream that ended early."""
        try:
            with EventStream(self._client, self.id, None, None, deadline) as events:
                for event in events:
                    if event.type == "result":
                        return {"status": "succeeded", **(event.data if isinstance(event.data, dict) else {})}
                    if event.type == "error":
                        raise _core.job_error(event.data if isinstance(event.data, dict) else {})
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Timeout(f"job {self.id} did not end within the timeout")
        except Timeout:
            raise Timeout(f"job {self.id} did not end within the timeout") from None
        # The stream ended without its final event, and could not be resumed (a service that sends no
        # event ids): the document says whether the job ended; if not, wait on a new stream.
        doc = self.info()
        if doc.get("status") in FINAL_STATUSES:
            return doc
        time.sleep(0.05)
        return None

    def _outcome(self, doc: dict[str, Any]) -> Any:
        status = doc.get("status")
        if status == "succeeded":
            if doc.get("result_url"):
                _, body = self._client._request(Request("GET", _core.job_path(self.id) + "/result",
                                                               accept="*/*"))
                return body
            return doc.get("result")
        error = doc.get("error")
        raise _core.job_error(error if isinstance(error, dict) else {"status": status})


# -- reading answers line by line -------------------------------------------------------------------


class _Lines:
    """The lines of an open streamed answer; closes it at the end, on error, or when closed."""

    def __init__(self, client: Client, req: Request, response: httpx.Response) -> None:
        self.where = client.url + req.path
        self.response = response
        self._it = response.iter_lines()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise
        except httpx.HTTPError as exc:
            self.close()
            raise _core.transport_error(exc, self.where) from None

    def close(self) -> None:
        self.response.close()


class _Items(Generic[T]):
    """An iterator over a streamed answer that closes the connection when done, on error, on
    `close()`, at the end of a `with` block, or when dropped."""

    def __init__(self, lines: _Lines, parse: Any) -> None:
        self._lines = lines
        self._gen: Iterator[T] = parse(lines)

    def __iter__(self) -> _Items[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()
        self._lines.close()

    def __enter__(self) -> _Items[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to close
            self._lines.close()


def _stream_items() -> Any:
    def parse(lines: Iterable[str]) -> Iterator[Any]:
        for line in lines:
            item = _core.stream_line(line)
            if item is END:
                if line.strip():
                    return
                continue
            yield item
        # an answer without its end line: the connection broke (or the service was stopped)
        raise _core.ServiceUnreachable("the stream ended without its end line")

    return parse


class _MapStream:
    def __init__(self, lines: _Lines, order: _core.MapOrder, deadline: float | None) -> None:
        self.lines = lines
        self.order = order
        self.deadline = deadline

    def pairs(self, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
        try:
            for line in lines:
                parsed = _core.map_line(line)
                if parsed is None:
                    continue
                self.order.take(parsed[0])
                yield parsed
                if self.deadline is not None and time.monotonic() > self.deadline and \
                        len(self.order.seen) < self.order.total:
                    raise Timeout("map: the results did not all arrive within the timeout")
        except Timeout:
            raise Timeout("map: the results did not all arrive within the timeout") from None
        self.order.finish()


def _map_pairs(stream: _MapStream, return_exceptions: bool) -> Any:
    def parse(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
        for index, value in stream.pairs(lines):
            if isinstance(value, ProblemError) and not return_exceptions:
                raise value
            yield index, value

    return parse


def _map_values(stream: _MapStream, return_exceptions: bool) -> Any:
    def parse(lines: Iterable[str]) -> Iterator[Any]:
        for _, value in _map_pairs(stream, return_exceptions)(lines):
            yield value

    return parse


def _field(doc: Any, name: str, kind: type) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get(name), kind):
        raise ProtocolError(f"expected an object with {name!r} ({kind.__name__}), got {str(doc)[:200]}")
    return doc[name]
