"""HTTP handlers for async jobs: submit, read, list, result, cancel, and the SSE event stream.

`POST /v1/jobs` validates exactly like a synchronous call (404 unknown-task, 422), then stores the job
and only then answers 202: the 202 is the promise that the job will reach a final state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from service.admission import admit_job
from service.body import body_kind, expect_continue, parse_object, read_body, refuse_unknown_fields
from service.jobs.model import STATUSES, Job, new_job_id
from service.jobs.runner import JobRunner
from service.problems import Problem, draining, invalid_argument
from service.responses import bytes_response, json_response
from service.state import SERVICE, Service
from service.validation import call_timeout

_MAX_KEY = 200
_SSE_RECHECK = 1.0  # re-read the store this often while streaming (jobs run by another replica)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", submit_job, expect_handler=expect_continue(app[SERVICE].config.max_body))
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/result", job_result)
    app.router.add_get("/v1/jobs/{id}/events", job_events)


def _jobs(service: Service) -> JobRunner:
    """The job runner; 503 `draining` outside its life (before start-up, after shutdown)."""
    if service.jobs is None:
        raise draining()
    return service.jobs


async def submit_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body_kind(request, binary_ok=False)
    admit_job(service)
    payload = parse_object(await read_body(request, service.config.max_body))
    refuse_unknown_fields(payload, ("task", "args", "timeout"), "a job")
    name = payload.get("task")
    if not isinstance(name, str):
        raise invalid_argument("task", "required, the name of a task", "required string")
    entry = service.catalog.get(name)
    args = payload.get("args", {})
    service.catalog.validate_json(entry, args, "args")  # refuse now what would fail later
    timeout = call_timeout(payload.get("timeout"), service.config.task_timeout, own=entry.spec.timeout)  # as for a call
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= _MAX_KEY:
        raise invalid_argument("Idempotency-Key", f"must be 1 to {_MAX_KEY} characters", "bad length")
    runner = _jobs(service)
    job = Job(id=new_job_id(), task=name, args=args, timeout=timeout or None, idempotency_key=key)
    stored, created = await runner.store.create(job)
    if created:
        runner.notify()
    location = f"/v1/jobs/{stored.id}"
    return json_response(stored.public(), status=202, headers={"Location": location})


async def _load(request: web.Request) -> Job:
    job = await _jobs(request.app[SERVICE]).store.get(request.match_info["id"])
    if job is None:
        raise Problem(404, "unknown-job", f"no job with id {request.match_info['id']!r}")
    return job


async def get_job(request: web.Request) -> web.Response:
    return json_response((await _load(request)).public())


async def list_jobs(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise invalid_argument("status", f"must be one of {', '.join(STATUSES)}", "unknown status")
    raw_limit = request.query.get("limit") or "100"  # `limit=` (empty) is the default, as `status=` is no filter
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise invalid_argument("limit", "must be a whole number from 1 to 1000", "must be from 1 to 1000")
    jobs = await _jobs(request.app[SERVICE]).store.list(status, limit)
    return json_response({"jobs": [job.public() for job in jobs]})


async def job_result(request: web.Request) -> web.StreamResponse:
    job = await _load(request)
    if job.status == "succeeded":
        if job.result_bytes is not None:
            return await bytes_response(request, job.result_bytes)
        return json_response(job.result)
    if job.final:
        raise Problem(409, "job-failed", f"the job ended {job.status}; it has no result", error=job.error)
    raise Problem(409, "job-not-finished", f"the job is {job.status}; poll it or stream its events")


async def cancel_job(request: web.Request) -> web.Response:
    job = await _load(request)
    if job.final:
        raise Problem(409, "job-finished", f"the job already ended {job.status}")
    cancelled = await _jobs(request.app[SERVICE]).cancel(job.id)
    if cancelled is None:
        raise Problem(404, "unknown-job", f"no job with id {job.id!r}")
    if cancelled.status != "cancelled":
        raise Problem(409, "job-finished", f"the job already ended {cancelled.status}")
    return json_response(cancelled.public())


async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: the current state first, then `progress`, `status` and (a generator task) `item` events,
    then `result` or `error`."""
    runner = _jobs(request.app[SERVICE])
    job = await _load(request)
    with runner.events.listen(job.id) as queue:
        job = await runner.store.get(job.id) or job  # re-read once subscribed: no event falls between
        async with sse_response(request) as sse:
            stream = _JobStream(sse)
            await stream.catch_up(job)
            while not stream.ended:
                try:
                    event, data = await asyncio.wait_for(queue.get(), _SSE_RECHECK)
                except TimeoutError:  # quiet: the job may run on another replica; ask the store
                    fresh = await runner.store.get(job.id)
                    if fresh is None:
                        break
                    await stream.catch_up(fresh)
                    continue
                await stream.send(event, data)
    return sse


class _JobStream:
    """One listener's stream: skips repeats, ends after the first result or error event."""

    def __init__(self, sse: Any) -> None:
        self.sse = sse
        self.ended = False
        self._status: str | None = None
        self._progress: dict[str, Any] | None = None

    async def send(self, event: str, data: dict[str, Any]) -> None:
        if self.ended:
            return
        if event == "status":
            if data.get("status") == self._status:
                return
            self._status = data.get("status")
        elif event == "progress":
            if data == self._progress:
                return
            self._progress = data
        elif event != "item":  # a generator's item, as it is yielded; the rest end the stream
            self.ended = True
        await self.sse.send(orjson.dumps(data).decode(), event=event)

    async def catch_up(self, job: Job) -> None:
        """Send what the stored job shows that this stream has not said yet."""
        if job.progress:
            await self.send("progress", job.progress)
        await self.send("status", {"status": job.status})
        if job.status == "succeeded":
            public = job.public()
            keys = ("id", "status", "result", "result_url", "result_size")
            await self.send("result", {k: public[k] for k in keys if k in public})
        elif job.final:
            await self.send("error", job.error or {"status": job.status})
