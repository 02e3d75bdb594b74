"""A task module whose `@preload` always raises, for tests/workers/test_dask_hooks.py: in thread
isolation a preload runs in the Dask worker process itself, once, so the failure is shown with a
module of its own (a process that never ran this preload), not with the switch of
tests/support/dask_hook_tasks.py (whose preload already ran in the shared cluster's workers)."""

from __future__ import annotations

from typing import Any

from workers import preload, task


@preload
def weights() -> Any:
    raise FileNotFoundError("no weights at /models/broken.bin")


@task
def use_weights() -> Any:
    return weights()
