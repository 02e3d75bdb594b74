"""workers/hooks.py, in-process: what `@preload` and `@on_worker_start` register, when they run, and
how a failure reads; and the /dev/shm and /proc helpers the worker parent's design relies on
(tracker-free mapping, the sweep of a dead service's segments, a process's private memory)."""

from __future__ import annotations

import subprocess
import sys
import types
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from workers import hooks
from workers.memory import memory_of
from workers.shm_files import Attached, owner_pid, sweep_orphans


def _module(name: str, source: str) -> types.ModuleType:
    """Run `source` as module `name` (its decorators register with the module's name)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # the test's own source
    return module


HOOKS_SOURCE = '''
from workers import preload, on_worker_start
calls = []

@preload
def model():
    calls.append("model")
    return {"weights": [1, 2, 3]}

@preload
def second():
    calls.append("second")
    return model()["weights"][-1]

@on_worker_start
def connect():
    calls.append("connect")
'''


def test_a_preload_is_built_once_per_process_in_order_and_returns_what_it_built_when_called() -> None:
    mod = _module("pb_hooks_order", HOOKS_SOURCE)
    assert not mod.model.built and mod.calls == []
    assert hooks.run_preloads(["pb_hooks_order"]) == 2
    assert mod.calls == ["model", "second"]
    assert mod.model() == {"weights": [1, 2, 3]} and mod.second() == 3
    assert hooks.run_preloads(["pb_hooks_order"]) == 0 and mod.calls == ["model", "second"]
    assert hooks.run_worker_start(["pb_hooks_order"]) == 1 and mod.calls[-1] == "connect"


def test_hooks_of_modules_not_chosen_do_not_run() -> None:
    mod = _module("pb_hooks_unchosen", HOOKS_SOURCE)
    assert hooks.run_preloads(["some.other.module"]) == 0
    assert hooks.run_worker_start(["some.other.module"]) == 0
    assert mod.calls == []


def test_calling_a_preload_that_never_ran_builds_it_there_and_then_once() -> None:
    mod = _module("pb_hooks_lazy", HOOKS_SOURCE)
    assert mod.second() == 3 and mod.second() == 3
    assert mod.calls == ["second", "model"]


def test_a_hook_that_raises_names_the_hook_and_its_error_and_shows_the_hooks_own_traceback() -> None:
    _module("pb_hooks_failing", '''
from workers import on_worker_start

@on_worker_start
def connect():
    raise ConnectionError("db:5432 refused")
''')
    with pytest.raises(hooks.HookFailed) as failed:
        hooks.run_worker_start(["pb_hooks_failing"])
    assert str(failed.value) == "on_worker_start hook pb_hooks_failing.connect raised ConnectionError: db:5432 refused"
    text = hooks.hook_traceback(failed.value)
    assert text.startswith("Traceback") and text.rstrip().endswith("ConnectionError: db:5432 refused")
    assert "HookFailed" not in text


def test_hooks_take_module_level_functions_only() -> None:
    def local() -> None: ...

    with pytest.raises(TypeError, match="module-level"):
        hooks.preload(local)
    with pytest.raises(TypeError, match="module-level"):
        hooks.on_worker_start(local)


# -- /dev/shm and /proc ------------------------------------------------------------------------------


def test_attached_maps_a_segment_by_name_read_write_without_the_resource_tracker() -> None:
    shm = shared_memory.SharedMemory(create=True, size=4096, name="pb_0_abcdef_attach_test")
    try:
        shm.buf[:5] = b"hello"
        seen = Attached(shm.name)
        assert bytes(seen.buf[:5]) == b"hello" and seen.size >= 4096
        seen.buf[5:6] = b"!"
        seen.close()
        assert bytes(shm.buf[:6]) == b"hello!"
    finally:
        shm.close()
        shm.unlink()


def test_the_sweep_removes_segments_of_dead_services_only(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f"pb_{dead.pid}_a1b2c3_table", f"pb_{dead.pid}_a1b2c3_7", f"pb_{live.pid}_d4e5f6_table",
                 "pb_notours", "other_segment"]
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = sweep_orphans(str(tmp_path))
        assert sorted(removed) == sorted(names[:2])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
        assert owner_pid(names[2]) == live.pid and owner_pid("pb_notours") is None
    finally:
        live.kill()
        live.wait()


def test_memory_of_tells_private_pages_from_shared_ones() -> None:
    before = memory_of("self")
    assert before is not None and before.rss >= before.private > 0 and before.pss > 0
    data = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB written here: private to this process
    after = memory_of("self")
    assert after is not None and after.private - before.private > 60 * 1024 * 1024
    del data
    assert memory_of(2**22 + 12345) is None  # no such process
