"""The asyncio client: `AsyncClient` and its `AsyncJob`, the same API as procbridge/client.py with
every request awaited. Streamed answers (`stream`, `map`, `map_unordered`, `AsyncJob.events`) are
async iterators: `async for item in client.map(...)`; the request goes out at the first item."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any

import httpx

from procbridge import _core, _events
from procbridge._core import END, FINAL_STATUSES, Backoff, Request, Settings
from procbridge._events import Event
from procbridge.errors import ProblemError, ProcbridgeError, ProtocolError, ServiceUnreachable, Timeout


class AsyncClient:
    """A procbridge service, called from asyncio. Same arguments and methods as `Client`, awaited:

        async with AsyncClient("http://127.0.0.1:8080") as pb:
            await pb.call("primes", limit=1000)
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float | None = None,
                 retries: int = 3) -> None:
        self._settings = Settings.resolve(url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(**self._settings.http_options())

    @property
    def url(self) -> str:
        return self._settings.url

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- sending ----------------------------------------------------------------------------------

    async def _open(self, req: Request, headers: Mapping[str, str] | None = None, *, retries: int | None = None,
                    timeout: httpx.Timeout | None = None) -> httpx.Response:
        backoff = Backoff(self._settings, retries)
        while True:
            try:
                request = self._http.build_request(
                    req.method, req.path, params=req.params, content=req.content,
                    headers={**req.headers(), **(headers or {})},
                    timeout=timeout if timeout is not None else self._settings.http_timeout(),
                )
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                if _core.is_connect_error(exc) and (delay := backoff.after_connect_error()) is not None:
                    await asyncio.sleep(delay)
                    continue
                raise _core.transport_error(exc, self.url + req.path) from None
            if response.status_code < 300:
                return response
            try:
                body = await self._read(response, req)
            finally:
                await response.aclose()
            error = _core.error_for(response, body)
            if (delay := backoff.after_answer(error)) is None:
                raise error
            await asyncio.sleep(delay)

    async def _read(self, response: httpx.Response, req: Request) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise _core.transport_error(exc, self.url + req.path) from None

    async def _request(self, req: Request, headers: Mapping[str, str] | None = None, *,
                       retries: int | None = None) -> tuple[httpx.Response, bytes]:
        response = await self._open(req, headers, retries=retries)
        try:
            return response, await self._read(response, req)
        finally:
            await response.aclose()

    async def _json(self, req: Request, headers: Mapping[str, str] | None = None, *,
                    retries: int | None = None) -> Any:
        response, body = await self._request(req, headers, retries=retries)
        return _core.parse_json(body, f"the answer to {req.method} {req.path}", response.status_code)

    async def _lines(self, req: Request, response: httpx.Response) -> AsyncGenerator[str, None]:
        """The lines of an open streamed answer; the answer is closed however the iteration ends."""
        try:
            lines = response.aiter_lines()
            while True:
                try:
                    line = await anext(lines)
                except StopAsyncIteration:
                    return
                except httpx.HTTPError as exc:
                    raise _core.transport_error(exc, self.url + req.path) from None
                yield line
        finally:
            await response.aclose()

    # -- tasks ------------------------------------------------------------------------------------

    async def call(self, task: str, data: bytes | bytearray | memoryview | None = None, /, **args: Any) -> Any:
        """As `Client.call`."""
        response, body = await self._request(_core.call_request(task, data, args))
        return _core.decode_result(response, body)

    async def stream(self, task: str, data: bytes | bytearray | memoryview | None = None, /,
                     **args: Any) -> AsyncIterator[Any]:
        """As `Client.stream`: `async for item in client.stream("st_count", n=3)`."""
        req = _core.call_request(task, data, args)
        response = await self._open(req, timeout=httpx.Timeout(self._settings.timeout,
                                                               connect=_core.CONNECT_TIMEOUT))
        if _core.media_type(response) != _core.NDJSON_TYPE:
            try:
                body = await self._read(response, req)
            finally:
                await response.aclose()
            yield _core.decode_result(response, body)
            return
        lines = self._lines(req, response)
        try:
            async for line in lines:
                item = _core.stream_line(line)
                if item is END:
                    if line.strip():
                        return
                    continue
                yield item
        finally:
            await lines.aclose()
        raise ServiceUnreachable("the stream ended without its end line")

    def map(self, task: str, items: Iterable[Mapping[str, Any]], ordered: bool = True, *,
            return_exceptions: bool = False, timeout: float | None = None,
            task_timeout: float | None = None) -> AsyncIterator[Any]:
        """As `Client.map`, an async iterator (the request goes out at the first item; `timeout` counts
        from there)."""
        return self._map_values(task, list(items), ordered, return_exceptions, timeout, task_timeout)

    def map_unordered(self, task: str, items: Iterable[Mapping[str, Any]], *, return_exceptions: bool = False,
                      timeout: float | None = None, task_timeout: float | None = None
                      ) -> AsyncIterator[tuple[int, Any]]:
        """As `Client.map_unordered`: `(index, result)` pairs in completion order."""
        return self._map_pairs(task, list(items), False, return_exceptions, timeout, task_timeout)

    async def _map_values(self, task: str, items: list[Mapping[str, Any]], ordered: bool,
                          return_exceptions: bool, timeout: float | None,
                          task_timeout: float | None) -> AsyncIterator[Any]:
        pairs = self._map_pairs(task, items, ordered, return_exceptions, timeout, task_timeout)
        try:
            async for _, value in pairs:
                yield value
        finally:
            await pairs.aclose()

    async def _map_pairs(self, task: str, items: list[Mapping[str, Any]], ordered: bool,
                         return_exceptions: bool, timeout: float | None,
                         task_timeout: float | None) -> AsyncGenerator[tuple[int, Any], None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        req = _core.map_request(task, items, ordered, task_timeout)
        order = _core.MapOrder(len(items))
        read = timeout if timeout is not None else self._settings.timeout
        try:
            async with asyncio.timeout_at(None if deadline is None else _loop_time(deadline)) as scope:
                response = await self._open(req, timeout=httpx.Timeout(
                    read, connect=min(read or _core.CONNECT_TIMEOUT, _core.CONNECT_TIMEOUT)))
                lines = self._lines(req, response)
                try:
                    async for line in lines:
                        parsed = _core.map_line(line)
                        if parsed is None:
                            continue
                        order.take(parsed[0])
                        if isinstance(parsed[1], ProblemError) and not return_exceptions:
                            raise parsed[1]
                        scope.reschedule(None)  # the consumer's time between items is not ours to bound
                        yield parsed
                        scope.reschedule(None if deadline is None else _loop_time(deadline))
                        if deadline is not None and time.monotonic() > deadline and len(order.seen) < order.total:
                            raise Timeout("map: the results did not all arrive within the timeout")
                finally:
                    await lines.aclose()
                order.finish()
        except (TimeoutError, Timeout):
            raise Timeout("map: the results did not all arrive within the timeout") from None

    async def tasks(self) -> list[dict[str, Any]]:
        doc = await self._json(Request("GET", "/v1/tasks"))
        return list(_field(doc, "tasks", list))

    async def workers(self) -> dict[str, Any]:
        doc = await self._json(Request("GET", "/v1/workers"))
        _field(doc, "workers", list)
        return dict(doc)

    async def health(self) -> bool:
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        return await self._probe("/readyz")

    async def _probe(self, path: str) -> bool:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- jobs -------------------------------------------------------------------------------------

    async def submit(self, task: str, args: Mapping[str, Any] | None = None, /, *,
                     idempotency_key: str | None = None, priority: int | None = None, delay: float | None = None,
                     run_at: float | None = None, retries: int | None = None, webhook: str | None = None,
                     timeout: float | None = None, **kwargs: Any) -> AsyncJob:
        """As `Client.submit`."""
        req, headers = _core.submit_request(task, _core.merge_args(args, kwargs), idempotency_key, priority,
                                            delay, timeout, run_at=run_at, retries=retries, webhook=webhook)
        doc = await self._json(req, headers)
        return AsyncJob(self, str(_field(doc, "id", str)), doc)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def jobs(self, status: str | None = None, limit: int | None = None,
                   task: str | None = None) -> list[dict[str, Any]]:
        """As `Client.jobs`: one page."""
        doc = await self._json(_core.jobs_request(status, limit, task))
        return _core.jobs_page(doc)[0]

    async def iter_jobs(self, status: str | None = None, task: str | None = None,
                        page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """As `Client.iter_jobs`: `async for doc in client.iter_jobs(task="resize")`."""
        cursor: str | None = None
        while True:
            page, cursor = _core.jobs_page(await self._json(_core.jobs_request(status, page_size, task, cursor)))
            for doc in page:
                yield doc
            if cursor is None:
                return


class AsyncJob(_core.JobHandle):
    """An async job of an `AsyncClient`; the methods of `Job`, awaited (`events()` is an async iterator)."""

    _client: AsyncClient

    async def info(self) -> dict[str, Any]:
        doc = await self._client._json(Request("GET", _core.job_path(self.id)))
        if not isinstance(doc, dict):
            raise ProtocolError(f"the job document is not an object: {doc!r}")
        self._doc = doc
        return doc

    async def status(self) -> str:
        return str((await self.info()).get("status"))

    async def cancel(self) -> dict[str, Any]:
        doc = await self._client._json(Request("DELETE", _core.job_path(self.id)), retries=0)
        self._doc = doc
        return dict(doc)

    async def events(self, timeout: float | None = None,
                     last_event_id: str | None = None) -> AsyncGenerator[Event, None]:
        """As `Job.events`, resumed the same way: `async for event in job.events()` (the request goes out
        at the first event)."""
        req = _core.events_request(self.id)
        resume = _events.StreamResume(self._client._settings, self._client.url + req.path, last_event_id)
        http_timeout = httpx.Timeout(timeout, connect=_core.CONNECT_TIMEOUT)
        while not resume.finished:
            try:
                response = await self._client._open(req, resume.headers(), retries=0, timeout=http_timeout)
            except _events.RESUMABLE as exc:
                await asyncio.sleep(resume.broke(exc) or 0.0)  # a failure to open is retried or raised
                continue
            lines = self._client._lines(req, response)
            parser = _events.SSEParser()
            error: ProcbridgeError | None = None
            try:
                while True:
                    try:
                        line = await anext(lines)
                    except StopAsyncIteration:
                        break
                    except _events.RESUMABLE as exc:
                        error = exc
                        break
                    event = parser.feed(line)
                    if event is not None:
                        resume.seen(event)
                        yield event
                        if resume.finished:
                            return
            finally:
                await lines.aclose()
            delay = resume.broke(error)
            if delay is None:
                return  # a stream that cannot be resumed ended
            await asyncio.sleep(delay)

    async def result(self, timeout: float | None = None) -> Any:
        """As `Job.result`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    doc = self._doc if self._doc and self._doc.get("status") in FINAL_STATUSES else None
                    if doc is None:
                        doc = await self._wait()
                    if doc is not None:
                        return await self._outcome(doc)
        except TimeoutError:
            raise Timeout(f"job {self.id} did not end within the timeout") from None

    async def _wait(self) -> dict[str, Any] | None:
        events = self.events()
        try:
            async for event in events:
                if event.type == "result":
                    return {"status": "succeeded", **(event.data if isinstance(event.data, dict) else {})}
                if event.type == "error":
                    raise _core.job_error(event.data if isinstance(event.data, dict) else {})
        finally:
            await events.aclose()
        # ended without its final event, from a service that cannot resume it (no event ids): ask
        doc = await self.info()
        if doc.get("status") in FINAL_STATUSES:
            return doc
        await asyncio.sleep(0.05)
        return None

    async def _outcome(self, doc: dict[str, Any]) -> Any:
        if doc.get("status") == "succeeded":
            if doc.get("result_url"):
                _, body = await self._client._request(Request("GET", _core.job_path(self.id) + "/result",
                                                              accept="*/*"))
                return body
            return doc.get("result")
        error = doc.get("error")
        raise _core.job_error(error if isinstance(error, dict) else {"status": doc.get("status")})


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def _field(doc: Any, name: str, kind: type) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get(name), kind):
        raise ProtocolError(f"expected an object with {name!r} ({kind.__name__}), got {str(doc)[:200]}")
    return doc[name]
