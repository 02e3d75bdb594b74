"""Query-string arguments: the text of `?size=64` turned into the JSON value the task's type asks for.

A binary call takes its other arguments from the query string, where everything is text. Each one is
parsed here by its type hint, once per parameter at start-up, into the value the same argument would
have in a JSON body, and then validated exactly like JSON (service/validation.py), so `?size=64`
fits `Literal[64, 128, 256]` and `/openapi.json` can type the query parameter as it is parsed:

- `int`, `float`: a decimal number (`inf`, `nan`, `1_000` and hex are not numbers here);
- `bool`: `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`, any case);
- a `Literal` (or an `Enum`): its value written as in JSON without quotes (`64`, `true`, `fast`, `null`);
- `X | None`: `null` or an empty value is null, unless X takes that text itself (a `str` does);
- an object or array (a dataclass, TypedDict, pydantic model, list, dict, tuple, set): JSON text,
  e.g. `?box={"w":2,"h":3}` (URL-encoded); text that is not JSON is 422 naming the argument;
- anything else (`str`, a datetime, a UUID, ...): the text itself.

A text that does not parse as its type is passed on unchanged, so validation refuses it with the
usual 422 naming the argument ("Input should be a valid integer").
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel
from typing_extensions import is_typeddict

from service.problems import invalid_argument
from workers.arguments import strip_annotated

Parse = Callable[[str], Any]

_NO: Any = object()  # "this text is not a value of that type"
_INT = re.compile(r"[+-]?\d{1,4300}")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_OBJECT_ORIGINS = (list, dict, tuple, set, frozenset)


def _text(text: str) -> Any:
    return text


def _int(text: str) -> Any:
    return int(text) if _INT.fullmatch(text) else _NO


def _float(text: str) -> Any:
    value = float(text) if _FLOAT.fullmatch(text) else math.inf
    return value if math.isfinite(value) else _NO


def _bool(text: str) -> Any:
    lowered = text.lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else _NO


def _none(text: str) -> Any:
    return None if text in ("", "null") else _NO


def _literal(values: tuple[Any, ...]) -> Parse:
    by_text: dict[str, Any] = {}
    for value in values:
        raw = value.value if isinstance(value, enum.Enum) else value
        if isinstance(raw, str):
            by_text.setdefault(raw, raw)
        elif raw is None or isinstance(raw, bool | int | float):
            by_text.setdefault(orjson.dumps(raw).decode(), raw)

    def parse(text: str) -> Any:
        found = by_text.get(text, _NO)
        if found is _NO and _FLOAT.fullmatch(text):  # `+64`, `64.0` for 64
            number = float(text)
            found = next((v for v in by_text.values() if type(v) in (int, float) and v == number), _NO)
        return found

    return parse


def _union(parsers: list[Parse], text_arm: bool, none_arm: bool) -> Parse:
    def parse(text: str) -> Any:
        for one in parsers:
            value = one(text)
            if value is not _NO:
                return value
        if text_arm:
            return text
        return _none(text) if none_arm else _NO

    return parse


def _is_object(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if origin in _OBJECT_ORIGINS or is_typeddict(tp) or dataclasses.is_dataclass(tp):
        return True
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def parser(hint: Any) -> tuple[Parse, bool]:
    """(text -> value or _NO, whether the type takes a string as it is)."""
    tp = strip_annotated(hint)
    if tp in (int, float, bool):
        return {int: _int, float: _float, bool: _bool}[tp], False
    if tp is type(None):
        return _none, False
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return _literal(typing.get_args(tp)), False
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _literal(tuple(tp)), False
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if strip_annotated(a) is not type(None)]
        none_arm = len(arms) < len(typing.get_args(tp))
        parsed = [parser(a) for a in arms]
        text_arm = any(takes_text for _, takes_text in parsed)
        return _union([p for p, takes_text in parsed if not takes_text], text_arm, none_arm), text_arm
    if _is_object(tp):
        return _NO_PARSE, False  # marked: JSON text, see `query_parser`
    return _text, True


def _NO_PARSE(text: str) -> Any:
    return _NO


def is_json_text(hint: Any) -> bool:
    """Whether the argument is given as JSON text in a query string (an object or an array,
    possibly optional): /openapi.json then describes it with `content: application/json`."""
    tp = strip_annotated(hint)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [strip_annotated(a) for a in typing.get_args(tp) if strip_annotated(a) is not type(None)]
        return bool(arms) and all(_is_object(a) for a in arms)
    return _is_object(tp)


def query_parser(name: str, hint: Any) -> Parse:
    """The parse of one query-string argument: its text -> the value to validate as JSON."""
    if is_json_text(hint):
        optional = typing.get_origin(strip_annotated(hint)) in (typing.Union, types.UnionType)

        def from_json(text: str) -> Any:
            if optional and text == "":
                return None
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise invalid_argument(
                    name, f"in the query string this argument is JSON text (e.g. {{...}} or [...]): {exc}",
                    "not JSON text",
                ) from None

        return from_json
    parse, _ = parser(hint)

    def from_text(text: str) -> Any:
        value = parse(text)
        return text if value is _NO else value

    return from_text
