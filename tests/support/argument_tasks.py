"""Tasks with every kind of argument the service takes beyond JSON scalars (dataclasses, TypedDicts,
pydantic models, Literals of every JSON scalar, Enums, datetimes, tuples, bytes as base64), for
tests/service/test_argument_types.py, tests/workers/test_arguments.py and
tests/e2e/test_argument_types_http.py. Each task reports the Python types it received, so a test
sees what the worker rebuilt. Named at_* because the registry is process-wide."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

from annotated_types import Interval
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from workers import task


@dataclass
class Point:
    x: float
    y: float = 0.0


@dataclass
class Polygon:
    name: str
    points: list[Point] = field(default_factory=list)


class Size(TypedDict):
    w: int
    h: int
    unit: NotRequired[Literal["px", "mm"]]


class Style(BaseModel):
    color: Literal["red", "green", "blue"] = "red"
    width: Annotated[float, Field(gt=0, le=10)] = 1.0
    origin: Point | None = None


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


def _describe(value: Any) -> Any:
    """A value with the type of each part named, so a test sees what the task really got."""
    if isinstance(value, list):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {"type": "dict", "items": {k: _describe(v) for k, v in value.items()}}
    if isinstance(value, Point | Polygon):
        return {"type": type(value).__name__, "fields": {k: _describe(v) for k, v in vars(value).items()}}
    if isinstance(value, BaseModel):
        return {"type": type(value).__name__, "fields": {k: _describe(v) for k, v in dict(value).items()}}
    if isinstance(value, enum.Enum | datetime.date | tuple | bytes):
        return {"type": type(value).__name__, "repr": repr(value)}
    return value


@task
def at_shapes(
    point: Point,
    polygon: Polygon | None = None,
    size: Size | None = None,
    style: Style = Style(),  # noqa: B008 - a default instance: the worker's function default applies
) -> dict[str, Any]:
    """Dataclasses, a TypedDict and a pydantic model, as JSON objects."""
    return {"point": _describe(point), "polygon": _describe(polygon), "size": _describe(size),
            "style": _describe(style)}


@task
def at_literals(
    size: Literal[64, 128, 256] = 128,
    flag: Literal[True] | None = None,
    ratio: Literal[0.5, 1.5] = 0.5,
    name: Literal["a", "b"] = "a",
    mode: Mode = Mode.FAST,
) -> dict[str, Any]:
    """Literals of every JSON scalar, and an Enum."""
    return {"size": size, "flag": flag, "ratio": ratio, "name": name, "mode": _describe(mode)}


@task
def at_blob(
    data: bytes,
    size: Literal[64, 128, 256] = 64,
    scale: float = 1.0,
    level: Annotated[int, Interval(ge=0, le=9)] = 0,
    verbose: bool = False,
    label: str | None = None,
    count: int | None = None,
    box: Size | None = None,
    anchor: Point | None = None,
    tags: list[str] | None = None,
) -> dict[str, Any]:
    """A bytes parameter, with arguments of every kind beside it (from the query string in a binary call)."""
    return {"length": len(data), "head": data[:8].hex(), "size": size, "scale": scale, "level": level,
            "verbose": verbose, "label": label, "count": count, "box": _describe(box), "anchor": _describe(anchor),
            "tags": tags}


@task
def at_when(when: datetime.datetime, span: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Types that are not JSON data themselves but are built from it."""
    return {"when": _describe(when), "span": _describe(span)}


@task
def at_nothing(greeting: str = "hello") -> str:
    """No required arguments: a bare POST runs it."""
    return greeting
