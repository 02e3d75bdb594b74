"""Tasks for RemoteExecutor's tests (tests/client/test_executor.py): the shapes CPython's own executor
tests call (`mul(x, y)`, `divmod`), and one task registered under another name than its function's."""

from __future__ import annotations

from workers import task


@task
def ex_mul(x: int, y: int) -> int:
    return x * y


@task
def ex_divmod(a: int, b: int) -> list[int]:
    """divmod(a, b): b == 0 raises ZeroDivisionError in the worker."""
    return list(divmod(a, b))


@task(name="ex_cube")
def cube(x: int) -> int:
    """Registered as `ex_cube`: the executor must call it by that name, not by `cube`."""
    return x**3
