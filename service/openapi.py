"""The OpenAPI 3.1 document of the whole API, each task's argument schema included.

Each task gets its own path (/v1/tasks/primes, ...) with its JSON Schema as the request body, so
generated clients and fuzzers see the real arguments; the generic /v1/tasks/{name} stays documented.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.jobs.options import MAX_DELAY, MAX_RETRIES
from service.query_args import is_json_text
from service.stream_handler import stream_answer
from service.validation import TaskCatalog, TaskEntry

VERSION = "0.1.0"

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SSE_EVENT = {"type": "object", "description": "one server-sent event; `data` is JSON text",  # as schemathesis reads it
              "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}
_CALL_ERRORS = {
    "400": _problem("invalid-json: the body is not a JSON object"),
    "401": _problem("unauthorized"),
    "404": _problem("unknown-task"),
    "413": _problem("payload-too-large"),
    "415": _problem("unsupported-media-type"),
    "422": _problem("invalid-arguments (the detail names the field)"),
    "429": _problem("rate-limited"),
    "500": _problem("task-failed: the task raised (detail: exception type and message)"),
    "502": _problem("worker-crashed: the worker died while running the task"),
    "503": _problem("overloaded (admission queue full) or draining (shutting down)"),
    "504": _problem("task-timeout: the task ran past its timeout; its worker was replaced"),
}

_TIMEOUT_PARAM = {
    "name": "timeout", "in": "query", "required": False,
    "description": "seconds the task may run before its worker is killed (default --task-timeout)",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}


_QUERY_ARG_DOC = ("only with an application/octet-stream body, whose bytes go to {bytes_param}; with a JSON "
                  "body this argument goes in the body, and giving it in the query string is refused (422)")
_JSON_TEXT_DOC = "; in the query string it is JSON text (URL-encoded), e.g. ?{name}=" + "{{...}}"


def _binary_query_params(entry: TaskEntry, schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A binary call takes the task's other arguments from the query string (validate_binary, with
    `entry.query_model`): each one as a query parameter with its schema from the task's JSON Schema,
    typed as service/query_args.py parses it (`?size=64` is the integer 64), so a client generator
    knows where `?rounds=3` goes; an object or array is JSON text (`content: application/json`).
    `timeout` stays the call's own."""
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    description = _QUERY_ARG_DOC.format(bytes_param=entry.spec.bytes_param)
    params = []
    for arg in entry.query_model.model_fields:
        if arg == _TIMEOUT_PARAM["name"]:
            continue
        param: dict[str, Any] = {"name": arg, "in": "query", "required": arg in required, "description": description}
        if is_json_text(entry.spec.hints.get(arg)):
            param["description"] += _JSON_TEXT_DOC.format(name=arg)
            param["content"] = {"application/json": {"schema": properties.get(arg, {})}}
        else:
            param["schema"] = properties.get(arg, {})
        params.append(param)
    return params


def _task_operation(
    name: str, doc: str, schema: dict[str, Any] | None, binary: bool, returns_bytes: bool, body_required: bool = True
) -> dict[str, Any]:
    """POST /v1/tasks/<name>. `body_required`: False for a task without required arguments, which
    a POST with neither a body nor a Content-Type calls without arguments."""
    content: dict[str, Any] = {"application/json": {"schema": schema or {"type": "object"}}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    ok_content: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/TaskResult"}}}
    if returns_bytes or schema is None:
        ok_content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        ok_content["image/png"] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "summary": f"Run {name} and wait for its result" if schema else "Run a task and wait for its result",
        "description": doc or "",
        "operationId": f"call_{name}" if schema else "call_task",
        "tags": ["tasks"],
        "parameters": [_TIMEOUT_PARAM],
        "requestBody": {"required": body_required, "content": content},
        "responses": {"200": {"description": "the task's result", "content": ok_content}, **_CALL_ERRORS},
    }


