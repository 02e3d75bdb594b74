"""The task registry: `@task` turns a plain module-level function into a named, callable task.

The registry is process-wide because decorators run at import: the service and every worker import
the same modules and so hold the same table. It stores functions only; argument schemas are derived
from the type hints by the service (see service/validation.py), so workers never pay for them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

BUILTIN_MODULE = "workers.builtin_tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One registered task: its public name and the function behind it."""

    name: str
    fn: Callable[..., Any]
    module: str
    doc: str = ""

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @functools.cached_property
    def hints(self) -> dict[str, Any]:
        """Resolved type hints (string annotations included), `Annotated` extras kept."""
        try:
            return typing.get_type_hints(self.fn, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable forward reference: fall back to what is written
            return dict(self.fn.__annotations__)

    @functools.cached_property
    def bytes_param(self) -> str | None:
        """The parameter that receives a binary request body, if the task has one."""
        for pname in self.signature.parameters:
            if _strip_optional(_strip_annotated(self.hints.get(pname))) in _BINARY:
                return pname
        return None

    @functools.cached_property
    def view_param(self) -> str | None:
        """The bytes parameter when it is annotated `memoryview` (it then gets a read-only view,
        not a copy), else None."""
        param = self.bytes_param
        if param is None or _strip_optional(_strip_annotated(self.hints.get(param))) is not memoryview:
            return None
        return param

    @functools.cached_property
    def bytes_param_optional(self) -> bool:
        """Whether the bytes parameter also accepts None (`bytes | None`)."""
        if self.bytes_param is None:
            return False
        tp = _strip_annotated(self.hints.get(self.bytes_param))
        return _strip_optional(tp) is not tp

    @functools.cached_property
    def returns_bytes(self) -> bool:
        return _strip_annotated(self.hints.get("return")) in _BINARY


_BINARY = (bytes, memoryview, bytearray)


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _strip_optional(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_REGISTRY: dict[str, TaskSpec] = {}


@overload
def task(fn: F, /) -> F: ...
@overload
def task(*, name: str | None = None) -> Callable[[F], F]: ...


def task(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Register a module-level function as a task, named after the function unless `name` is given.

    The function itself is returned unchanged, so it stays a plain function (importable, picklable
    by reference, callable in tests).
    """

    def register(f: F) -> F:
        if not callable(f) or "<locals>" in getattr(f, "__qualname__", "<locals>"):
            raise TypeError("@task takes a module-level function")
        tname = f.__name__ if name is None else name  # an empty name is refused, not ignored
        if not tname.isidentifier():
            raise ValueError(f"task name {tname!r} is not an identifier")
        old = _REGISTRY.get(tname)
        if old is not None and (old.module, old.fn.__qualname__) != (f.__module__, f.__qualname__):
            raise ValueError(f"task {tname!r} is already registered by {old.module}.{old.fn.__qualname__}")
        _REGISTRY[tname] = TaskSpec(tname, f, f.__module__, inspect.cleandoc(f.__doc__ or ""))
        return f

    return register(fn) if fn is not None else register


def get(name: str) -> TaskSpec | None:
    return _REGISTRY.get(name)


def load(modules: Iterable[str]) -> dict[str, TaskSpec]:
    """Import the built-in tasks and each user module; return the tasks they define, by name.

    Only tasks defined in these modules are returned, so two apps in one process with different
    `--tasks` serve different tables.
    """
    wanted = [BUILTIN_MODULE, *(m for m in modules if m != BUILTIN_MODULE)]
    for module in wanted:
        importlib.import_module(module)
    chosen = set(wanted)
    return {n: s for n, s in sorted(_REGISTRY.items()) if s.module in chosen}
