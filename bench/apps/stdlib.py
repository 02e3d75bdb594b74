"""Baseline 2, stdlib: aiohttp + a plain `concurrent.futures.ProcessPoolExecutor` via run_in_executor.

    python -m bench.apps.stdlib --port P --workers N

The pool is the stock one with its defaults (the platform's start method), warmed up before the
first request so no request pays for starting processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools

from aiohttp import web

from bench.apps.common import JSON, BadCall, envelope, error, healthz, parse_args, parse_call, serve
from workers.builtin_tasks import primes

POOL = web.AppKey("pool", cf.ProcessPoolExecutor)


async def call_task(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        fn, kwargs = parse_call(name, await request.read())
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(request.app[POOL], functools.partial(fn, **kwargs))
    except BadCall as exc:
        return error(exc.status, str(exc))
    except TypeError as exc:
        return error(422, str(exc))
    return web.Response(body=envelope(name, result), content_type=JSON)


def make_app(workers: int) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/tasks/{name}", call_task)

    async def start(app: web.Application) -> None:
        pool = cf.ProcessPoolExecutor(workers)
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, primes, 1) for _ in range(4 * workers)))
        app[POOL] = pool

    async def stop(app: web.Application) -> None:
        app[POOL].shutdown(wait=True, cancel_futures=True)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    serve(make_app(args.workers), args.host, args.port)
