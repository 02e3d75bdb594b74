"""Real servers for the client tests (tests/conftest.py's `serving`), one per module that needs it.

TASKS: the built-ins plus the test tasks the client tests call: st_count (a generator), st_async_fail
(raises), mark_then_wait (holds a worker until the test writes a file)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, serving

TASKS = ("--tasks", "tests.support.stream_tasks,tests.support.fault_tasks")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("client"), "--workers", "2", *TASKS) as srv:
        yield srv


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    """A file a gated task waits for; the test writes it (gate.touch()) to let the task go on."""
    return tmp_path / "gate"
