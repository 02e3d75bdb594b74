"""Argument types beyond JSON scalars, in the service: dataclasses, TypedDicts, pydantic models,
Literals of every JSON scalar, Enums and datetimes validated as JSON and passed on as plain data;
query-string values parsed to their declared type; bytes in JSON as text or {"base64": ...};
a bare call; start-up refusals of hints the service cannot serve; and /openapi.json saying all of
that as it is. (The worker's side, rebuilding the objects: tests/workers/test_arguments.py; over
HTTP with a real server: tests/e2e/test_argument_types_http.py.)"""

from __future__ import annotations

from typing import Any, Literal

import orjson
import pytest

from service.openapi import build_openapi
from service.problems import Problem
from service.query_args import query_parser
from service.validation import TaskCatalog, TaskDefinitionError, build_entry
from tests.support.argument_tasks import Mode, Size
from workers import registry

TASKS = "tests.support.argument_tasks"


@pytest.fixture(scope="module")
def catalog() -> TaskCatalog:
    return TaskCatalog(registry.load([TASKS]))


def refusal(call: Any, *args: Any) -> Problem:
    with pytest.raises(Problem) as info:
        call(*args)
    return info.value


def fields(problem: Problem) -> list[str]:
    return [e["field"] for e in problem.extra["errors"]]


# -- JSON objects: dataclasses, TypedDicts, pydantic models --------------------------------------------


def test_object_arguments_are_validated_and_passed_on_as_the_json_data_given(catalog):
    entry = catalog.get("at_shapes")
    args = {"point": {"x": 1}, "polygon": {"name": "p", "points": [{"x": 1, "y": 2}]},
            "size": {"w": 2, "h": 3, "unit": "px"}, "style": {"color": "blue", "origin": {"x": 0.5}}}
    kwargs = catalog.validate_json(entry, args)
    assert kwargs == args  # plain data, as given: the worker builds the objects
    assert orjson.loads(orjson.dumps(kwargs)) == kwargs  # nothing but JSON data crosses to a worker
    assert entry.rich == {"point", "polygon", "style"}  # the TypedDict is JSON data already


def test_an_object_argument_left_out_is_left_out_so_the_functions_default_applies(catalog):
    assert catalog.validate_json(catalog.get("at_shapes"), {"point": {"x": 1}}) == {"point": {"x": 1}, "size": None}


@pytest.mark.parametrize(("args", "field"), [
    ({"point": {"x": "1"}}, "point.x"),  # strict inside objects too: no "1" for a float
    ({"point": {"y": 1}}, "point.x"),
    ({"point": {"x": 1, "z": 2}}, "point.z"),  # a dataclass takes no unknown field
    ({"point": [1, 2]}, "point"),
    ({"point": {"x": 1}, "polygon": {"name": "p", "points": [{"x": 1}, {"y": 2}]}}, "polygon.points.1.x"),
    ({"point": {"x": 1}, "size": {"w": 1, "h": 2, "unit": "cm"}}, "size.unit"),
    ({"point": {"x": 1}, "style": {"width": 11}}, "style.width"),  # the model's own Field(le=10)
    ({"point": {"x": 1}, "style": {"origin": {"x": True}}}, "style.origin.x"),
])
def test_object_argument_errors_name_the_path_to_the_field(catalog, args, field):
    problem = refusal(catalog.validate_json, catalog.get("at_shapes"), args)
    assert (problem.status, problem.slug) == (422, "invalid-arguments")
    assert fields(problem) == [field]
    assert problem.detail.startswith(field + ":")


def test_literals_of_every_json_scalar_and_enums_in_json(catalog):
    entry = catalog.get("at_literals")
    args = {"size": 256, "flag": True, "ratio": 1.5, "name": "b", "mode": "slow"}
    assert catalog.validate_json(entry, args) == args
    for bad, field in [({"size": 65}, "size"), ({"size": "64"}, "size"), ({"flag": False}, "flag"),
                       ({"ratio": 2.5}, "ratio"), ({"name": "c"}, "name"), ({"mode": "FAST"}, "mode")]:
        assert fields(refusal(catalog.validate_json, entry, bad)) == [field], bad


def test_datetimes_and_tuples_travel_as_their_json_data(catalog):
    entry = catalog.get("at_when")
    args = {"when": "2024-01-02T03:04:05Z", "span": [1, 2]}
    assert catalog.validate_json(entry, args) == args
    assert fields(refusal(catalog.validate_json, entry, {"when": "yesterday"})) == ["when"]
    assert fields(refusal(catalog.validate_json, entry, {"when": "2024-01-02T00:00:00", "span": [1, 2, 3]})) == ["span"]


