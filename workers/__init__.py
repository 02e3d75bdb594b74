"""procbridge's process side: the task API, the registry, and the pool that runs tasks.

A task author needs only `from workers import task, progress`.
"""

from workers.context import progress
from workers.registry import task

__all__ = ["progress", "task"]
