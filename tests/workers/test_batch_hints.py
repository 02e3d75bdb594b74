"""`registry.element_hints`: what one call of a `batch=` task is validated against, and the refusal of a batch
parameter that is not a list."""

from __future__ import annotations

from typing import Annotated, Any

import pytest

from workers.registry import Batch, TaskSpec, element_hints


def plain(x: int, y: str = "a") -> int:
    return x


def batched(x: list[int], y: Annotated[list[float], "doc"], z: tuple[str, ...] = ("a",)) -> list[int]:
    return x


def wrong(x: list[int], y: int) -> list[int]:
    return x


def spec(fn: Any, batch: Batch | None) -> TaskSpec:
    return TaskSpec(fn.__name__, fn, __name__, batch=batch)


def test_a_plain_tasks_hints_are_its_own():
    assert element_hints(spec(plain, None)) == {"x": int, "y": str, "return": int}


def test_a_batch_tasks_hints_are_the_elements_of_its_lists():
    assert element_hints(spec(batched, Batch())) == {"x": int, "y": float, "z": str, "return": int}


def test_a_batch_parameter_that_is_not_a_list_is_refused_naming_the_task_and_parameter():
    with pytest.raises(ValueError, match=r"task 'wrong'.*parameter 'y'.*write list\[\.\.\.\]"):
        element_hints(spec(wrong, Batch()))
