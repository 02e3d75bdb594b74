"""Reading request bodies: content type, the size limit (before and while reading), JSON parsing."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from service.problems import Problem

OCTET_STREAM = "application/octet-stream"


def body_kind(request: web.Request, *, binary_ok: bool = True) -> str:
    """'json' or 'binary' from the Content-Type header; 415 for anything else (or none)."""
    raw = request.headers.get("Content-Type")
    ctype = request.content_type if raw else ""
    if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    if ctype == OCTET_STREAM and binary_ok:
        return "binary"
    accepted = "application/json or application/octet-stream" if binary_ok else "application/json"
    got = f"got {raw!r}" if raw else "no Content-Type header was sent"
    raise Problem(415, "unsupported-media-type", f"send {accepted}; {got}")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) a declared or actual size over `limit` without buffering it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(
        413, "payload-too-large", f"the body is larger than the limit of {limit} bytes (--max-body)",
        headers={"Connection": "close"},
    )


def parse_object(body: bytes) -> dict[str, Any]:
    """A JSON object from the body, or 400 invalid-json saying what is wrong."""
    if not body.strip():
        raise Problem(400, "invalid-json", "the body is empty; send a JSON object, e.g. {}")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "invalid-json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Problem(400, "invalid-json", f"the body must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__
    )