def build_openapi(catalog: TaskCatalog, *, keys_required: bool = True) -> bytes:
    """The document; `keys_required`: the service runs with --api-keys, so every /v1/ operation needs
    the bearer key (else the key is optional there: `security: [{"bearer": []}, {}]`)."""
    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "summary": "Liveness: 200 while the event loop runs", "operationId": "healthz", "tags": ["ops"],
            "responses": {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "alive")},
        }},
        "/readyz": {"get": {
            "summary": "Readiness: 200 with a live worker and not draining, else 503",
            "operationId": "readyz", "tags": ["ops"],
            "responses": {
                "200": _json({"$ref": "#/components/schemas/Readiness"}, "ready"),
                "503": _json({"$ref": "#/components/schemas/Readiness"}, "draining or no live worker"),
            },
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics", "tags": ["ops"],
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/openapi.json": {"get": {
            "summary": "This document", "operationId": "openapi", "tags": ["ops"],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }},
        "/v1/workers": {"get": {
            "summary": "The worker table, read from shared memory", "operationId": "list_workers",
            "tags": ["ops"],
            "responses": {"200": _json({"$ref": "#/components/schemas/Workers"}, "workers"),
                          "401": _problem("unauthorized")},
        }},
        "/v1/dashboard/events": {"get": {
            "summary": "The dashboard's server-sent events: a `snapshot` at once, then at most one a second",
            "operationId": "dashboard_events", "tags": ["ops"],
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                          "401": _problem("unauthorized"), "503": _CALL_ERRORS["503"]},
        }},
        "/v1/tasks": {"get": {
            "summary": "Registered tasks with their argument schemas", "operationId": "list_tasks",
            "tags": ["tasks"],
            "responses": {"200": _json({"$ref": "#/components/schemas/TaskList"}, "tasks"),
                          "401": _problem("unauthorized")},
        }},
        "/v1/tasks/{name}": {
            "get": {
                "summary": "One task, as GET /v1/tasks lists it", "operationId": "get_task", "tags": ["tasks"],
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Task"}, "the task"),
                              "401": _problem("unauthorized"), "404": _problem("unknown-task")},
            },
            "post": {
                **_task_operation("{name}", "", None, True, True),
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    _TIMEOUT_PARAM,
                ],
            },
        },
    }
    schemas = dict(_SCHEMAS)
    for entry in catalog:
        schema = _hoist_defs(entry.name, entry.schema, schemas)
        op = _task_operation(entry.name, entry.spec.doc, schema, entry.spec.bytes_param is not None,
                             entry.spec.returns_bytes, body_required=bool(entry.required))
        if entry.spec.streams:  # a generator: its items as NDJSON lines (service/stream_handler.py)
            op["responses"]["200"] = stream_answer()
        if entry.spec.bytes_param is not None:
            op["parameters"] = [_TIMEOUT_PARAM, *_binary_query_params(entry, schema)]
        paths[f"/v1/tasks/{entry.name}"] = {"post": op}
        paths[f"/v1/tasks/{entry.name}/map"] = {"post": _map_operation(entry.name, schema)}
    paths["/v1/tasks/{name}/map"] = {"post": {
        **_map_operation("{name}", None),
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                       _TIMEOUT_PARAM],
    }}
    paths.update(_job_paths())
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "procbridge",
            "version": VERSION,
            "description": "CPU-heavy Python tasks served over HTTP by a supervised process pool.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key, when the service runs with --api-keys: `Authorization: Bearer <key>`. "
                               "Every /v1/ endpoint needs it then; /healthz, /readyz, /metrics and /openapi.json "
                               "stay open.",
            }},
        },
    }
    paths = orjson.loads(orjson.dumps(paths))  # a deep copy: the pass below must not edit shared parts
    doc["paths"] = paths
    v1_security: list[dict[str, list[str]]] = [{"bearer": []}] if keys_required else [{"bearer": []}, {}]
    for path, item in paths.items():
        for operation in item.values():
            _complete_responses(path, operation, v1_security)
    return orjson.dumps(doc)


# What any request may get before it reaches an endpoint (service/http_protocol.py and aiohttp's
# parser), what a /v1/ endpoint may get from the auth and rate-limit layer, and what one that reads a
# body may get while reading it. Added to every operation that does not say more already.
_ANY_REQUEST = {
    "400": "bad-request: a malformed HTTP request (request line, headers, framing)",
    "414": "uri-too-long: the request line is longer than the limit",
    "431": "header-too-large: a header field longer than the limit, or too many header fields",
    "500": "internal-error: an unexpected error in the service",
    "503": "too-many-connections: the service's or this client's connection limit is reached (Retry-After)",
}
_V1_REQUEST = {
    "401": "unauthorized: API keys are configured and none or a wrong one was given (WWW-Authenticate: Bearer)",
    "429": "rate-limited: this key (or client address) is over its rate (Retry-After)",
}
_BODY_REQUEST = {
    "400": "bad-request: the body's framing is broken (chunked encoding)",
    "408": "request-timeout: the body stopped arriving, or arrived too slowly",
    "413": "payload-too-large: the body is over --max-body",
    "415": "unsupported-media-type: a content type (or a Content-Encoding) the endpoint does not take",
}


