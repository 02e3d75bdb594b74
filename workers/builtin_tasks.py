"""The built-in tasks of docs/api.md: small, real CPU work used by the docs, the tests and the benchmarks.

`primes` and `burn` are pure Python and hold the GIL the whole time (the case a thread pool cannot
help with); `sha256` takes a binary body; `mandelbrot` answers with a PNG image.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from typing import Annotated

from annotated_types import Ge, Gt, Interval, Le

from workers import progress, task


@task
def primes(limit: Annotated[int, Interval(ge=0, le=10**8)]) -> int:
    """Count the primes ≤ limit with a pure-Python sieve of Eratosthenes (odd numbers only)."""
    if limit < 2:
        return 0
    if limit < 3:
        return 1
    size = (limit - 1) // 2  # index i stands for the odd number 2i + 3
    sieve = bytearray(b"\x01") * size
    i = 0
    while True:
        p = 2 * i + 3
        if p * p > limit:
            break
        if sieve[i]:
            start = (p * p - 3) // 2
            sieve[start::p] = bytes(len(range(start, size, p)))
        i += 1
    return 1 + sieve.count(1)


@task
def burn(ms: Annotated[float, Interval(ge=0, le=3_600_000)]) -> dict[str, float | int]:
    """Keep one core busy for `ms` milliseconds of pure-Python work; report progress every 10%.

    Returns the worker's pid, the milliseconds actually burnt, and wall-clock start and end stamps
    (seconds since the epoch), so callers can see which calls ran side by side.
    """
    started_at = time.time()
    start = time.perf_counter()
    seconds = ms / 1000.0
    end = start + seconds
    step = 1
    now = start
    while now < end:
        x = 0
        for k in range(500):
            x += k * k
        now = time.perf_counter()
        while step <= 10 and now - start >= seconds * step / 10:
            progress(step * 10, 100, f"{step * 10}%")
            step += 1
    return {
        "pid": os.getpid(),
        "ms": (now - start) * 1000.0,
        "started_at": started_at,
        "finished_at": time.time(),
    }


@task
def sha256(data: bytes, rounds: Annotated[int, Interval(ge=1, le=10**6)] = 1) -> str:
    """Hex SHA-256 of `data`; each round after the first hashes the previous round's raw digest."""
    digest = hashlib.sha256(data).digest()
    for _ in range(rounds - 1):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@task
def mandelbrot(
    width: Annotated[int, Interval(ge=1, le=4096)],
    height: Annotated[int, Interval(ge=1, le=4096)],
    max_iter: Annotated[int, Interval(ge=1, le=10_000)] = 256,
    x: Annotated[float, Ge(-10), Le(10)] = -0.5,
    y: Annotated[float, Ge(-10), Le(10)] = 0.0,
    zoom: Annotated[float, Gt(0), Le(1e15)] = 1.0,
) -> bytes:
    """Render the Mandelbrot set as a PNG: `width`×`height` pixels centred on (x, y).

    At zoom 1 the image spans 3 units of the complex plane horizontally; each doubling of `zoom`
    halves that. Escape-time colouring, computed with NumPy over the points still iterating.
    """
    import numpy as np
    from PIL import Image

    scale = 3.0 / zoom / width
    xs = x + (np.arange(width) - width / 2 + 0.5) * scale
    ys = y - (np.arange(height) - height / 2 + 0.5) * scale
    c = (xs[None, :] + 1j * ys[:, None]).ravel()
    counts = np.full(c.size, max_iter, dtype=np.int32)
    idx = np.arange(c.size)
    z = np.zeros_like(c)
    for i in range(max_iter):
        z = z * z + c
        escaped = (z.real * z.real + z.imag * z.imag) > 4.0
        if escaped.any():
            counts[idx[escaped]] = i
            keep = ~escaped
            idx, z, c = idx[keep], z[keep], c[keep]
            if idx.size == 0:
                break
    t = np.sqrt(counts / max_iter)
    rgb = np.stack(
        [9 * (1 - t) * t**3, 15 * (1 - t) ** 2 * t**2, 8.5 * (1 - t) ** 3 * t], axis=-1
    )
    pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(height, width, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()