# -- bytes in JSON -------------------------------------------------------------------------------------


def test_a_bytes_argument_takes_standard_base64_in_an_object(catalog):
    entry = catalog.get("at_blob")
    assert catalog.validate_json(entry, {"data": {"base64": "AAEC/w=="}})["data"] == b"\x00\x01\x02\xff"
    assert catalog.validate_json(entry, {"data": {"base64": ""}})["data"] == b""
    assert catalog.validate_json(entry, {"data": "AAEC/w=="})["data"] == b"AAEC/w=="  # a string stays UTF-8 text
    assert catalog.validate_json(catalog.get("sha256"), {"data": {"base64": "aGk="}}) == {"data": b"hi", "rounds": 1}


@pytest.mark.parametrize("text", ["AAEC/w=", "AAEC/w", "AA EC/w==", "AAEC_w==", "AAEC-w==", "é===", "AAEC/w==\n"])
def test_invalid_base64_is_422_naming_the_field(catalog, text):
    problem = refusal(catalog.validate_json, catalog.get("at_blob"), {"data": {"base64": text}})
    assert fields(problem) == ["data"]
    assert problem.detail.startswith("data: invalid base64")


@pytest.mark.parametrize("value", [5, None, ["AA=="], {"base64": 5}, {"base64": "AA==", "more": 1}, {"b64": "AA=="}])
def test_a_bytes_argument_refuses_anything_but_text_or_base64(catalog, value):
    problem = refusal(catalog.validate_json, catalog.get("at_blob"), {"data": value})
    assert fields(problem) == ["data"]
    assert '{"base64": "<standard base64>"}' in problem.detail


# -- the query string of a binary call -----------------------------------------------------------------


def test_query_string_values_are_parsed_to_the_declared_type(catalog):
    query = {"size": "64", "scale": "2.5", "level": "3", "verbose": "true", "label": "x", "count": "7",
             "box": '{"w": 1, "h": 2}', "anchor": '{"x": 1}', "tags": '["a", "b"]'}
    kwargs = catalog.validate_binary(catalog.get("at_blob"), query, b"\x00")
    assert kwargs == {"data": b"\x00", "size": 64, "scale": 2.5, "level": 3, "verbose": True, "label": "x",
                      "count": 7, "box": {"w": 1, "h": 2}, "anchor": {"x": 1}, "tags": ["a", "b"]}


@pytest.mark.parametrize(("query", "field"), [
    ({"size": "65"}, "size"), ({"size": "sixty-four"}, "size"), ({"level": "10"}, "level"),
    ({"level": "1_0"}, "level"), ({"level": "0x1"}, "level"), ({"level": "1.5"}, "level"),
    ({"scale": "inf"}, "scale"), ({"scale": "nan"}, "scale"), ({"scale": "1e999"}, "scale"),
    ({"verbose": "maybe"}, "verbose"), ({"count": "seven"}, "count"),
    ({"box": '{"w": 1}'}, "box.h"), ({"box": "{"}, "box"), ({"anchor": "x=1"}, "anchor"),
    ({"tags": "a,b"}, "tags"), ({"nope": "1"}, "nope"),
])
def test_query_string_values_that_do_not_parse_are_422_naming_the_field(catalog, query, field):
    problem = refusal(catalog.validate_binary, catalog.get("at_blob"), query, b"")
    assert (problem.status, fields(problem)) == (422, [field])


@pytest.mark.parametrize(("hint", "text", "value"), [
    (int, "-12", -12), (int, "+3", 3), (float, "2", 2.0), (float, ".5e1", 5.0), (bool, "FALSE", False),
    (bool, "1", True), (bool, "off", False), (Literal[64, 128], "128", 128), (Literal[64, 128], "+64", 64),
    (Literal[True], "true", True), (Literal[0.5, 1.5], "1.5", 1.5), (Literal["a", "64"], "64", "64"),
    (Literal[None, "x"], "null", None), (Mode, "slow", "slow"), (int | None, "", None), (int | None, "null", None),
    (int | None, "5", 5), (str | None, "null", "null"), (str | None, "", ""), (int | str, "5", 5),
    (int | str, "five", "five"), (Size | None, "", None), (Size, '{"w": 1, "h": 2}', {"w": 1, "h": 2}),
    (list[int], "[1, 2]", [1, 2]), (dict[str, int], '{"a": 1}', {"a": 1}), (str, '{"a": 1}', '{"a": 1}'),
])
def test_query_parser_turns_text_into_the_json_value_of_the_type(hint, text, value):
    parsed = query_parser("arg", hint)(text)
    assert parsed == value and type(parsed) is type(value)


# -- a bare call ---------------------------------------------------------------------------------------


