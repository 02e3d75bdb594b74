"""The response shapes the handlers share: a JSON body, and a binary result.

A binary result (a task's bytes, a job's stored result) is answered by `bytes_response` alone, so its
content type is decided in one place: `image/png` when the data starts with the PNG signature,
`application/octet-stream` otherwise. The result may be a buffer the executor lent (a shared-memory
segment with the local pool): then it is streamed from where the worker wrote it, without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from service.body import OCTET_STREAM
from workers.executor import PayloadBuffer

JSON_TYPE = "application/json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WRITE_CHUNK = 1024 * 1024  # a large result goes to the socket in slices of its buffer, no copy


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def binary_type(data: bytes | memoryview) -> str:
    """The content type of a binary result."""
    return "image/png" if data[:8] == PNG_SIGNATURE else OCTET_STREAM


async def bytes_response(
    request: web.Request, data: bytes | PayloadBuffer, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """A binary result: bytes as they are, or a lent buffer streamed and then released."""
    if isinstance(data, bytes):
        return web.Response(body=data, content_type=binary_type(data), headers=headers)
    return await _stream_buffer(request, data, headers)


async def _stream_buffer(
    request: web.Request, buffer: PayloadBuffer, headers: Mapping[str, str] | None
) -> web.StreamResponse:
    """Send a result straight from the buffer it was written into, then release the buffer.

    The transport keeps references to the slices it has not sent yet (uvloop does not copy), so the
    buffer is released only once the transport's write buffer is empty (or the client is gone).
    """
    try:
        view = buffer.buffer[: buffer.length]
        response = web.StreamResponse(headers=headers)
        response.content_type = binary_type(view)
        response.content_length = len(view)
        await response.prepare(request)
        for start in range(0, len(view), _WRITE_CHUNK):
            await response.write(view[start : start + _WRITE_CHUNK])
        await _flushed(request)
        await response.write_eof()
        return response
    finally:
        buffer.release()


async def _flushed(request: web.Request) -> None:
    """Wait until the transport has handed everything written so far to the kernel."""
    transport = request.transport
    if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)  # pauses the writer until the buffer is empty
    try:
        await request.writer.drain()
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)
