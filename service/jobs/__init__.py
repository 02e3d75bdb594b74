"""The async job system, one folder for one feature: a newcomer finds everything `/v1/jobs` does here.

- `model.py`: the `Job` record and its statuses;
- `store/`: where jobs live (`open_store(url)`: SQLite for one replica, Redis for several);
- `runner.py`: claims queued jobs and runs them on the executor (leases, recovery, progress, expiry);
- `events.py`: in-process fan-out of job events to SSE listeners;
- `handlers.py`: the HTTP endpoints (submit, read, list, result, cancel, events).

Nothing outside this package imports more than `open_store`, `JobRunner` and `JobEvents` (the app
wires them) and `handlers.setup` (the routes); this package imports no handler of another feature.
"""
