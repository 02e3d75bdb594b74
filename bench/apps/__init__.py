"""The benchmark's baselines, each serving the same functions as procbridge (`burn`, `primes` from
workers.builtin_tasks) on the same endpoints: `POST /v1/tasks/{name}` with a JSON object of arguments
-> `{"task", "result"}`, and `GET /healthz`.

- `naive`: aiohttp on uvloop, the function called inline on the event loop.
- `stdlib`: aiohttp on uvloop, the function run in a stock `concurrent.futures.ProcessPoolExecutor`
  through `loop.run_in_executor`.
- `wsgi`: a minimal WSGI app, served by gunicorn with sync workers (one per core).

Each gets what procbridge gets (uvloop, orjson, no access log) and nothing is slowed down.

Not a baseline: `worker_state`, the task module scripts/worker_state_bench.py serves with procbridge
(a `@preload` "model", an `@on_worker_start` that logs each worker, a task that reads the model).
"""
