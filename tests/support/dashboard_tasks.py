"""Tasks for tests/deploy/test_grafana.py, served with `--tasks tests.support.dashboard_tasks` next
to the built-ins: the metrics that only have samples once a task of a kind exists and ran, so that
every series the Grafana dashboard asks for is really there in the scrape. `doubled` is a batch task
(`procbridge_batches_total`, `procbridge_batched_calls_total`); `chatty` has a concurrency limit
(`procbridge_task_waiting{task="chatty"}`) and prints (`procbridge_task_output_lines_total`).
"""

from __future__ import annotations

from workers import Batch, task


@task(batch=Batch(max_size=4, max_wait_ms=1))
def doubled(x: list[int]) -> list[int]:
    """Each call's x, doubled."""
    return [2 * v for v in x]


@task(concurrency=1)
def chatty(n: int = 1) -> int:
    """Print a line and return n."""
    print(f"chatty {n}")
    return n