def test_a_bare_call_runs_a_task_without_required_arguments(catalog):
    assert catalog.validate_bare(catalog.get("at_nothing")) == {"greeting": "hello"}


def test_a_bare_call_of_a_task_with_required_arguments_names_them_and_how_to_send_them(catalog):
    problem = refusal(catalog.validate_bare, catalog.get("primes"))
    assert (problem.status, problem.slug, fields(problem)) == (422, "invalid-arguments", ["limit"])
    assert "application/json" in problem.detail and "octet-stream" not in problem.detail
    problem = refusal(catalog.validate_bare, catalog.get("sha256"))
    assert fields(problem) == ["data"] and "application/octet-stream" in problem.detail
    assert fields(refusal(catalog.validate_bare, catalog.get("mandelbrot"))) == ["width", "height"]


# -- hints the service cannot serve: refused at start-up -----------------------------------------------


class NotJson:
    pass


def takes_an_object(thing: NotJson, n: int = 0) -> int:
    return 0


def takes_a_list_of_objects(n: int, things: list[NotJson] | None = None) -> int:
    return 0


def takes_positional_only(n: int, /) -> int:
    return n


@pytest.mark.parametrize(("fn", "param"), [(takes_an_object, "thing"), (takes_a_list_of_objects, "things")])
def test_a_hint_that_is_not_json_is_refused_naming_task_parameter_and_what_to_write(fn, param):
    with pytest.raises(TaskDefinitionError) as info:
        build_entry(registry.TaskSpec("pb_not_json", fn, __name__))
    message = str(info.value)
    assert message.startswith(f"task 'pb_not_json' ({__name__}.{fn.__qualname__}): parameter {param!r}")
    assert "NotJson" in message
    assert "a dataclass, a TypedDict or a pydantic model instead" in message
    assert "arbitrary_types_allowed" not in message  # advice a task author cannot follow


def test_a_positional_only_parameter_is_refused_naming_it():
    with pytest.raises(TaskDefinitionError, match=r"task 'pb_positional' .*parameter 'n' is positional-only"):
        build_entry(registry.TaskSpec("pb_positional", takes_positional_only, __name__))


# -- /openapi.json -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc(catalog) -> dict[str, Any]:
    return dict(orjson.loads(build_openapi(catalog)))


def test_query_parameters_are_typed_as_they_are_parsed(doc):
    params = {p["name"]: p for p in doc["paths"]["/v1/tasks/at_blob"]["post"]["parameters"]}
    assert set(params) == {"timeout", "size", "scale", "level", "verbose", "label", "count", "box", "anchor", "tags"}
    assert params["size"]["schema"]["enum"] == [64, 128, 256] and params["size"]["schema"]["type"] == "integer"
    assert params["verbose"]["schema"]["type"] == "boolean"
    assert (params["level"]["schema"]["minimum"], params["level"]["schema"]["maximum"]) == (0, 9)
    for name in ("box", "anchor", "tags"):  # objects and arrays: JSON text
        assert "schema" not in params[name]
        assert set(params[name]["content"]) == {"application/json"}
        assert "JSON text" in params[name]["description"]
    anchor = params["anchor"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/at_blob.Point"} in anchor["anyOf"]


def test_bytes_in_json_are_documented_as_text_or_base64(doc):
    body = doc["paths"]["/v1/tasks/at_blob"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    text, base64 = body["properties"]["data"]["anyOf"]
    assert text["type"] == "string"
    assert base64["required"] == ["base64"] and base64["additionalProperties"] is False
    assert base64["properties"]["base64"]["contentEncoding"] == "base64"


def test_object_arguments_are_documented_as_their_components(doc):
    schemas = doc["components"]["schemas"]
    assert schemas["at_shapes.Point"]["required"] == ["x"]
    assert schemas["at_shapes.Point"]["additionalProperties"] is False
    assert schemas["at_shapes.Style"]["properties"]["color"]["enum"] == ["red", "green", "blue"]
    body = doc["paths"]["/v1/tasks/at_shapes"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"]["properties"]["point"] == {
        "$ref": "#/components/schemas/at_shapes.Point"}


def test_a_task_without_required_arguments_documents_its_body_as_optional(doc):
    assert doc["paths"]["/v1/tasks/at_nothing"]["post"]["requestBody"]["required"] is False
    assert doc["paths"]["/v1/tasks/primes"]["post"]["requestBody"]["required"] is True


def test_one_task_is_documented_under_get(doc):
    op = doc["paths"]["/v1/tasks/{name}"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Task"}
    assert "404" in op["responses"]
    assert doc["components"]["schemas"]["TaskList"]["properties"]["tasks"]["items"] == {
        "$ref": "#/components/schemas/Task"}
