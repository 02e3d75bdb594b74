"""HTTP handlers for async jobs: submit, read, list, result, cancel, and the SSE event stream.

`POST /v1/jobs` validates exactly like a synchronous call (404 unknown-task, 422), then stores the job
and only then answers 202: the 202 is the promise that the job will reach a final state.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from service.admission import admit_job
from service.body import body_kind, expect_continue, parse_object, read_body, refuse_unknown_fields
from service.jobs.events import END_RESULT, END_STATUS, QUEUED_ID
from service.jobs.model import QUEUED, STATUSES, EventId, Job, new_created_at, new_job_id
from service.jobs.options import decode_cursor, encode_cursor, scheduling
from service.jobs.runner import JobRunner
from service.problems import Problem, draining, invalid_argument
from service.responses import bytes_response, json_response
from service.state import SERVICE, Service
from service.validation import call_timeout

_MAX_KEY = 200
_MAX_TASK_FILTER = 200
_FIELDS = ("task", "args", "timeout", "priority", "delay", "run_at", "retries", "webhook")
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
    refuse_unknown_fields(payload, _FIELDS, "a job")
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
    created_at = new_created_at()
    plan = scheduling(payload, created_at, entry.spec.retries)
    webhook = payload.get("webhook")
    if webhook is not None:
        webhook = service.webhook_policy.check(webhook)
    runner = _jobs(service)
    job = Job(
        id=new_job_id(created_at), task=name, args=args, timeout=timeout or None, idempotency_key=key,
        created_at=created_at, priority=plan.priority, run_at=plan.run_at, retries=plan.retries, webhook=webhook,
    )
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
    """Newest first, a page at a time: `next` is the cursor of the following page (null after the last)."""
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise invalid_argument("status", f"must be one of {', '.join(STATUSES)}", "unknown status")
    task = request.query.get("task") or None
    if task is not None and len(task) > _MAX_TASK_FILTER:
        raise invalid_argument("task", f"must be at most {_MAX_TASK_FILTER} characters", "too long")
    raw_limit = request.query.get("limit") or "100"  # `limit=` (empty) is the default, as `status=` is no filter
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise invalid_argument("limit", "must be a whole number from 1 to 1000", "must be from 1 to 1000")
    cursor = request.query.get("cursor") or None
    before = decode_cursor(cursor) if cursor is not None else None
    jobs = await _jobs(request.app[SERVICE]).store.list(status, limit + 1, task=task, before=before)
    page = jobs[:limit]
    following = encode_cursor(page[-1].created_at, page[-1].id) if len(jobs) > limit else None
    return json_response({"jobs": [job.public() for job in page], "next": following})


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
    """SSE, every event with an `id:`: the job's logged events (a job never claimed yet: `status: queued`,
    id 0-0), then the final status (`end-1`) and the `result` or `error` (`end-2`), then the end. With
    `Last-Event-ID`, only the events after that id (events.py)."""
    runner = _jobs(request.app[SERVICE])
    after, ended = _last_event_id(request)
    job = await _load(request)
    with runner.events.listen(job.id) as woken:
        async with sse_response(request) as sse:
            if ended == END_RESULT:  # it saw the whole stream
                return sse
            if ended is None and after is None and not job.final and job.runs == 0:
                await sse.send(orjson.dumps({"status": QUEUED}).decode(), event="status", id=str(QUEUED_ID))
                after = QUEUED_ID
            while True:
                woken.clear()
                batch = await runner.events.read(job.id, after)
                for logged in batch.events if ended is None else ():  # `end-1` seen: so was every logged one
                    await sse.send(logged.data.decode(), event=logged.event, id=str(logged.id))
                    after = logged.id
                if batch.final is not None:
                    for event_id, event, data in batch.final:
                        if event_id != ended:
                            await sse.send(data.decode(), event=event, id=event_id)
                    break
                if batch.gone:
                    break  # expired while it streamed
                with contextlib.suppress(TimeoutError):  # quiet: the job may run on another replica
                    await asyncio.wait_for(woken.wait(), _SSE_RECHECK)
    return sse


def _last_event_id(request: web.Request) -> tuple[EventId | None, str | None]:
    """(the logged event to resume after, or which final event was the last one seen)."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw:
        return None, None
    if raw in (END_STATUS, END_RESULT):
        return None, raw
    try:
        return EventId.parse(raw), None
    except ValueError:
        raise invalid_argument("Last-Event-ID", "is not an event id this stream sent", "bad event id") from None
