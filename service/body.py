"""Reading request bodies: content type, the size limit (before and while reading), JSON parsing,
and large binary bodies read from the socket straight into a writable buffer (a shared-memory
segment the executor lends), never held whole in memory on the way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from service.problems import Problem, invalid_argument
from workers.executor import PayloadBuffer

OCTET_STREAM = "application/octet-stream"

# A body must keep arriving: no byte for BODY_IDLE_TIMEOUT seconds, or on average slower than
# BODY_MIN_RATE bytes/s once BODY_TIMEOUT seconds have passed, is 408 request-timeout (the deadline
# is BODY_TIMEOUT plus one second per BODY_MIN_RATE bytes received). See docs/security.md.
BODY_IDLE_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
BODY_MIN_RATE = 16 * 1024


def body_kind(request: web.Request, *, binary_ok: bool = True, bare_ok: bool = False) -> str:
    """'json' or 'binary' from the Content-Type header; with `bare_ok`, 'bare' for a request with
    neither a body nor a Content-Type (a task called without arguments). 415 for anything else (or
    none), and for a Content-Encoding (the service never inflates a body: a small gzip bomb would
    cost the loop). `binary_ok`: the endpoint takes application/octet-stream, and only then does
    the 415 offer it."""
    headers = request.headers
    encoding = headers.get("Content-Encoding")
    if encoding is not None and (encoding := encoding.strip().lower()) not in ("", "identity"):
        raise Problem(415, "unsupported-media-type",
                      f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed",
                      headers={"Accept-Encoding": "identity", "Connection": "close"})
    raw = headers.get("Content-Type")
    if raw == "application/json":  # the common case, without parsing the header's parameters
        return "json"
    if raw is None and bare_ok and not request.body_exists:
        return "bare"
    ctype = request.content_type if raw else ""
    if ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    if ctype == OCTET_STREAM and binary_ok:
        return "binary"
    accepted = "application/json or application/octet-stream" if binary_ok else "application/json"
    got = f"got {raw!r}" if raw else "no Content-Type header was sent"
    if ctype == OCTET_STREAM:
        got += " (this takes no binary body: only a task with a bytes parameter does)"
    raise Problem(415, "unsupported-media-type", f"send {accepted}; {got}")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) a declared or actual size over `limit` without buffering it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    async with contextlib.aclosing(body_chunks(request, 256 * 1024)) as body:
        async for chunk in body:
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    return b"".join(chunks)


def expect_continue(limit: int) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An `Expect: 100-continue` handler for routes that take a body, with the size limit applied
    first: a client that declares a body over `limit` gets its 413 at once instead of an invitation
    to send it (aiohttp's default handler says "100 Continue" to any size)."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            # returned, not raised: aiohttp calls this before the middlewares that turn Problems into responses
            return Problem(417, "expectation-failed", "only Expect: 100-continue is understood").response()
        declared = request.content_length
        if declared is not None and declared > limit:
            return _too_large(limit).response()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim response is not part of the answer's size
        return None

    return handle


Allocate = Callable[[int], Awaitable[PayloadBuffer | None]]


async def read_payload(
    request: web.Request, limit: int, allocate: Allocate | None, threshold: int | None
) -> bytes | PayloadBuffer:
    """A binary body: bytes when it is not above `threshold` (or no buffer can be had), else a buffer
    from `allocate` that each chunk is copied into as it arrives from the socket (the body is never
    assembled in memory first). Refuses (413) a declared or actual size over `limit`. A body of
    unknown size (chunked) starts in memory and moves to a buffer, doubling, once past `threshold`.
    The caller releases the buffer; on any failure here it is released before the error propagates.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    if allocate is None or threshold is None or (declared is not None and declared <= threshold):
        return await read_body(request, limit)
    target: PayloadBuffer | None = None
    if declared is not None:
        target = await allocate(declared)
        if target is None:  # no room in shared memory: the body goes through the pipe
            return await read_body(request, limit)
    inline = bytearray()
    total = 0
    stay_inline = False  # a buffer was refused: the rest of the body stays in memory
    try:
        async with contextlib.aclosing(body_chunks(request)) as body:
            async for chunk in body:
                end = total + len(chunk)
                if end > limit:
                    raise _too_large(limit)
                if target is not None and end > len(target.buffer):  # unknown size: grow, doubling
                    target = await _grow(target, total, min(limit, max(end, 2 * len(target.buffer))), allocate, inline)
                    stay_inline = target is None
                elif target is None and not stay_inline and end > threshold:
                    target = await allocate(min(limit, max(2 * end, 4 * threshold)))
                    if target is None:
                        stay_inline = True
                    else:
                        target.buffer[:total] = inline
                        inline = bytearray()
                if target is None:
                    inline += chunk
                else:
                    target.buffer[total:end] = chunk
                total = end
    except BaseException:
        if target is not None:
            target.release()
        raise
    if target is None:
        return bytes(inline)
    target.length = total
    return target


async def _grow(
    old: PayloadBuffer, used: int, size: int, allocate: Allocate, inline: bytearray
) -> PayloadBuffer | None:
    """A bigger buffer holding the first `used` bytes of `old` (released); None: they moved to `inline`."""
    new = await allocate(size)
    if new is not None:
        new.buffer[:used] = old.buffer[:used]
    else:
        inline += old.buffer[:used]
    old.release()
    return new


async def body_chunks(request: web.Request, size: int = -1) -> AsyncGenerator[bytes, None]:
    """The body as it arrives (chunks of at most `size` bytes; -1: whatever is there), under the
    deadlines above (408), with a body the HTTP parser refuses part-way (a bad chunked encoding, a
    short Content-Length) as 400 bad-request. What is already buffered is taken without a timer."""
    content = request.content
    loop = asyncio.get_running_loop()
    start = loop.time()
    received = 0
    try:
        while True:
            chunk = content.read_nowait(size)
            if not chunk:
                if content.at_eof():
                    return
                now = loop.time()
                deadline = min(now + BODY_IDLE_TIMEOUT, start + BODY_TIMEOUT + received / BODY_MIN_RATE)
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await (content.readany() if size < 0 else content.read(size))
                except TimeoutError:
                    raise _too_slow(received) from None
                if not chunk:
                    return
            received += len(chunk)
            yield chunk
    except (RequestPayloadError, HttpProcessingError) as exc:
        reason = str(exc.__cause__ or exc).strip().splitlines()
        raise Problem(400, "bad-request", f"the body is malformed: {reason[0][:200] if reason else exc!r}",
                      headers={"Connection": "close"}) from None


def _too_slow(received: int) -> Problem:
    return Problem(
        408, "request-timeout",
        f"the body stopped arriving after {received} bytes (no data for {BODY_IDLE_TIMEOUT:g} s, or slower "
        f"than {BODY_MIN_RATE} bytes/s after {BODY_TIMEOUT:g} s)",
        headers={"Connection": "close"},
    )


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


def refuse_unknown_fields(payload: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    """422 naming the first field of a request object that is not one of `allowed`."""
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise invalid_argument(unknown[0], f"unknown field of {what} ({', '.join(allowed)})", "unknown field",
                               more=unknown[1:])
