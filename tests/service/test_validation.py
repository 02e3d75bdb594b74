"""service.validation and workers.registry: the task catalog built from type hints (strict JSON
validation, lenient query strings for binary calls, JSON Schemas) and the `@task` decorator."""

from __future__ import annotations

import sys
import textwrap
from typing import Any

import orjson
import pytest

from service.openapi import build_openapi
from service.problems import Problem
from service.validation import TaskCatalog, TaskDefinitionError, build_entry
from workers import registry, task

BUILTINS = {"primes", "burn", "sha256", "mandelbrot"}


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog(registry.load(()))


def refused(catalog: TaskCatalog, name: str, args: Any) -> Problem:
    with pytest.raises(Problem) as info:
        catalog.validate_json(catalog.get(name), args)
    return info.value


def fields(problem: Problem) -> list[str]:
    return [e["field"] for e in problem.extra["errors"]]


def test_builtins_are_loaded(catalog):
    assert {e.name for e in catalog} == BUILTINS
    assert len(catalog) == 4


def test_unknown_task_is_404(catalog):
    with pytest.raises(Problem) as info:
        catalog.get("nope")
    assert (info.value.status, info.value.slug) == (404, "unknown-task")


def test_valid_json_arguments(catalog):
    assert catalog.validate_json(catalog.get("primes"), {"limit": 10}) == {"limit": 10}
    args = catalog.validate_json(catalog.get("mandelbrot"), {"width": 4, "height": 3})
    assert args == {"width": 4, "height": 3, "max_iter": 256, "x": -0.5, "y": 0.0, "zoom": 1.0}


@pytest.mark.parametrize("value", ["5", True, False, 5.5, None, [5], {"n": 5}])
def test_int_is_strict(catalog, value):
    problem = refused(catalog, "primes", {"limit": value})
    assert (problem.status, problem.slug) == (422, "invalid-arguments")
    assert fields(problem) == ["limit"]
    assert problem.detail.startswith("limit:")


def test_ints_are_accepted_for_floats(catalog):
    args = catalog.validate_json(catalog.get("burn"), {"ms": 5})
    assert args == {"ms": 5.0}
    assert isinstance(args["ms"], float)


@pytest.mark.parametrize("value", ["5", True])
def test_float_is_strict(catalog, value):
    assert fields(refused(catalog, "burn", {"ms": value})) == ["ms"]


def test_unknown_argument_is_named(catalog):
    problem = refused(catalog, "primes", {"limit": 5, "limti": 6})
    assert fields(problem) == ["limti"]
    assert "limti" in problem.detail
    assert "unknown" in problem.detail


def test_missing_argument_is_named(catalog):
    problem = refused(catalog, "primes", {})
    assert fields(problem) == ["limit"]
    assert "missing" in problem.detail


def test_several_errors_are_all_reported(catalog):
    problem = refused(catalog, "mandelbrot", {"width": "4", "zoom": 0})
    assert set(fields(problem)) == {"width", "height", "zoom"}


def test_arguments_must_be_an_object(catalog):
    with pytest.raises(Problem) as info:
        catalog.validate_json(catalog.get("primes"), [1])
    assert (info.value.status, info.value.slug) == (422, "invalid-arguments")


@pytest.mark.parametrize(
    ("name", "args", "ok"),
    [
        ("primes", {"limit": -1}, False),
        ("primes", {"limit": 10**8 + 1}, False),
        ("primes", {"limit": 10**8}, True),
        ("primes", {"limit": 0}, True),
        ("burn", {"ms": -0.5}, False),
        ("burn", {"ms": 0}, True),
        ("sha256", {"data": "x", "rounds": 0}, False),
        ("sha256", {"data": "x", "rounds": 10**6}, True),
        ("sha256", {"data": "x", "rounds": 10**6 + 1}, False),
        ("mandelbrot", {"width": 0, "height": 1}, False),
        ("mandelbrot", {"width": 4097, "height": 1}, False),
        ("mandelbrot", {"width": 1, "height": 1, "zoom": 0}, False),
        ("mandelbrot", {"width": 1, "height": 1, "x": 11}, False),
    ],
)
def test_declared_ranges_are_enforced(catalog, name, args, ok):
    if ok:
        assert catalog.validate_json(catalog.get(name), args)
    else:
        problem = refused(catalog, name, args)
        assert problem.status == 422
        assert fields(problem) and set(fields(problem)) <= set(args)


