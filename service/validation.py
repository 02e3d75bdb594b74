"""The task catalog: argument models derived from each task's type hints, with pydantic.

Validation happens here, in the service, before anything reaches a worker: unknown and missing
arguments are refused, types are checked strictly for JSON (no "5" for an int, no true for 1), and
ranges declared with `Annotated[int, Interval(ge=..., le=...)]` (or pydantic's Field) are enforced.
Query-string arguments of binary calls are strings by nature, so they are parsed leniently.
A call's own timeout (`?timeout=`, a job's "timeout") is checked here too, by `call_timeout`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, PydanticUserError, ValidationError, create_model

from service.problems import Problem, invalid_argument, invalid_arguments
from workers.registry import TaskSpec, element_hints

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_LENIENT = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)
_BYTES_DOC = "UTF-8 text in JSON; or send the raw bytes as the application/octet-stream body"


@dataclass(frozen=True)
class TaskEntry:
    spec: TaskSpec
    json_model: type[BaseModel]  # all arguments, a bytes parameter given as a string
    query_model: type[BaseModel]  # the arguments other than the bytes parameter, lenient
    schema: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name


def _fields(spec: TaskSpec, *, skip_bytes: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for pname, param in spec.signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = element_hints(spec).get(pname, Any)  # a batch= task: one call's element of each list
        if pname == spec.bytes_param:
            if skip_bytes:
                continue
            annotation = str | None if spec.bytes_param_optional else str
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    return fields


class TaskDefinitionError(RuntimeError):
    """A task's type hints cannot be made into an argument model (found when the catalog is built)."""


def build_entry(spec: TaskSpec) -> TaskEntry:
    try:
        json_model = create_model(f"{spec.name}_arguments", __config__=_STRICT, **_fields(spec, skip_bytes=False))
        query_model = create_model(f"{spec.name}_query", __config__=_LENIENT, **_fields(spec, skip_bytes=True))
        schema = json_model.model_json_schema()
    except PydanticUserError as exc:  # e.g. a parameter annotated with an arbitrary class
        reason = str(exc).strip().splitlines()[0]
        raise TaskDefinitionError(
            f"task {spec.name!r} ({spec.module}.{spec.fn.__qualname__}): its type hints are not JSON arguments: "
            f"{reason}"
        ) from None
    schema["title"] = f"{spec.name} arguments"
    if spec.doc:
        schema["description"] = spec.doc.split("\n\n")[0]
    if spec.bytes_param and spec.bytes_param in schema.get("properties", {}):
        schema["properties"][spec.bytes_param]["description"] = _BYTES_DOC
    return TaskEntry(spec, json_model, query_model, schema)


class TaskCatalog:
    """The tasks this service exposes, by name, each with its validators and JSON Schema."""

    def __init__(self, specs: Mapping[str, TaskSpec]) -> None:
        self._entries = {name: build_entry(spec) for name, spec in specs.items()}

    def __iter__(self) -> Any:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> TaskEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise Problem(404, "unknown-task", f"no task named {name!r}; GET /v1/tasks lists them")
        return entry

    def validate_json(self, entry: TaskEntry, args: Any, where: str = "(arguments)") -> dict[str, Any]:
        """Arguments from a JSON object -> keyword arguments for the task (422 if they do not fit).
        `where` names the field that holds them, for the 422 when they are not an object."""
        if not isinstance(args, dict):
            raise invalid_argument(where, "must be a JSON object of the task's arguments", "must be a JSON object")
        kwargs = _validate(entry.json_model, args)
        bp = entry.spec.bytes_param
        if bp is not None and isinstance(kwargs.get(bp), str):
            kwargs[bp] = kwargs[bp].encode("utf-8")
        return kwargs

    def validate_binary(self, entry: TaskEntry, query: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """A binary call: the body goes to the bytes parameter, the rest comes from the query string."""
        bp = entry.spec.bytes_param
        if bp is None:
            raise Problem(
                415, "unsupported-media-type",
                f"task {entry.name!r} takes no binary input; send a JSON object (application/json)",
            )
        if bp in query:
            raise invalid_argument(bp, "comes from the request body, not the query string", "given in the query string")
        kwargs = _validate(entry.query_model, dict(query))
        kwargs[bp] = body
        return kwargs


def _validate(model: type[BaseModel], args: dict[str, Any]) -> dict[str, Any]:
    try:
        # The instance's __dict__ holds exactly its fields (extra arguments are refused): copying it
        # is several times cheaper than dict(instance), which iterates through BaseModel.__iter__.
        # The model's own validator, called as model_validate calls it (one Python frame less).
        return model.__pydantic_validator__.validate_python(args).__dict__.copy()
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(arguments)", "message": _message(err)}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise invalid_arguments(detail, errors) from None


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown argument"
    if err["type"] == "missing":
        return "required argument is missing"
    return str(err["msg"])


def call_timeout(raw: object, cap: float, *, own: float | None = None, text: bool = False) -> float | None:
    """A call's timeout in seconds: the task's `own` (`@task(timeout=...)`), else `cap`
    (--task-timeout), shortened by the call's own when it gives one. None when neither the call nor
    the task gives one (the executor then applies --task-timeout). The one check for every way in:
    a job's "timeout" (`raw` a JSON number) and, with `text`, the `?timeout=` of a call or a map
    (`raw` the query string's text, quoted in the 422's detail).

    422 unless a number of seconds > 0. The cap: a client may shorten its call's timeout, never
    lengthen it past what the task's author or the operator allows, or one client could tie every
    worker up for as long as its tasks take (burn: an hour). A task's own timeout replaces
    --task-timeout for it, longer or shorter."""
    limit = cap if own is None else own
    if raw is None:
        return own
    value = math.nan  # unless a number of the right kind: 422 below
    with contextlib.suppress(ValueError, OverflowError):
        if isinstance(raw, str):
            if text:  # from a query string; in JSON a string is no number
                value = float(raw)
        elif isinstance(raw, int | float) and not isinstance(raw, bool) and not text:
            value = float(raw)
    if not math.isfinite(value) or value <= 0:
        got = f", got {raw!r}" if text else ""
        raise invalid_argument("timeout", f"must be a number of seconds > 0{got}", "must be a number of seconds > 0")
    return min(value, limit)
