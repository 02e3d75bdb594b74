"""The live dashboard: `GET /dashboard`, its files, and `GET /v1/dashboard/events`.

    handlers.py  the routes, and the hub's cleanup context (wired in service/app.py)
    static.py    the page's files, read once at start-up, served with their security headers
    hub.py       one snapshot producer for every watcher, running only while someone watches
    snapshot.py  what a snapshot holds (workers, calls, jobs), read from the executor, metrics, store
    series.py    calls/s and latency percentiles per second over 5 minutes (counted by service/metrics.py)
    static/      the page (HTML, JS, CSS and the vendored chart library)

Nothing here is imported by the package itself: service/metrics.py imports series.py alone.
"""
