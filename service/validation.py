"""The task catalog: argument models derived from each task's type hints, with pydantic.

Validation happens here, in the service, before anything reaches a worker: unknown and missing
arguments are refused, types are checked strictly for JSON (no "5" for an int, no true for 1), and
ranges declared with `Annotated[int, Interval(ge=..., le=...)]` (or pydantic's Field) are enforced.
Query-string arguments of binary calls are text: each is parsed by its type hint first
(service/query_args.py), then validated like JSON. Dataclasses, pydantic models and other types
that are not JSON data themselves are validated here and passed on as the JSON data given; the
worker rebuilds them (workers/arguments.py), so what crosses to a worker, a stored job or Dask is
always plain data. A `bytes` parameter takes text (UTF-8) or {"base64": "..."} in JSON.
A call's own timeout (`?timeout=`, a job's "timeout") is checked here too, by `call_timeout`.
"""

from __future__ import annotations

import binascii
import contextlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    PydanticUserError,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from service.problems import Problem, invalid_argument, invalid_arguments
from service.query_args import query_parser
from workers.arguments import rich_params
from workers.registry import TaskSpec, element_hints

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_BYTES_DOC = ('UTF-8 text, or {"base64": "<standard base64>"} for any bytes, in JSON; or send the raw bytes as the '
              "application/octet-stream body")
# Standard base64 (RFC 4648 section 4: A-Z a-z 0-9 + /, "=" padding to a multiple of 4 characters).
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_BYTES_SCHEMA = {"anyOf": [
    {"type": "string", "description": "UTF-8 text: the task gets its UTF-8 encoding"},
    {"type": "object", "required": ["base64"], "additionalProperties": False, "properties": {
        "base64": {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN}}},
]}


_BYTES_EXPECTED = 'Input should be a string (UTF-8 text) or {"base64": "<standard base64>"}'


def _bytes_argument(value: Any) -> bytes:
    """A bytes parameter in JSON: a string (its UTF-8 encoding) or {"base64": "<standard base64>"}."""
    if type(value) is str:
        return value.encode("utf-8")
    if type(value) is dict and len(value) == 1 and type(value.get("base64")) is str:
        try:
            return binascii.a2b_base64(value["base64"], strict_mode=True)
        except ValueError as exc:  # binascii.Error too
            raise PydanticCustomError(
                "base64", "invalid base64 ({reason}): use the standard alphabet (A-Z a-z 0-9 + /) with = padding to "
                "a multiple of 4 characters, no spaces or line breaks", {"reason": str(exc)},
            ) from None
    raise PydanticCustomError("bytes_type", _BYTES_EXPECTED)


BytesArgument = Annotated[bytes, PlainValidator(_bytes_argument), WithJsonSchema(_BYTES_SCHEMA)]


@dataclass(frozen=True)
class TaskEntry:
    spec: TaskSpec
    json_model: type[BaseModel]  # all arguments, a bytes parameter as text or {"base64": ...}
    query_model: type[BaseModel]  # the arguments other than the bytes parameter (as parsed from the query)
    schema: dict[str, Any]
    # Parameters whose values are passed on as the JSON data given (a dataclass, a pydantic model, a
    # datetime...): validated here in JSON mode, rebuilt in the worker (workers/arguments.py).
    rich: frozenset[str] = frozenset()
    query_parsers: Mapping[str, Callable[[str], Any]] | None = None  # text -> value, per query argument

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def required(self) -> tuple[str, ...]:
        """The arguments a call must give."""
        return tuple(n for n, f in self.json_model.model_fields.items() if f.is_required())