def test_bytes_parameter_takes_text_in_json(catalog):
    assert catalog.validate_json(catalog.get("sha256"), {"data": "héllo"}) == {"data": "héllo".encode(), "rounds": 1}
    assert fields(refused(catalog, "sha256", {"data": 5})) == ["data"]


# -- JSON Schemas of the built-ins -------------------------------------------------------------------


def schema_of(catalog: TaskCatalog, name: str) -> dict[str, Any]:
    schema = catalog.get(name).schema
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    return schema


def test_primes_schema(catalog):
    schema = schema_of(catalog, "primes")
    assert schema["required"] == ["limit"]
    limit = schema["properties"]["limit"]
    assert (limit["type"], limit["minimum"], limit["maximum"]) == ("integer", 0, 10**8)
    assert schema["description"]


def test_burn_schema(catalog):
    schema = schema_of(catalog, "burn")
    assert schema["required"] == ["ms"]
    assert schema["properties"]["ms"]["type"] == "number"
    assert schema["properties"]["ms"]["minimum"] == 0


def test_sha256_schema(catalog):
    schema = schema_of(catalog, "sha256")
    assert schema["required"] == ["data"]
    assert [arm["type"] for arm in schema["properties"]["data"]["anyOf"]] == ["string", "object"]  # or base64
    rounds = schema["properties"]["rounds"]
    assert (rounds["type"], rounds["minimum"], rounds["maximum"], rounds["default"]) == ("integer", 1, 10**6, 1)


def test_mandelbrot_schema(catalog):
    schema = schema_of(catalog, "mandelbrot")
    assert sorted(schema["required"]) == ["height", "width"]
    props = schema["properties"]
    assert set(props) == {"width", "height", "max_iter", "x", "y", "zoom"}
    for name in ("width", "height", "max_iter"):
        assert props[name]["type"] == "integer"
        assert props[name]["minimum"] == 1
    for name in ("x", "y", "zoom"):
        assert props[name]["type"] == "number"
    assert props["width"]["maximum"] == 4096
    assert props["zoom"]["exclusiveMinimum"] == 0
    assert props["max_iter"]["default"] == 256


# -- binary calls ------------------------------------------------------------------------------------


def test_binary_call_parses_query_args_leniently(catalog):
    args = catalog.validate_binary(catalog.get("sha256"), {"rounds": "7"}, b"\x00\xff")
    assert args == {"data": b"\x00\xff", "rounds": 7}
    assert catalog.validate_binary(catalog.get("sha256"), {}, b"") == {"data": b"", "rounds": 1}


def test_binary_call_still_checks_query_args(catalog):
    entry = catalog.get("sha256")
    for query, field in [({"rounds": "abc"}, "rounds"), ({"rounds": "0"}, "rounds"), ({"salt": "x"}, "salt")]:
        with pytest.raises(Problem) as info:
            catalog.validate_binary(entry, query, b"x")
        assert info.value.status == 422
        assert fields(info.value) == [field]


def test_bytes_param_cannot_come_from_the_query_string(catalog):
    with pytest.raises(Problem) as info:
        catalog.validate_binary(catalog.get("sha256"), {"data": "abc"}, b"x")
    assert (info.value.status, info.value.slug) == (422, "invalid-arguments")
    assert fields(info.value) == ["data"]


@pytest.mark.parametrize("name", ["primes", "burn", "mandelbrot"])
def test_task_without_bytes_param_refuses_binary(catalog, name):
    with pytest.raises(Problem) as info:
        catalog.validate_binary(catalog.get(name), {}, b"x")
    assert (info.value.status, info.value.slug) == (415, "unsupported-media-type")


# -- user tasks --------------------------------------------------------------------------------------