def _complete_responses(path: str, operation: dict[str, Any], v1_security: list[dict[str, list[str]]]) -> None:
    """Add the responses every operation may give to what it documents itself: each one's
    problem+json content and slug, beside any other content the operation has for the status."""
    extra = dict(_ANY_REQUEST)
    if path.startswith("/v1/"):
        extra.update(_V1_REQUEST)
        operation["security"] = v1_security
    else:
        operation["security"] = []  # the probes and this document stay open
    responses = operation["responses"]
    for status, description in extra.items():
        _add_problem(responses, status, description)
    if "requestBody" in operation:
        for status, description in _BODY_REQUEST.items():
            _add_problem(responses, status, description)


def _add_problem(responses: dict[str, Any], status: str, description: str) -> None:
    response = responses.get(status)
    if response is None:
        responses[status] = _problem(description)
        return
    content = response.setdefault("content", {})
    if "application/problem+json" not in content:
        content["application/problem+json"] = {"schema": _PROBLEM}
    slug = description.split(":", 1)[0]
    if slug not in response["description"]:
        response["description"] = f"{response['description']}; {description}"


def _map_operation(name: str, item_schema: dict[str, Any] | None) -> dict[str, Any]:
    body = {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": item_schema or {"type": "object"}},
            "ordered": {"type": "boolean", "default": True},
        },
    }
    return {
        "summary": f"Run {name} over many argument sets; results stream as NDJSON lines",
        "operationId": f"map_{name}" if item_schema else "map_task",
        "tags": ["tasks"],
        "parameters": [_TIMEOUT_PARAM],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {"description": 'one line per item: {"index", "result"} or {"index", "error"}',
                    "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/MapLine"}}}},
            **{k: v for k, v in _CALL_ERRORS.items() if k in ("400", "401", "404", "413", "415", "422", "429", "503")},
        },
    }


_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_JOB = {"$ref": "#/components/schemas/Job"}


def _job_paths() -> dict[str, Any]:
    unknown = _problem("unknown-job")
    return {
        "/v1/jobs": {
            "post": {
                "summary": "Submit an async job (stored durably before the 202)", "operationId": "submit_job",
                "tags": ["jobs"],
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["task"], "additionalProperties": False,
                    "properties": {
                        "task": {"type": "string"}, "args": {"type": "object"},
                        "timeout": {"type": "number", "exclusiveMinimum": 0},
                        "priority": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1, "default": 0,
                                     "description": "higher runs first; equal priorities in arrival order"},
                        "delay": {"type": "number", "minimum": 0, "maximum": MAX_DELAY,
                                  "description": "seconds before it may start (not with run_at)"},
                        "run_at": {"type": "number", "minimum": 0,
                                   "description": "Unix seconds before which it does not start (not with delay)"},
                        "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES,
                                    "description": "failed attempts run again (default: the task's)"},
                        "webhook": {"type": "string", "format": "uri",
                                    "description": "POSTed the job when it ends; host allowed by --webhook-allow"},
                    },
                }}}},
                "responses": {
                    "202": {"description": "the job, stored", "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": _JOB}},
                            "links": {name: {"operationId": op, "parameters": {"id": "$response.body#/id"}}
                                      for name, op in (("GetJob", "get_job"), ("CancelJob", "cancel_job"),
                                                       ("JobResult", "job_result"), ("JobEvents", "job_events"))}},
                    **{k: v for k, v in _CALL_ERRORS.items() if k in ("400", "401", "404", "413", "415", "422",
                                                                       "429", "503")},
                },
            },
            "get": {
                "summary": "Jobs, newest first", "operationId": "list_jobs", "tags": ["jobs"],
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                    {"name": "task", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "the `next` of the previous page"},
                ],
                "responses": {"200": _json({"type": "object", "required": ["jobs", "next"],
                                            "properties": {"jobs": {"type": "array", "items": _JOB},
                                                           "next": {"type": ["string", "null"]}}}, "jobs"),
                              "401": _problem("unauthorized"), "422": _problem("invalid-arguments")},
            },
        },
        "/v1/jobs/{id}": {
            "get": {"summary": "A job", "operationId": "get_job", "tags": ["jobs"], "parameters": [_JOB_ID],
                    "responses": {"200": _json(_JOB, "the job"), "401": _problem("unauthorized"), "404": unknown}},
            "delete": {"summary": "Cancel a job (a running job's worker is stopped)", "operationId": "cancel_job",
                       "tags": ["jobs"], "parameters": [_JOB_ID],
                       "responses": {"200": _json(_JOB, "the cancelled job"), "401": _problem("unauthorized"),
                                     "404": unknown, "409": _problem("job-finished")}},
        },
        "/v1/jobs/{id}/result": {"get": {
            "summary": "A succeeded job's result (raw bytes for binary results)", "operationId": "job_result",
            "tags": ["jobs"], "parameters": [_JOB_ID],
            "responses": {"200": {"description": "the result", "content": {
                "application/json": {"schema": {}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                "401": _problem("unauthorized"), "404": unknown,
                "409": _problem("job-not-finished or job-failed")},
        }},
        "/v1/jobs/{id}/events": {"get": {
            "summary": "Server-sent events, each with an id: status, progress and item events, then the final "
                       "status (id end-1) and one result or error (id end-2)",
            "operationId": "job_events", "tags": ["jobs"],
            "parameters": [_JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                     "schema": {"type": "string"},
                                     "description": "resume after this event: no repeat, no gap"}],
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
                          "401": _problem("unauthorized"), "404": unknown, "422": _problem("invalid-arguments")},
        }},
    }


