"""The async job system, one folder for one feature: a newcomer finds everything `/v1/jobs` does here.

- `model.py`: the `Job` record, its statuses and event ids;
- `store/`: where jobs live (`open_store(url)`: SQLite for one replica, Redis for several);
- `runner.py`: claims due jobs by priority and runs them on the executor (delays, retries with back-off,
  leases, recovery, progress, expiry);
- `events.py`: each run's event log (SSE ids, `Last-Event-ID` resume) and the wake-ups of listeners;
- `options.py`: what a submit may ask beyond task and arguments (priority, delay, retries), and the
  listing cursor;
- `webhooks.py`, `webhook_allow.py`: signed deliveries of finished jobs, and which hosts they may reach;
- `handlers.py`: the HTTP endpoints (submit, read, list, result, cancel, events).

From outside, the app wires `open_store`, `JobRunner`, `JobEvents`, `WebhookSender` and `WebhookPolicy`
and adds `handlers.setup`'s routes; the config reads `--store` and `--webhook-allow` with
`store.url.parse_store` and `webhook_allow.parse_allow`; the OpenAPI document states the submit limits
(`options`), and the dashboard lists jobs (`model`). This package imports no handler of another feature.
"""