USER_MODULE = "pbtest_user_tasks"
USER_SOURCE = '''
from __future__ import annotations

from typing import Annotated, Literal, Optional

from annotated_types import Interval
from typing_extensions import TypedDict

from workers import task


class Point(TypedDict):
    x: float
    y: float


@task
def pbtest_mixed(
    items: list[int],
    weights: dict[str, float],
    mode: Literal["fast", "slow"] = "fast",
    label: Optional[str] = None,
    verbose: bool = False,
    level: Annotated[int, Interval(ge=1, le=5)] = 1,
) -> dict:
    """Exercise every kind of argument.

    The second paragraph is not part of the schema's description.
    """
    return {}


@task(name="pbtest_blob")
def blob_task(blob: bytes, tag: str | None = None, count: int = 0) -> bytes:
    return blob


@task
def pbtest_shapes(points: list[Point], origin: Point | None = None) -> int:
    return len(points)


@task
def pbtest_maybe_blob(data: bytes | None = None, salt: int = 0) -> str:
    return "none" if data is None else str(len(data))
'''


@pytest.fixture(scope="module")
def user_catalog(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("user_tasks")
    (folder / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_SOURCE))
    sys.path.insert(0, str(folder))
    try:
        yield TaskCatalog(registry.load([USER_MODULE]))
    finally:
        sys.path.remove(str(folder))


def test_user_module_is_loaded_beside_the_builtins(user_catalog):
    assert {e.name for e in user_catalog} == BUILTINS | {
        "pbtest_mixed", "pbtest_blob", "pbtest_shapes", "pbtest_maybe_blob"
    }
    # a catalog without the module does not show its tasks, though the registry holds them
    assert "pbtest_mixed" not in {e.name for e in TaskCatalog(registry.load(()))}


def test_user_task_schema(user_catalog):
    schema = user_catalog.get("pbtest_mixed").schema
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["items", "weights"]
    props = schema["properties"]
    assert props["items"] == {**props["items"], "type": "array", "items": {"type": "integer"}}
    assert props["weights"]["type"] == "object"
    assert props["weights"]["additionalProperties"] == {"type": "number"}
    assert props["mode"]["enum"] == ["fast", "slow"]
    assert props["mode"]["default"] == "fast"
    assert {"type": "null"} in props["label"]["anyOf"]
    assert {"type": "string"} in props["label"]["anyOf"]
    assert props["verbose"]["type"] == "boolean"
    assert (props["level"]["minimum"], props["level"]["maximum"]) == (1, 5)
    assert schema["description"] == "Exercise every kind of argument."


def test_user_task_validation(user_catalog):
    entry = user_catalog.get("pbtest_mixed")
    args = user_catalog.validate_json(entry, {"items": [1, 2], "weights": {"a": 1, "b": 2.5}, "label": None})
    assert args == {"items": [1, 2], "weights": {"a": 1.0, "b": 2.5}, "mode": "fast", "label": None,
                    "verbose": False, "level": 1}
    full = {"items": [], "weights": {}, "mode": "slow", "label": "x", "verbose": True, "level": 5}
    assert user_catalog.validate_json(entry, full) == full
    for bad, field in [
        ({"items": [1, "2"], "weights": {}}, "items.1"),
        ({"items": [1], "weights": {"a": "x"}}, "weights.a"),
        ({"items": [], "weights": [], }, "weights"),
        ({"items": [], "weights": {}, "mode": "medium"}, "mode"),
        ({"items": [], "weights": {}, "verbose": 1}, "verbose"),
        ({"items": [], "weights": {}, "label": 3}, "label"),
        ({"items": [], "weights": {}, "level": 6}, "level"),
    ]:
        with pytest.raises(Problem) as info:
            user_catalog.validate_json(entry, bad)
        assert info.value.status == 422
        assert fields(info.value) == [field], bad
        assert info.value.detail.startswith(field + ":")


def test_user_bytes_task_under_a_future_annotations_module(user_catalog):
    entry = user_catalog.get("pbtest_blob")
    assert entry.spec.fn.__name__ == "blob_task"
    assert entry.spec.bytes_param == "blob"
    assert entry.spec.returns_bytes
    assert {"string", "object"} == {arm["type"] for arm in entry.schema["properties"]["blob"]["anyOf"]}
    assert user_catalog.validate_binary(entry, {"tag": "t", "count": "3"}, b"zz") == {
        "blob": b"zz", "tag": "t", "count": 3,
    }
    assert user_catalog.validate_json(entry, {"blob": "zz"}) == {"blob": b"zz", "tag": None, "count": 0}


