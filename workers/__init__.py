"""procbridge's process side: the task API, the registry, and the pool that runs tasks.

A task author needs only `from workers import task, progress` (and `preload`, `on_worker_start`
for state built once: workers/hooks.py).
"""

from workers.context import progress
from workers.hooks import on_worker_start, preload
from workers.registry import Batch, task

__all__ = ["Batch", "on_worker_start", "preload", "progress", "task"]