def _hoist_defs(task: str, schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A task schema with its "$defs" (nested models, TypedDicts) moved to components/schemas as
    "<task>.<Name>": inside the OpenAPI document "#/$defs/..." would resolve against its root."""
    defs = schema.get("$defs")
    if not defs:
        return schema
    prefix = "#/$defs/"

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k != "$defs"}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix):
                out["$ref"] = f"#/components/schemas/{task}.{ref[len(prefix):]}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, definition in defs.items():
        components[f"{task}.{name}"] = rewrite(definition)
    hoisted: dict[str, Any] = rewrite(schema)
    return hoisted


_SCHEMAS: dict[str, Any] = {
    "Job": {
        "type": "object",
        "required": ["id", "task", "status", "created_at", "started_at", "finished_at", "progress", "priority",
                     "run_at", "attempts", "retries"],
        "properties": {
            "id": {"type": "string"},
            "task": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "created_at": {"type": "number"},
            "started_at": {"type": ["number", "null"]},
            "finished_at": {"type": ["number", "null"]},
            "progress": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                "done": {"type": "number"}, "total": {"type": ["number", "null"]},
                "message": {"type": ["string", "null"]}}}]},
            "result": {},
            "result_url": {"type": "string"},
            "result_size": {"type": "integer"},
            "error": {"$ref": "#/components/schemas/Problem"},
            "priority": {"type": "integer"},
            "run_at": {"type": "number", "description": "not started before this time (a delay, or a retry's)"},
            "attempts": {"type": "integer", "description": "attempts the task made"},
            "retries": {"type": "integer"},
            "last_error": {"$ref": "#/components/schemas/Problem"},
            "webhook": {"type": "string"},
            "webhook_delivery": {"type": "object", "properties": {
                "state": {"enum": [None, "pending", "delivered", "failed"]},
                "attempts": {"type": "integer"}, "error": {"type": ["string", "null"]}}},
        },
    },
    "MapLine": {
        "type": "object",
        "required": ["index"],
        "properties": {"index": {"type": "integer"}, "result": {}, "encoding": {"const": "base64"},
                       "error": {"$ref": "#/components/schemas/Problem"}},
    },
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "description": "/problems/<slug>"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "message": {"type": "string"}}}},
            "exception": {"type": "string"},
            "traceback": {"type": "string"},
        },
    },
    "TaskResult": {
        "type": "object",
        "required": ["task", "result", "worker", "elapsed_ms"],
        "properties": {
            "task": {"type": "string"},
            "result": {},
            "worker": {"type": "integer", "description": "pid of the worker that ran it"},
            "elapsed_ms": {"type": "number", "description": "milliseconds the task ran in its worker"},
        },
    },
    "Task": {
        "type": "object", "required": ["name", "doc", "params"],
        "properties": {"name": {"type": "string"}, "doc": {"type": "string"},
                       "params": {"type": "object", "description": "the JSON Schema of the task's arguments"}},
    },
    "TaskList": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}},
    },
    "Workers": {
        "type": "object",
        "required": ["size", "min", "max", "workers"],
        "properties": {
            "size": {"type": "integer", "description": "workers now"},
            "min": {"type": "integer", "description": "the fewest workers (--workers MIN..MAX; fixed: size)"},
            "max": {"type": "integer", "description": "the most workers (--workers MIN..MAX; fixed: size)"},
            "workers": {"type": "array", "items": {
                "type": "object", "required": ["pid", "state", "task", "tasks_done"],
                "properties": {
                    "slot": {"type": "integer"},
                    "pid": {"type": ["integer", "null"]},
                    "state": {"enum": ["starting", "idle", "busy"]},
                    "task": {"type": ["string", "null"]},
                    "tasks_done": {"type": "integer"},
                    "cpu_seconds": {"type": "number"},
                    "task_started_at": {
                        "type": ["number", "null"],
                        "description": "Unix time the running task started; null unless busy",
                    },
                },
            }},
        },
    },
    "Readiness": {
        "type": "object",
        "properties": {"status": {"type": "string"}, "workers_alive": {"type": "integer"}},
    },
}
