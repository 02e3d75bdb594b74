"""Where the service's time goes: py-spy samples (raw, collapsed stacks) summed up per process.

`py-spy record --format raw --subprocesses` writes one line per distinct stack:
`process PID:"CMDLINE";frame (file:line);frame (file:line);... COUNT`. Here the lines are grouped
into the service's own process (the event loop) and its workers, and summed as self time (the
innermost frame), inclusive time (every function on the stack, once per sample) and broad areas
(HTTP, validation, dispatch, framing, metrics, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"(?P<cmd>.*?)"(?:;|$)')

# (area, substrings of a frame's file): the first match wins, checked from the innermost frame out
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wire: framing and pickling (workers/framing.py)", ("workers/framing.py",)),
    ("dispatch: pool bookkeeping (workers/local/)", ("workers/local/",)),
    ("metrics (prometheus_client, service/metrics.py)", ("prometheus_client/", "service/metrics.py")),
    ("validation (pydantic, service/validation.py)", ("pydantic", "service/validation.py")),
    ("JSON, bodies and problems (service/body.py, problems.py)",
     ("service/body.py", "service/problems.py", "service/responses.py", "service/admission.py")),
    ("task handler (service/task_handlers.py)", ("service/task_handlers.py",)),
    ("aiohttp: request parsing, routing, responses", ("aiohttp/",)),
    ("asyncio", ("asyncio/",)),
    ("worker loop (workers/worker.py)", ("workers/worker.py",)),
    ("the task itself (workers/builtin_tasks.py)", ("workers/builtin_tasks.py",)),
)


_IN_C = ("Runner.run (", "run (uvloop/", "Loop.run_forever")
_WAITING = ("BlockingFrames._wait (", "BlockingFrames._recv_into (", "BlockingFrames._recv_exact (")


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (path/to/file.py)`: lines merged per function."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m['func']} ({m['file']})"


@dataclass
class ProcessProfile:
    pid: int
    cmd: str
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    areas: Counter[str] = field(default_factory=Counter)


def parse_raw(lines: Iterable[str]) -> dict[int, ProcessProfile]:
    """Per-process sums of a py-spy raw file (with or without `process ...` roots)."""
    out: dict[int, ProcessProfile] = {}
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        pid, cmd = 0, ""
        # With --subprocesses a child's stack starts with its ancestors' `process` frames, then its
        # own; a command line may hold ';' itself, so these are cut off before splitting.
        while m := _PROCESS.match(stack):
            pid, cmd = int(m["pid"]), m["cmd"]
            stack = stack[m.end():]
        frames = stack.split(";") if stack else []
        prof = out.setdefault(pid, ProcessProfile(pid, cmd))
        prof.samples += count
        names = [frame_name(f) for f in frames]
        if not names:
            prof.self_time["(no Python frame)"] += count
            prof.areas["other"] += count
            continue
        prof.self_time[names[-1]] += count
        for name in set(names):
            prof.inclusive[name] += count
        prof.areas[_area(names)] += count
    return out


def _area(names: list[str]) -> str:
    innermost = names[-1]
    if innermost.startswith(_IN_C):
        return "event loop itself: uvloop's C code (polling, socket I/O) below run()"
    if innermost.startswith(_WAITING):
        return "worker waiting for its next call (blocked in recv)"
    for frame in reversed(names):
        for area, needles in AREAS:
            if any(n in frame for n in needles):
                return area
    return "other"


def split_service(profiles: dict[int, ProcessProfile], service_pid: int) -> tuple[ProcessProfile | None,
                                                                                  ProcessProfile | None]:
    """The event-loop process, and every other sampled process (the workers) merged into one."""
    main = profiles.get(service_pid)
    rest = [p for pid, p in profiles.items() if pid != service_pid]
    if not rest:
        return main, None
    merged = ProcessProfile(0, f"{len(rest)} worker processes")
    for p in rest:
        merged.samples += p.samples
        merged.self_time.update(p.self_time)
        merged.inclusive.update(p.inclusive)
        merged.areas.update(p.areas)
    return main, merged


_ENTRY_FILES = ("<frozen runpy>", "service/__main__.py", "service/cli.py", "service/server.py", "uvloop/__init__.py",
                "asyncio/runners.py", "multiprocessing/", "threading.py", "<string>")


def is_entry_chain(name: str) -> bool:
    """Frames every sample of a process passes through on its way in (runpy, main(), the loop's
    run(), multiprocessing's bootstrap): they say nothing about where the time goes."""
    m = _FRAME.match(name)
    return m is not None and any(f in m["file"] for f in _ENTRY_FILES)


def top(counter: Counter[str], total: int, n: int = 12) -> list[tuple[str, float]]:
    """The n biggest entries as (name, percent of `total`)."""
    if total <= 0:
        return []
    return [(name, 100.0 * c / total) for name, c in counter.most_common(n)]