def test_nested_types_validate_and_stay_resolvable_in_openapi(user_catalog):
    entry = user_catalog.get("pbtest_shapes")
    args = user_catalog.validate_json(entry, {"points": [{"x": 1, "y": 2.5}]})
    assert args == {"points": [{"x": 1.0, "y": 2.5}], "origin": None}
    with pytest.raises(Problem) as info:
        user_catalog.validate_json(entry, {"points": [{"x": 1}]})
    assert fields(info.value) == ["points.0.y"]
    assert "$defs" in entry.schema  # the listed schema is self-contained

    doc = orjson.loads(build_openapi(user_catalog))
    schema = doc["paths"]["/v1/tasks/pbtest_shapes"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$defs" not in schema
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(doc)
    assert "#/components/schemas/pbtest_shapes.Point" in refs
    for ref in refs:  # each one resolves inside the OpenAPI document
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, ref
            target = target[part]
    assert doc["components"]["schemas"]["pbtest_shapes.Point"]["required"] == ["x", "y"]


class NotJson:
    pass


def takes_an_object(thing: NotJson) -> int:
    return 0


def test_type_hints_that_are_not_json_fail_clearly():
    spec = registry.TaskSpec("pbtest_not_json", takes_an_object, __name__)
    with pytest.raises(TaskDefinitionError) as info:
        build_entry(spec)
    assert "pbtest_not_json" in str(info.value)
    assert "NotJson" in str(info.value)


# -- the @task decorator -----------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test do not outlive it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def module_level_a(n: int) -> int:
    return n


def module_level_b(n: int) -> int:
    return -n


def test_task_returns_the_function_unchanged(isolated_registry):
    assert task(module_level_a) is module_level_a
    spec = registry.get("module_level_a")
    assert spec is not None
    assert spec.fn is module_level_a
    assert spec.module == __name__
    assert module_level_a(3) == 3


def test_name_override(isolated_registry):
    assert task(name="pbtest_renamed")(module_level_a) is module_level_a
    spec = registry.get("pbtest_renamed")
    assert spec is not None and spec.fn is module_level_a
    assert registry.get("module_level_a") is None


def test_registering_the_same_function_again_is_harmless(isolated_registry):
    task(name="pbtest_again")(module_level_a)
    task(name="pbtest_again")(module_level_a)  # e.g. a module imported twice
    assert registry.get("pbtest_again").fn is module_level_a


@pytest.mark.parametrize("bad", ["not-an-identifier", "two words", "", "1st"])
def test_non_identifier_name_is_refused(isolated_registry, bad):
    with pytest.raises(ValueError, match="identifier"):
        task(name=bad)(module_level_a)
    assert registry.get(bad) is None


def test_duplicate_name_from_another_function_is_refused(isolated_registry):
    task(name="pbtest_dup")(module_level_a)
    with pytest.raises(ValueError, match="already registered"):
        task(name="pbtest_dup")(module_level_b)
    assert registry.get("pbtest_dup").fn is module_level_a


def test_builtin_name_cannot_be_taken(isolated_registry):
    registry.load(())
    with pytest.raises(ValueError, match="already registered"):
        task(name="primes")(module_level_b)


def test_nested_function_is_refused(isolated_registry):
    def inner(n: int) -> int:
        return n

    with pytest.raises(TypeError, match="module-level"):
        task(inner)
    with pytest.raises(TypeError):
        task(name="pbtest_inner")(inner)
    assert registry.get("inner") is None
    assert registry.get("pbtest_inner") is None


def test_lambda_is_refused(isolated_registry):
    with pytest.raises(TypeError):
        task(name="pbtest_lambda")(lambda n: n)


def test_optional_bytes_parameter_is_the_binary_parameter(user_catalog):
    entry = user_catalog.get("pbtest_maybe_blob")
    assert entry.spec.bytes_param == "data"
    assert {"type": "null"} in entry.schema["properties"]["data"]["anyOf"]
    assert user_catalog.validate_json(entry, {"data": "hé"}) == {"data": "hé".encode(), "salt": 0}
    assert user_catalog.validate_json(entry, {"data": None}) == {"data": None, "salt": 0}
    assert user_catalog.validate_binary(entry, {"salt": "2"}, b"xy") == {"data": b"xy", "salt": 2}
