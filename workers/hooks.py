"""Worker-state hooks: `@preload` (once, in the process workers are forked from) and
`@on_worker_start` (in each worker, before its first task).

    service process            worker parent (workers/local/parent.py)         each worker
    ───────────────            ───────────────────────────────────────         ───────────
    imports the task modules   imports the task modules                        forked from the parent:
    (schemas only; no hook     run_preloads(): every @preload, in order,       the preloads' results
    runs here)                 its result kept  ──── gc.freeze(), then fork ─▶ are already there
                                                                               run_worker_start():
                                                                               every @on_worker_start

A preload's result is shared copy-on-write: the pages a worker only reads stay shared with the
parent (numpy buffers, model weights); a replacement worker is a fork of the same warm parent, so
it never runs the preload again. Calling the decorated function returns what the preload built
(building it there and then if it has not run in this process: a task called directly in a test,
or a Dask worker that installs no hooks).

Hooks are registered at import, like tasks, with their module; `run_preloads(modules)` and
`run_worker_start(modules)` run only the hooks of the given modules (the built-ins and --tasks), in
the order they were registered.
"""

from __future__ import annotations

import functools
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from workers.registry import BUILTIN_MODULE

T = TypeVar("T")


class Preload(Generic[T]):
    """A `@preload` function: called, it returns what it built (built once per process)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.module: str = fn.__module__
        self._lock = threading.Lock()
        self._built = False
        self._value: T | None = None

    @property
    def built(self) -> bool:
        """Whether it has run in this process (or in the parent this process was forked from)."""
        return self._built

    def __call__(self) -> T:
        if not self._built:
            with self._lock:
                if not self._built:
                    self._value = self.fn()
                    self._built = True
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<preload {self.module}.{self.fn.__qualname__}>"


_PRELOADS: list[Preload[Any]] = []
_WORKER_START: list[Callable[[], Any]] = []


def preload(fn: Callable[[], T]) -> Preload[T]:
    """Run `fn` once, before workers start, in the process they are forked from; tasks call the
    decorated function to get what it built."""
    _check(fn, "@preload")
    hook = Preload(fn)
    _PRELOADS[:] = [p for p in _PRELOADS if _key(p.fn) != _key(fn)] + [hook]  # a re-import replaces
    return hook


def on_worker_start(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run `fn` in each worker after the task modules are imported and before its first task."""
    _check(fn, "@on_worker_start")
    _WORKER_START[:] = [f for f in _WORKER_START if _key(f) != _key(fn)] + [fn]
    return fn


class HookFailed(Exception):
    """A hook raised: names the hook; the original exception is its __cause__."""

    def __init__(self, kind: str, fn: Callable[..., Any], exc: BaseException) -> None:
        self.hook = f"{fn.__module__}.{fn.__qualname__}"
        super().__init__(f"{kind} hook {self.hook} raised {type(exc).__name__}: {exc}")


def preloads(modules: Iterable[str]) -> list[Preload[Any]]:
    chosen = _chosen(modules)
    return [p for p in _PRELOADS if p.module in chosen]


def worker_start_hooks(modules: Iterable[str]) -> list[Callable[[], Any]]:
    chosen = _chosen(modules)
    return [f for f in _WORKER_START if f.__module__ in chosen]


def run_preloads(modules: Iterable[str]) -> int:
    """Run the preloads of these modules that have not run in this process; returns how many ran.
    Raises HookFailed (from the hook's exception) on the first that raises."""
    ran = 0
    for hook in preloads(modules):
        if hook.built:
            continue
        try:
            hook()
        except BaseException as exc:
            raise HookFailed("preload", hook.fn, exc) from exc
        ran += 1
    return ran


def run_worker_start(modules: Iterable[str]) -> int:
    """Run every on_worker_start hook of these modules; returns how many ran. Raises HookFailed."""
    hooks = worker_start_hooks(modules)
    for fn in hooks:
        try:
            fn()
        except BaseException as exc:
            raise HookFailed("on_worker_start", fn, exc) from exc
    return len(hooks)


def hook_traceback(exc: BaseException) -> str:
    """The traceback worth showing: the hook's own exception's for a HookFailed, else `exc`'s."""
    shown = exc.__cause__ if isinstance(exc, HookFailed) and exc.__cause__ is not None else exc
    return "".join(traceback.format_exception(shown))


def _chosen(modules: Iterable[str]) -> set[str]:
    return {BUILTIN_MODULE, *modules}


def _key(fn: Callable[..., Any]) -> tuple[str, str]:
    return fn.__module__, fn.__qualname__


def _check(fn: Any, what: str) -> None:
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise TypeError(f"{what} takes a module-level function")
