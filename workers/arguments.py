"""Arguments richer than JSON data: rebuilt in the worker, from the plain data that travelled.

What crosses from the service to a worker is plain data (JSON values, and bytes for a binary
parameter): the pipe, a job stored for later and the Dask backend all carry it as it is. The service
validates the arguments against the task's type hints (service/validation.py); the worker, just
before the call, turns the plain data back into what the hints ask for: a dataclass instance, a
pydantic model, a datetime, a tuple, an Enum member... A `TypedDict`, a list, a dict, a Literal and
the scalars are JSON data already and are passed as they came.

`is_plain(hint)` says which is which (the service uses it too, so both sides agree); `bind(spec,
kwargs)` rebuilds the rich ones. What to rebuild is worked out once per task; a task whose
parameters are all plain pays one dict lookup (`bind`) or nothing at all (`bound`, which returns the
function itself).
"""

from __future__ import annotations

import contextlib
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

import orjson
from typing_extensions import is_typeddict

from workers.registry import ASYNC_GENERATOR, COROUTINE, GENERATOR, TaskSpec

Kwargs = dict[str, Any]
Binder = Callable[[Kwargs], Kwargs]

_SCALARS = (int, float, str, bool, type(None), typing.Any, object)
_UNIONS = (typing.Union, types.UnionType)
_PLAIN_CONTAINERS = (list, dict)


def strip_annotated(tp: Any) -> Any:
    """`Annotated[X, ...]` -> X (nested ones too)."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def is_plain(hint: Any, _seen: frozenset[int] = frozenset()) -> bool:
    """True when a value of this type *is* its JSON data: the scalars, `Any`, Literals of JSON
    scalars, lists and string-keyed dicts of plain values, TypedDicts of plain values, unions of
    them. False for anything that must be built from its JSON data (dataclasses, pydantic models,
    tuples, sets, Enums, datetimes, bytes inside a structure, ...)."""
    tp = strip_annotated(hint)
    if any(tp is scalar for scalar in _SCALARS):
        return True
    if id(tp) in _seen:  # a recursive TypedDict: plain if the rest of it is
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return all(type(a) in (int, float, str, bool, type(None)) for a in args)
    if origin in _UNIONS:
        return all(is_plain(a, _seen) for a in args)
    if tp in _PLAIN_CONTAINERS:
        return True
    if origin is list:
        return all(is_plain(a, _seen) for a in args)
    if origin is dict:
        return len(args) == 2 and strip_annotated(args[0]) is str and is_plain(args[1], _seen)
    if is_typeddict(tp):
        try:
            fields = typing.get_type_hints(tp, include_extras=True)
        except Exception:  # noqa: BLE001 - an unresolvable hint: let pydantic build it, and say so
            return False
        seen = _seen | {id(tp)}
        return all(is_plain(_required_stripped(f), seen) for f in fields.values())
    return False


def _required_stripped(tp: Any) -> Any:
    """`Required[X]` / `NotRequired[X]` / `ReadOnly[X]` (TypedDict field markers) -> X."""
    tp = strip_annotated(tp)
    while getattr(typing.get_origin(tp), "_name", None) in ("Required", "NotRequired", "ReadOnly"):
        tp = strip_annotated(typing.get_args(tp)[0])
    return tp


def rich_params(spec: TaskSpec) -> tuple[str, ...]:
    """The task's parameters that the worker rebuilds from their JSON data (the bytes parameter,
    which travels as bytes, never is one)."""
    names = []
    for pname, param in spec.signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or pname == spec.bytes_param:
            continue
        if not is_plain(spec.hints.get(pname, typing.Any)):
            names.append(pname)
    return tuple(names)


_BINDERS: dict[Callable[..., Any], Binder | None] = {}


def binder(spec: TaskSpec) -> Binder | None:
    """The function that rebuilds `spec`'s rich arguments from their JSON data, or None when it
    has none; worked out once per task function."""
    try:
        return _BINDERS[spec.fn]
    except KeyError:
        pass
    names = rich_params(spec)
    made: Binder | None = None
    if names:
        from pydantic import TypeAdapter  # only a process that runs such a task pays for pydantic

        adapters = {name: TypeAdapter(spec.hints[name]) for name in names}

        def rebuild(kwargs: Kwargs) -> Kwargs:
            out = dict(kwargs)
            for name, adapter in adapters.items():
                if name in out:  # absent: the function's own default applies
                    out[name] = adapter.validate_json(orjson.dumps(out[name]))
            return out

        made = rebuild
    _BINDERS[spec.fn] = made
    return made


def bind(spec: TaskSpec, kwargs: Kwargs) -> Kwargs:
    """`kwargs` (plain data, as validated by the service) as the task's function takes them: each
    dataclass, pydantic model, tuple, Enum, datetime... built from its JSON data. The same dict
    when the task has no such parameter."""
    rebuild = _BINDERS.get(spec.fn, _UNSET)
    if rebuild is _UNSET:
        rebuild = binder(spec)
    return kwargs if rebuild is None else rebuild(kwargs)


_UNSET: Any = object()


def bound(spec: TaskSpec) -> Callable[..., Any]:
    """The task's function, taking plain data: `spec.fn` itself when all its parameters are plain
    (nothing added to a call), else a wrapper of the same kind (function, coroutine function,
    generator or async generator function) that rebuilds the rich arguments first."""
    rebuild = binder(spec)
    fn = spec.fn
    if rebuild is None:
        return fn
    wrapper: Callable[..., Any]
    if spec.kind == COROUTINE:
        async def wrapper(**kwargs: Any) -> Any:
            return await fn(**rebuild(kwargs))
    elif spec.kind == GENERATOR:
        def wrapper(**kwargs: Any) -> Any:
            return (yield from fn(**rebuild(kwargs)))
    elif spec.kind == ASYNC_GENERATOR:
        async def wrapper(**kwargs: Any) -> Any:
            async with contextlib.aclosing(fn(**rebuild(kwargs))) as items:
                async for item in items:
                    yield item
    else:
        def wrapper(**kwargs: Any) -> Any:
            return fn(**rebuild(kwargs))
    return functools.wraps(fn)(wrapper)
