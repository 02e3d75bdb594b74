"""Baseline 1, naive: aiohttp with the CPU work called inline on the event loop.

    python -m bench.apps.naive --port P
"""

from __future__ import annotations

from aiohttp import web

from bench.apps.common import JSON, BadCall, envelope, error, healthz, parse_args, parse_call, serve


async def call_task(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        fn, kwargs = parse_call(name, await request.read())
        result = fn(**kwargs)  # blocks the loop for as long as the task runs
    except BadCall as exc:
        return error(exc.status, str(exc))
    except TypeError as exc:
        return error(422, str(exc))
    return web.Response(body=envelope(name, result), content_type=JSON)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/tasks/{name}", call_task)
    return app


if __name__ == "__main__":
    args = parse_args(__doc__ or "")
    serve(make_app(), args.host, args.port)
