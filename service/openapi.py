"""The OpenAPI 3.1 document of the whole API, each task's argument schema included.

Each task gets its own path (/v1/tasks/primes, ...) with its JSON Schema as the request body, so
generated clients and fuzzers see the real arguments; the generic /v1/tasks/{name} stays documented.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.validation import TaskCatalog

VERSION = "0.1.0"

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


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


def _task_operation(
    name: str, doc: str, schema: dict[str, Any] | None, binary: bool, returns_bytes: bool
) -> dict[str, Any]:
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
        "requestBody": {"required": True, "content": content},
        "responses": {"200": {"description": "the task's result", "content": ok_content}, **_CALL_ERRORS},
    }


def build_openapi(catalog: TaskCatalog) -> bytes:
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
        "/v1/tasks": {"get": {
            "summary": "Registered tasks with their argument schemas", "operationId": "list_tasks",
            "tags": ["tasks"],
            "responses": {"200": _json({"$ref": "#/components/schemas/TaskList"}, "tasks"),
                          "401": _problem("unauthorized")},
        }},
        "/v1/tasks/{name}": {"post": {
            **_task_operation("{name}", "", None, True, True),
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                _TIMEOUT_PARAM,
            ],
        }},
    }
    schemas = dict(_SCHEMAS)
    for entry in catalog:
        schema = _hoist_defs(entry.name, entry.schema, schemas)
        op = _task_operation(entry.name, entry.spec.doc, schema, entry.spec.bytes_param is not None,
                             entry.spec.returns_bytes)
        paths[f"/v1/tasks/{entry.name}"] = {"post": op}
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "procbridge",
            "version": VERSION,
            "description": "CPU-heavy Python tasks served over HTTP by a supervised process pool.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    return orjson.dumps(doc)


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
    "TaskList": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": {
            "type": "object", "required": ["name", "doc", "params"],
            "properties": {"name": {"type": "string"}, "doc": {"type": "string"}, "params": {"type": "object"}},
        }}},
    },
    "Workers": {
        "type": "object",
        "required": ["size", "workers"],
        "properties": {
            "size": {"type": "integer"},
            "workers": {"type": "array", "items": {
                "type": "object", "required": ["pid", "state", "task", "tasks_done"],
                "properties": {
                    "slot": {"type": "integer"},
                    "pid": {"type": ["integer", "null"]},
                    "state": {"enum": ["starting", "idle", "busy"]},
                    "task": {"type": ["string", "null"]},
                    "tasks_done": {"type": "integer"},
                    "cpu_seconds": {"type": "number"},
                },
            }},
        },
    },
    "Readiness": {
        "type": "object",
        "properties": {"status": {"type": "string"}, "workers_alive": {"type": "integer"}},
    },
}
