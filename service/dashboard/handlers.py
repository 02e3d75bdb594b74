"""HTTP handlers of the dashboard, and its one resource (the snapshot hub).

    GET /dashboard                  the page (static/index.html); open: it holds no data
    GET /dashboard/static/{name}    the page's files (static.py); open
    GET /v1/dashboard/events        text/event-stream of `snapshot` events (hub.py, snapshot.py),
                                    behind the API keys like every /v1/ path

The page asks for a key when the stream answers 401 and sends it in the Authorization header of
a fetch() (an EventSource cannot send headers, and a key never goes into a URL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import sse_response

from service.dashboard.hub import SnapshotHub
from service.dashboard.snapshot import SnapshotBuilder
from service.dashboard.static import PAGE, Asset, load, respond
from service.problems import Problem, draining
from service.state import SERVICE

HUB = web.AppKey("dashboard_hub", SnapshotHub)
ASSETS = web.AppKey("dashboard_assets", dict[str, Asset])
EVENT = "snapshot"


def setup(app: web.Application) -> None:
    """The routes, the files (read now, once) and the hub (its producer runs only while watched)."""
    app[ASSETS] = load()
    app[HUB] = SnapshotHub(SnapshotBuilder(app[SERVICE]).json)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", to_page)
    app.router.add_get("/dashboard/static/{name}", static_file)
    app.router.add_get("/v1/dashboard/events", events)
    app.on_shutdown.append(_close_hub)  # before aiohttp waits for open connections: the streams end


async def hub(app: web.Application) -> AsyncIterator[None]:
    """The cleanup context: a drain ends the streams (after one last snapshot); the app's end stops
    the producer, if anyone still watched."""
    dashboard = app[HUB]
    app[SERVICE].on_drain.append(dashboard.drain)
    yield
    await dashboard.close()


async def _close_hub(app: web.Application) -> None:
    await app[HUB].close()


async def page(request: web.Request) -> web.Response:
    return _asset(request, PAGE)


async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/dashboard")


async def static_file(request: web.Request) -> web.Response:
    return _asset(request, request.match_info["name"])


def _asset(request: web.Request, name: str) -> web.Response:
    asset = request.app[ASSETS].get(name)
    if asset is None:
        raise Problem(404, "not-found", f"no dashboard file named {name!r}")
    return respond(request, asset)


async def events(request: web.Request) -> web.StreamResponse:
    """`event: snapshot` with the snapshot's JSON as `data:`, one at once, then at most one a second;
    the stream ends when the service drains."""
    dashboard = request.app[HUB]
    if dashboard.closing:
        raise draining()
    with dashboard.watch() as watcher:
        async with sse_response(request) as sse:
            while (snapshot := await watcher.next()) is not None:
                await sse.send(snapshot, event=EVENT)
    return sse