def _parameters(spec: TaskSpec) -> list[inspect.Parameter]:
    return [p for p in spec.signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _fields(spec: TaskSpec, *, skip_bytes: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    hints = element_hints(spec)  # a batch= task: one call's element of each list
    for param in _parameters(spec):
        pname = param.name
        annotation = hints.get(pname, Any)
        if pname == spec.bytes_param:
            if skip_bytes:
                continue
            annotation = BytesArgument | None if spec.bytes_param_optional else BytesArgument
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    return fields


class TaskDefinitionError(RuntimeError):
    """A task's type hints cannot be made into an argument model (found when the catalog is built)."""


_ADVICE = ("use a JSON type (int, float, str, bool, a list, a dict, a Literal, an optional), a dataclass, "
           "a TypedDict or a pydantic model")


def _refusal(spec: TaskSpec, exc: Exception) -> TaskDefinitionError:
    """The start-up error for hints the service cannot take as JSON: the task, the parameter, and
    what to write instead (never pydantic's advice to set arbitrary_types_allowed, which a task
    author cannot reach)."""
    where = f"task {spec.name!r} ({spec.module}.{spec.fn.__qualname__})"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    culprit = re.search(r"schema for (.+?)\. Set `arbitrary_types_allowed", reason)
    for param in _parameters(spec):
        try:
            field = _fields(spec, skip_bytes=False)[param.name]
            create_model("probe", __config__=_STRICT, **{param.name: field}).model_json_schema()
        except (PydanticUserError, TypeError, ValueError) as one:
            hint = spec.hints.get(param.name, Any)
            text = str(one).strip().splitlines()[0] if str(one).strip() else type(one).__name__
            found = re.search(r"schema for (.+?)\. Set `arbitrary_types_allowed", text)
            what = f"{found.group(1)}, which is not JSON data" if found else text
            return TaskDefinitionError(
                f"{where}: parameter {param.name!r} is annotated {_hint_text(hint)}: {what}; {_ADVICE} instead"
            )
    what = f"{culprit.group(1)} is not JSON data" if culprit else reason
    return TaskDefinitionError(f"{where}: its type hints are not JSON arguments: {what}; {_ADVICE} instead")


def _hint_text(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__qualname__
    return repr(hint).replace("typing.", "")


def build_entry(spec: TaskSpec) -> TaskEntry:
    for param in spec.signature.parameters.values():
        if param.kind is param.POSITIONAL_ONLY:
            raise TaskDefinitionError(
                f"task {spec.name!r} ({spec.module}.{spec.fn.__qualname__}): parameter {param.name!r} is "
                "positional-only; a task is called with keyword arguments: remove the '/' from its signature"
            )
    try:
        json_model = create_model(f"{spec.name}_arguments", __config__=_STRICT, **_fields(spec, skip_bytes=False))
        query_model = create_model(f"{spec.name}_query", __config__=_STRICT, **_fields(spec, skip_bytes=True))
        schema = json_model.model_json_schema()
        parsers = {name: query_parser(name, spec.hints.get(name, Any)) for name in query_model.model_fields}
    except (PydanticUserError, TypeError, ValueError) as exc:  # e.g. a parameter annotated with an arbitrary class
        raise _refusal(spec, exc) from None
    schema["title"] = f"{spec.name} arguments"
    if spec.doc:
        schema["description"] = spec.doc.split("\n\n")[0]
    if spec.bytes_param and spec.bytes_param in schema.get("properties", {}):
        schema["properties"][spec.bytes_param]["description"] = _BYTES_DOC
    return TaskEntry(spec, json_model, query_model, schema, frozenset(rich_params(spec)), parsers)


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
        """Arguments from a JSON object -> keyword arguments for the task (422 if they do not fit):
        plain data, a bytes parameter as bytes. `where` names the field that holds them, for the 422
        when they are not an object."""
        if not isinstance(args, dict):
            raise invalid_argument(where, "must be a JSON object of the task's arguments", "must be a JSON object")
        if not entry.rich:  # the common case, one call less
            return _validate(entry.json_model, args)
        return _checked(entry, entry.json_model, args)

    def validate_bare(self, entry: TaskEntry) -> dict[str, Any]:
        """A call with neither a body nor a Content-Type: the task without arguments. A task that
        needs some gets a 422 naming them and saying how to send them."""
        missing = entry.required
        if missing:
            names = ", ".join(missing)
            raise invalid_arguments(
                f"{names}: required argument{'s are' if len(missing) > 1 else ' is'} missing; the request had no "
                f"body: send the arguments as a JSON object (Content-Type: application/json)"
                + (f", or the bytes of {entry.spec.bytes_param!r} as application/octet-stream"
                   if entry.spec.bytes_param else ""),
                [{"field": name, "message": "required argument is missing"} for name in missing],
            )
        return self.validate_json(entry, {})

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
        parsers = entry.query_parsers or {}
        args = {k: parsers[k](v) if k in parsers else v for k, v in query.items()}
        kwargs = _checked(entry, entry.query_model, args)
        kwargs[bp] = body
        return kwargs


def _checked(entry: TaskEntry, model: type[BaseModel], args: dict[str, Any]) -> dict[str, Any]:
    """`args` validated by `model`. A task with rich parameters (entry.rich) is validated in JSON
    mode, where a dataclass or a pydantic model is given as an object (strict Python mode would ask
    for an instance), and each rich argument is passed on as the JSON data given, to be rebuilt in
    the worker (workers/arguments.py); one left out is left out, so the function's default applies."""
    if not entry.rich:
        return _validate(model, args)
    try:
        text = orjson.dumps(args)
    except TypeError as exc:  # only from Python callers: HTTP bodies and stored jobs are JSON
        raise invalid_argument("(arguments)", f"not JSON data: {exc}", "not JSON data") from None
    kwargs = _validate(model, text)
    for name in entry.rich:
        if name in args:
            kwargs[name] = args[name]
        else:
            kwargs.pop(name, None)
    return kwargs


def _validate(model: type[BaseModel], args: dict[str, Any] | bytes) -> dict[str, Any]:
    try:
        # The instance's __dict__ holds exactly its fields (extra arguments are refused): copying it
        # is several times cheaper than dict(instance), which iterates through BaseModel.__iter__.
        # The model's own validator, called as model_validate calls it (one Python frame less).
        validator = model.__pydantic_validator__
        if type(args) is bytes:  # JSON text: JSON-mode validation
            return validator.validate_json(args, strict=True).__dict__.copy()  # user models too
        return validator.validate_python(args).__dict__.copy()
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
    if err["type"] == "unexpected_keyword_argument":  # a dataclass's
        return "unknown field"
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
