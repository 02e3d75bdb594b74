"""The task registry: `@task` turns a plain module-level function into a named, callable task.

The registry is process-wide because decorators run at import: the service and every worker import
the same modules and so hold the same table. It stores functions only; argument schemas are derived
from the type hints by the service (see service/validation.py), so workers never pay for them.
"""

from __future__ import annotations

import collections.abc
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
class Batch:
    """`@task(batch=Batch(...))`: concurrent calls gathered into one invocation of a function whose
    parameters are lists (one element per call) and which returns a list of the same length. A batch
    leaves with `max_size` calls, or `max_wait_ms` after its first call arrived, whichever is first."""

    max_size: int = 32
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or not 1 <= self.max_size <= 10_000:
            raise ValueError(f"Batch(max_size=...) must be an integer from 1 to 10000, got {self.max_size!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, int | float) or not (
            0 <= self.max_wait_ms <= 60_000
        ):
            raise ValueError(f"Batch(max_wait_ms=...) must be a number from 0 to 60000, got {self.max_wait_ms!r}")


FUNCTION, COROUTINE, GENERATOR, ASYNC_GENERATOR = "function", "coroutine", "generator", "async_generator"


@dataclass(frozen=True)
class TaskSpec:
    """One registered task: its public name, the function behind it and its options (`@task`'s
    keywords: None means the service's default)."""

    name: str
    fn: Callable[..., Any]
    module: str
    doc: str = ""
    timeout: float | None = None  # seconds; replaces --task-timeout for this task (a call may shorten it)
    concurrency: int | None = None  # at most this many calls of the task run at once across the pool
    retries: int = 0  # async jobs: attempts after a failed one
    batch: Batch | None = None

    @functools.cached_property
    def kind(self) -> str:
        """How the function runs: a plain call, a coroutine, or a (sync or async) generator that streams."""
        fn = inspect.unwrap(self.fn)
        if inspect.isasyncgenfunction(fn):
            return ASYNC_GENERATOR
        if inspect.isgeneratorfunction(fn):
            return GENERATOR
        if inspect.iscoroutinefunction(fn):
            return COROUTINE
        return FUNCTION

    @property
    def streams(self) -> bool:
        return self.kind in (GENERATOR, ASYNC_GENERATOR)

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
_LISTS = (list, collections.abc.Sequence, collections.abc.MutableSequence, tuple)


def element_hints(spec: TaskSpec) -> dict[str, Any]:
    """The type hints one call of the task is validated against (service/validation.py builds its fields from
    these): the task's own hints, except for a `batch=` task, whose parameters are lists of what one call passes
    (`list[T]`, `Sequence[T]`, `tuple[T, ...]`, `Annotated` or not): there each parameter's hint is `T`, and the
    return hint the element of the returned list when it says. A batch parameter hinted otherwise is refused
    (ValueError naming the task, the parameter and what to write)."""
    if spec.batch is None:
        return spec.hints
    out: dict[str, Any] = {}
    for pname, hint in spec.hints.items():
        tp = _strip_annotated(hint)
        origin = typing.get_origin(tp)
        if tp in _LISTS or origin in _LISTS:
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            if origin is tuple and len(args) > 1 and len(set(args)) > 1:
                raise ValueError(f"task {spec.name!r}: batch parameter {pname!r} is a fixed tuple {hint!r}; "
                                 "write list[T] for one T per call")
            out[pname] = args[0] if args else Any
        elif pname != "return":  # a return hint that is not a list says nothing about one call's result
            raise ValueError(
                f"task {spec.name!r}: with batch=, parameter {pname!r} receives a list of the calls' values, "
                f"but it is annotated {getattr(hint, '__name__', hint)!r}: write list[...] of one call's type"
            )
    return out


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
def task(
    *,
    name: str | None = None,
    timeout: float | None = None,
    concurrency: int | None = None,
    retries: int = 0,
    batch: Batch | None = None,
) -> Callable[[F], F]: ...


def task(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    timeout: float | None = None,
    concurrency: int | None = None,
    retries: int = 0,
    batch: Batch | None = None,
) -> F | Callable[[F], F]:
    """Register a module-level function as a task, named after the function unless `name` is given.

    - `timeout`: seconds a call may run, in place of --task-timeout (a call's own timeout can only
      shorten it);
    - `concurrency`: at most this many calls of the task run at once across the pool; the others wait;
    - `retries`: for async jobs, how many times a failed attempt runs again (calls are never retried);
    - `batch`: gather concurrent calls into one invocation (see `Batch`).

    The function itself is returned unchanged, so it stays a plain function (importable, picklable
    by reference, callable in tests). A bad option is refused here, at import, naming the task.
    """

    def register(f: F) -> F:
        if not callable(f) or "<locals>" in getattr(f, "__qualname__", "<locals>"):
            raise TypeError("@task takes a module-level function")
        tname = f.__name__ if name is None else name  # an empty name is refused, not ignored
        if not tname.isidentifier():
            raise ValueError(f"task name {tname!r} is not an identifier")
        _check_options(tname, timeout, concurrency, retries, batch)
        old = _REGISTRY.get(tname)
        if old is not None and (old.module, old.fn.__qualname__) != (f.__module__, f.__qualname__):
            raise ValueError(f"task {tname!r} is already registered by {old.module}.{old.fn.__qualname__}")
        spec = TaskSpec(
            tname, f, f.__module__, inspect.cleandoc(f.__doc__ or ""),
            timeout=None if timeout is None else float(timeout), concurrency=concurrency, retries=retries,
            batch=batch,
        )
        if batch is not None and spec.streams:
            raise ValueError(f"task {tname!r}: a generator task streams its items; it cannot also take batch=")
        _REGISTRY[tname] = spec
        return f

    return register(fn) if fn is not None else register


def _check_options(
    name: str, timeout: float | None, concurrency: int | None, retries: int, batch: Batch | None
) -> None:
    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"task {name!r}: timeout= must be a number of seconds > 0, got {timeout!r}")
    if concurrency is not None and (not whole(concurrency) or concurrency < 1):
        raise ValueError(f"task {name!r}: concurrency= must be an integer >= 1, got {concurrency!r}")
    if not whole(retries) or not 0 <= retries <= 100:
        raise ValueError(f"task {name!r}: retries= must be an integer from 0 to 100, got {retries!r}")
    if batch is not None and not isinstance(batch, Batch):
        raise TypeError(f"task {name!r}: batch= takes a workers.Batch(max_size=..., max_wait_ms=...), got {batch!r}")


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
