"""workers/arguments.py: which hints are JSON data already, and the worker's rebuilding of the others
(dataclasses, pydantic models, Enums, datetimes, tuples) from the plain data that travelled; nothing
added for a task whose parameters are all plain; the wrapper keeps the function's kind; and
Execution.run (the one body behind every transport) calls the task with the rebuilt objects."""

from __future__ import annotations

import asyncio
import datetime
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal, NotRequired, Optional

import pytest
from annotated_types import Interval
from typing_extensions import TypedDict

from tests.support.argument_tasks import Mode, Point, Polygon, Size, Style
from workers import arguments, registry
from workers.execution import Execution
from workers.protocol import CALL_TASK, RESULT_JSON

TASKS = "tests.support.argument_tasks"


class Plain(TypedDict):
    a: int
    b: NotRequired[list[str]]


class Nested(TypedDict):
    p: Point


@pytest.mark.parametrize(("hint", "plain"), [
    (int, True), (float, True), (str, True), (bool, True), (Any, True), (type(None), True),
    (Optional[int], True), (int | None, True), (Literal[1, "a", True, None, 0.5], True),  # noqa: UP045
    (Annotated[int, Interval(ge=0)], True), (list[int], True), (list, True), (dict, True),
    (dict[str, list[float]], True), (Plain, True), (list[Plain] | None, True), (Size, True),
    (Point, False), (Polygon, False), (Style, False), (Mode, False), (datetime.datetime, False),
    (tuple[int, int], False), (set[int], False), (dict[int, str], False), (bytes, False),
    (list[Point], False), (Nested, False), (Point | None, False), (int | Point, False),
])
def test_is_plain_says_which_values_are_their_json_data(hint, plain):
    assert arguments.is_plain(hint) is plain


@pytest.fixture(scope="module")
def specs() -> dict[str, registry.TaskSpec]:
    return registry.load([TASKS])


def test_bind_rebuilds_the_objects_from_their_json_data(specs):
    spec = specs["at_shapes"]
    kwargs = {"point": {"x": 1}, "polygon": {"name": "p", "points": [{"x": 2, "y": 3}]}, "size": {"w": 1, "h": 2},
              "style": {"color": "blue", "origin": {"x": 4}}}
    bound = arguments.bind(spec, kwargs)
    assert bound == {"point": Point(1.0), "polygon": Polygon("p", [Point(2.0, 3.0)]), "size": {"w": 1, "h": 2},
                     "style": Style(color="blue", origin=Point(4.0))}
    assert kwargs["point"] == {"x": 1}  # the caller's dict is not changed
    assert arguments.bind(spec, {"point": {"x": 1}}) == {"point": Point(1.0)}  # absent: the function's default


def test_bind_rebuilds_enums_datetimes_and_tuples(specs):
    assert arguments.bind(specs["at_literals"], {"mode": "slow", "size": 64}) == {"mode": Mode.SLOW, "size": 64}
    bound = arguments.bind(specs["at_when"], {"when": "2024-01-02T03:04:05Z", "span": [1, 2]})
    assert bound["when"] == datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert bound["span"] == (1, 2)


def test_a_task_with_only_plain_parameters_gets_its_arguments_and_function_untouched(specs):
    spec = specs["at_nothing"]
    kwargs = {"greeting": "hi"}
    assert arguments.bind(spec, kwargs) is kwargs
    assert arguments.binder(spec) is None
    assert arguments.bound(spec) is spec.fn
    blob = specs["at_blob"]  # a bytes parameter is never rebuilt: it travels as bytes
    assert "data" not in arguments.rich_params(blob)
    assert arguments.rich_params(blob) == ("anchor",)


def test_the_bound_function_rebuilds_and_keeps_the_name(specs):
    fn = arguments.bound(specs["at_shapes"])
    assert fn is not specs["at_shapes"].fn
    assert fn.__name__ == "at_shapes"
    assert fn(point={"x": 1})["point"] == {"type": "Point", "fields": {"x": 1.0, "y": 0.0}}


# Tasks of every kind with a rich parameter: the wrapper must stay a coroutine function, a generator
# function, an async generator function, so whoever runs it can tell how (registered by the test only).


async def co_point(p: Point) -> float:
    await asyncio.sleep(0)
    return p.x


def gen_points(p: Point, n: int) -> Iterator[float]:
    for i in range(n):
        yield p.x + i


async def agen_points(p: Point, n: int) -> AsyncIterator[float]:
    for i in range(n):
        yield p.x + i


def test_the_bound_function_keeps_the_kind_of_the_task():
    co = arguments.bound(registry.TaskSpec("pb_co", co_point, __name__))
    assert inspect.iscoroutinefunction(co)
    assert asyncio.run(co(p={"x": 2})) == 2.0
    gen = arguments.bound(registry.TaskSpec("pb_gen", gen_points, __name__))
    assert inspect.isgeneratorfunction(gen)
    assert list(gen(p={"x": 1}, n=3)) == [1.0, 2.0, 3.0]
    agen = arguments.bound(registry.TaskSpec("pb_agen", agen_points, __name__))
    assert inspect.isasyncgenfunction(agen)

    async def collect() -> list[float]:
        return [x async for x in agen(p={"x": 5}, n=2)]

    assert asyncio.run(collect()) == [5.0, 6.0]


def test_execution_calls_the_task_with_the_rebuilt_objects(specs):
    tag, value = Execution().run(CALL_TASK, "at_shapes", {"point": {"x": 7}, "style": {"width": 2}},
                                 True, False, 1, None)
    assert tag == RESULT_JSON, value
    assert b'"type":"Point"' in value and b'"type":"Style"' in value
