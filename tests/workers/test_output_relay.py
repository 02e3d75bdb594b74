"""Task output to the log (workers/local/output.py, issue 16), with real pipes and real processes.

Each child writes to the write ends of its own pipes (its fds 1 and 2, as a worker's are once
redirected); the relay holds the read ends. Records are captured by a handler on a logger of the
test's own; every wait is a poll with a deadline, never a sleep."""

from __future__ import annotations

import fcntl
import itertools
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.support.output_child import print_everywhere
from workers.local.output import OutputRelay

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024


class Captured(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, pid: int | None = None) -> list[logging.LogRecord]:
        """The task-line records (not the drop warnings), of one worker if `pid` is given."""
        return [r for r in list(self.records) if r.stream is not None and pid in (None, r.pid)]

    def messages(self, pid: int | None = None) -> list[str]:
        return [r.getMessage() for r in self.lines(pid)]

    def warnings(self) -> list[logging.LogRecord]:
        return [r for r in list(self.records) if getattr(r, "dropped", None) is not None]


MakeRelay = Callable[..., tuple[OutputRelay, Captured]]


@pytest.fixture
def make_relay() -> Iterator[MakeRelay]:
    """A started relay logging to a fresh logger; closed (and checked closed) at the end."""
    made: list[tuple[OutputRelay, logging.Logger, Captured]] = []

    def make(start: bool = True, **kwargs: Any) -> tuple[OutputRelay, Captured]:
        logger = logging.getLogger(f"tests.output_relay.{id(made)}.{len(made)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        captured = Captured()
        logger.addHandler(captured)
        relay = OutputRelay(logger=logger, **kwargs)
        if start:
            relay.start()
        made.append((relay, logger, captured))
        return relay, captured

    yield make
    for relay, logger, captured in made:
        assert relay.close(5.0)
        assert relay.stats()["streams"] == 0
        logger.removeHandler(captured)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes to kill and reap at the end, whatever the test did."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(10)


def spawn(
    children: list[subprocess.Popen[bytes]], relay: OutputRelay | None, code: str, slot: int = 0, stdin: Any = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """A Python child running `code` with its stdout and stderr on fresh pipes; the relay gets the read
    ends (unless None) and this process closes its write ends, so EOF comes when the child exits."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out_w, stderr=err_w, stdin=stdin, cwd=ROOT)
    finally:
        os.close(out_w)
        os.close(err_w)
    children.append(proc)
    if relay is not None:
        relay.add(out_r, proc.pid, slot, "stdout")
        relay.add(err_r, proc.pid, slot, "stderr")
    return proc, out_r, err_r


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def pending(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD), without reading them."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_each_line_is_one_info_record_with_pid_slot_task_and_stream(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(task_of=lambda slot, pid: "count_words")
    code = (
        "import os, sys\n"
        "print('hello'); print('100% done'); sys.stdout.flush()\n"
        "os.write(1, b'crlf\\r\\n' + b'bad \\xff byte\\n')\n"
        "print('oops', file=sys.stderr)\n"
    )
    proc, _, _ = spawn(children, relay, code, slot=3)
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0, what="both streams at EOF")
    pid = proc.pid
    assert sorted(captured.messages()) == sorted(
        [
            f"worker {pid} (count_words) stdout: hello",
            f"worker {pid} (count_words) stdout: 100% done",
            f"worker {pid} (count_words) stdout: crlf",
            f"worker {pid} (count_words) stdout: bad \ufffd byte",
            f"worker {pid} (count_words) stderr: oops",
        ]
    )
    out = [r for r in captured.lines() if r.stream == "stdout"]
    assert [r.getMessage().split(": ", 1)[1] for r in out] == ["hello", "100% done", "crlf", "bad \ufffd byte"]
    for r in captured.lines():
        assert (r.pid, r.slot, r.task, r.levelno) == (pid, 3, "count_words", logging.INFO)
    assert relay.stats()["logged"] == {"stdout": 4, "stderr": 1}
    assert relay.stats()["dropped"] == {"stdout": 0, "stderr": 0}


def test_levels_set_per_stream_are_the_records_levels(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(levels={"stderr": logging.WARNING})
    proc, _, _ = spawn(children, relay, "import sys; print('out'); print('err', file=sys.stderr)")
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    assert {(r.stream, r.levelno, r.task) for r in captured.lines()} == {
        ("stdout", logging.INFO, "-"),
        ("stderr", logging.WARNING, "-"),
    }


def test_a_wrong_stream_name_is_refused_and_the_fd_left_open(make_relay: MakeRelay) -> None:
    relay, _ = make_relay()
    r, w = os.pipe()
    with pytest.raises(ValueError):
        relay.add(r, 1, 0, "stdin")
    assert not closed(r)
    os.close(r)
    os.close(w)


def test_a_partial_line_is_logged_at_eof(make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]) -> None:
    relay, captured = make_relay()
    proc, _, _ = spawn(children, relay, "import os; os.write(1, b'line\\nno newline at the end')")
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    assert captured.messages() == [
        f"worker {proc.pid} (-) stdout: line",
        f"worker {proc.pid} (-) stdout: no newline at the end",
    ]


@pytest.mark.parametrize("pieces", [1, 25])
def test_a_line_over_max_line_is_cut_with_a_marker_and_the_next_line_is_whole(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]], pieces: int
) -> None:
    """The long line comes in one write or in 25 (held across reads), the result is the same."""
    relay, captured = make_relay(max_line=100)
    code = f"import os\nfor _ in range({pieces}): os.write(1, b'a' * (1000 // {pieces}))\nos.write(1, b'\\nnext\\n')"
    proc, _, _ = spawn(children, relay, code)
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    assert captured.messages() == [
        f"worker {proc.pid} (-) stdout: {'a' * 100} […900 bytes cut]",
        f"worker {proc.pid} (-) stdout: next",
    ]
    assert relay.stats()["cut"] == 1


def test_a_100_mb_flood_finishes_unblocked_drops_and_counts_lines_and_grows_memory_under_30_mb(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(task_of=lambda slot, pid: "flood")
    before = rss()
    started = time.monotonic()
    # 1,048,576 lines of 100 bytes (99 and the newline): 100 MiB, as fast as the child can write.
    code = "import sys\nblock = (b'x' * 99 + b'\\n') * 16384\nfor _ in range(64): sys.stdout.buffer.write(block)"
    proc, _, _ = spawn(children, relay, code)
    assert proc.wait(60) == 0, "the child never blocked for good on a full pipe"
    wait_for(lambda: relay.stats()["streams"] == 0, timeout=30, what="the flood drained")
    elapsed = time.monotonic() - started
    grown = rss() - before
    stats = relay.stats()
    logged, dropped = stats["logged"]["stdout"], stats["dropped"]["stdout"]
    assert logged + dropped == 1_048_576
    assert 2000 <= logged <= 2000 + 1000 * elapsed + 1
    assert len(captured.lines()) == logged
    assert sum(r.dropped for r in captured.warnings()) == dropped
    print(f"flood: {logged} logged, {dropped} dropped in {elapsed:.2f} s, RSS grew {grown / MB:.1f} MB")
    assert grown < 30 * MB, f"RSS grew {grown / MB:.1f} MB"


def test_a_100_mb_line_without_newline_is_held_to_max_line_and_logged_cut_at_eof(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay()
    before = rss()
    code = "import sys\nblock = b'y' * (1024 * 1024)\nfor _ in range(100): sys.stdout.buffer.write(block)"
    proc, _, _ = spawn(children, relay, code)
    assert proc.wait(60) == 0
    wait_for(lambda: relay.stats()["streams"] == 0, timeout=30)
    grown = rss() - before
    assert captured.messages() == [f"worker {proc.pid} (-) stdout: {'y' * 16384} […{100 * MB - 16384} bytes cut]"]
    assert grown < 30 * MB, f"RSS grew {grown / MB:.1f} MB"


def test_lines_over_the_rate_are_dropped_counted_per_stream_and_all_reported_in_warnings(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(rate=10, burst=5, total_rate=None)
    started = time.monotonic()
    code = "import sys\nfor i in range(1000): print(i); print(i, file=sys.stderr)"
    proc, _, _ = spawn(children, relay, code)
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    elapsed = time.monotonic() - started
    stats = relay.stats()
    total_logged = sum(stats["logged"].values())
    assert 5 <= total_logged <= 5 + 10 * elapsed + 1  # one bucket for both streams of a worker
    for stream in ("stdout", "stderr"):
        assert stats["logged"][stream] + stats["dropped"][stream] == 1000
    warnings = captured.warnings()
    assert sum(r.dropped for r in warnings) == sum(stats["dropped"].values())
    assert all(r.levelno == logging.WARNING and r.pid == proc.pid for r in warnings)
    assert "lines of output dropped" in warnings[0].getMessage()


def test_the_drop_warning_comes_at_most_once_a_warn_interval_per_worker(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    """A child floods for 1.5 s: warnings come during the flood, each a warn_interval after the last
    (the one at EOF excepted: it reports the rest at once)."""
    relay, captured = make_relay(rate=5, burst=5, warn_interval=0.3)
    code = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: print('spam', flush=True)"
    proc, _, _ = spawn(children, relay, code)
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    times = [r.created for r in captured.warnings()]
    assert len(times) >= 3
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert gaps and min(gaps) >= 0.3 * 0.99
    assert sum(r.dropped for r in captured.warnings()) == relay.stats()["dropped"]["stdout"]


def test_drops_of_a_worker_that_goes_quiet_are_reported_a_warn_interval_later_without_waiting_for_eof(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(rate=1, burst=1, warn_interval=1.0)
    echo = "import sys\nfor line in sys.stdin: sys.stdout.write(line); sys.stdout.flush()"
    proc, _, _ = spawn(children, relay, echo, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"x\n" * 100)
    proc.stdin.flush()
    first = wait_for(lambda: captured.warnings(), what="the first warning, at the first drop")[0]
    proc.stdin.write(b"y\n" * 100)
    proc.stdin.flush()
    wait_for(lambda: sum(relay.stats()["dropped"].values()) + sum(relay.stats()["logged"].values()) == 200)
    dropped = sum(relay.stats()["dropped"].values())
    wait_for(lambda: sum(r.dropped for r in captured.warnings()) == dropped, timeout=5.0, what="the rest reported")
    warnings = captured.warnings()
    assert warnings[0] is first and len(warnings) >= 2
    assert proc.poll() is None and relay.stats()["streams"] == 2, "no EOF came: the timer sent the rest"
    assert min(b.created - a.created for a, b in itertools.pairwise(warnings)) >= 1.0 * 0.99


def test_task_of_names_the_task_the_worker_runs_when_the_line_is_read_and_dash_when_idle(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    running: dict[tuple[int, int], str] = {}
    asked: list[tuple[int, int]] = []

    def task_of(slot: int, pid: int) -> str | None:
        asked.append((slot, pid))
        return running.get((slot, pid))

    relay, captured = make_relay(task_of=task_of)
    echo = "import sys\nfor line in sys.stdin: sys.stdout.write(line); sys.stdout.flush()"
    proc, _, _ = spawn(children, relay, echo, slot=2, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    running[(2, proc.pid)] = "count_words"
    proc.stdin.write(b"first\n")
    proc.stdin.flush()
    wait_for(lambda: len(captured.lines()) == 1)
    del running[(2, proc.pid)]
    proc.stdin.write(b"second\n")
    proc.stdin.close()
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    assert [(r.task, r.getMessage()) for r in captured.lines()] == [
        ("count_words", f"worker {proc.pid} (count_words) stdout: first"),
        ("-", f"worker {proc.pid} (-) stdout: second"),
    ]
    assert set(asked) == {(2, proc.pid)}


def test_a_task_of_that_raises_gives_task_dash_and_the_lines_still_arrive(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    def task_of(slot: int, pid: int) -> str | None:
        raise RuntimeError("table gone")

    relay, captured = make_relay(task_of=task_of)
    proc, _, _ = spawn(children, relay, "print('a'); print('b')")
    assert proc.wait(30) == 0
    wait_for(lambda: relay.stats()["streams"] == 0)
    assert captured.messages() == [f"worker {proc.pid} (-) stdout: a", f"worker {proc.pid} (-) stdout: b"]


def test_close_returns_promptly_logs_the_partial_line_and_closes_fds_a_live_child_still_writes_to(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay()
    code = "import os, sys\nos.write(1, b'one\\ntwo\\npartial')\nsys.stdin.read()"
    proc, out_r, err_r = spawn(children, relay, code, stdin=subprocess.PIPE)
    wait_for(lambda: len(captured.lines()) == 2, what="the complete lines")
    started = time.monotonic()
    assert relay.close(5.0)
    assert time.monotonic() - started < 1.0
    assert proc.poll() is None, "the child still holds the write ends: no EOF came"
    assert captured.messages()[-1] == f"worker {proc.pid} (-) stdout: partial"
    assert closed(out_r) and closed(err_r)
    assert relay.stats()["streams"] == 0
    assert relay.close(5.0), "close is idempotent"


def test_close_of_a_relay_never_started_relays_what_the_pipes_hold_and_closes_them(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay(start=False)
    code = "import os, sys\nos.write(1, b'one\\ntwo')\nos.write(2, b'three\\n')\nsys.stdin.read()"
    proc, out_r, err_r = spawn(children, relay, code, stdin=subprocess.PIPE)
    # Nobody reads yet: the bytes wait in the pipes.
    wait_for(lambda: (pending(out_r), pending(err_r)) == (len(b"one\ntwo"), len(b"three\n")), what="the child wrote")
    assert relay.close(5.0)
    assert sorted(captured.messages()) == sorted(
        [
            f"worker {proc.pid} (-) stdout: one",
            f"worker {proc.pid} (-) stdout: two",
            f"worker {proc.pid} (-) stderr: three",
        ]
    )
    assert closed(out_r) and closed(err_r)
    assert proc.poll() is None


def test_add_after_close_closes_the_fd_at_once(make_relay: MakeRelay) -> None:
    relay, _ = make_relay()
    assert relay.close(5.0)
    r, w = os.pipe()
    relay.add(r, 1, 0, "stdout")
    assert closed(r)
    os.close(w)


def test_remove_relays_the_partial_line_and_closes_only_that_workers_fds_while_its_child_lingers(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay()
    lingering = "import os, sys\nos.write(1, b'complete\\nlast words')\nsys.stdin.read()"
    gone, gone_out, gone_err = spawn(children, relay, lingering, stdin=subprocess.PIPE)
    kept, kept_out, kept_err = spawn(children, relay, lingering, slot=1, stdin=subprocess.PIPE)
    # One write: once "complete" is logged, "last words" is held as a partial line.
    wait_for(lambda: len(captured.lines(gone.pid)) == 1 and len(captured.lines(kept.pid)) == 1)
    relay.remove(gone.pid)
    wait_for(lambda: closed(gone_out) and closed(gone_err), what="the removed worker's fds closed")
    assert relay.stats()["streams"] == 2
    assert not closed(kept_out) and not closed(kept_err)
    assert gone.poll() is None and kept.poll() is None
    assert captured.messages(gone.pid) == [
        f"worker {gone.pid} (-) stdout: complete",
        f"worker {gone.pid} (-) stdout: last words",
    ]
    assert captured.messages(kept.pid) == [f"worker {kept.pid} (-) stdout: complete"]
    relay.remove(gone.pid)  # a pid the relay no longer holds: nothing happens
    assert relay.stats()["streams"] == 2


def test_streams_added_from_eight_threads_while_the_relay_runs_are_all_relayed(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay()
    lock = threading.Lock()
    pids: list[int] = []

    def add_one(slot: int) -> None:
        with lock:  # Popen and the children list; the adds themselves race
            out_r, out_w = os.pipe()
            proc = subprocess.Popen([sys.executable, "-c", "for i in range(50): print(i)"], stdout=out_w)
            os.close(out_w)
            children.append(proc)
        relay.add(out_r, proc.pid, slot, "stdout")
        pids.append(proc.pid)

    threads = [threading.Thread(target=add_one, args=(slot,)) for slot in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: len(captured.lines()) == 400 and relay.stats()["streams"] == 0, what="every line")
    for pid in pids:
        assert [r.getMessage() for r in captured.lines(pid)] == [f"worker {pid} (-) stdout: {i}" for i in range(50)]


def test_a_forkserver_child_redirected_onto_socket_ends_relays_print_os_write_and_subprocess_output(
    make_relay: MakeRelay,
) -> None:
    """The wiring the pool will use: socket pairs, the child ends passed as Process arguments (pickled
    through the forkserver, as the frame socket is) and put on fds 1 and 2 by `redirect_output`."""
    relay, captured = make_relay()
    out_r, out_w = socket.socketpair()
    err_r, err_w = socket.socketpair()
    proc = mp.get_context("forkserver").Process(target=print_everywhere, args=(out_w, err_w), daemon=True)
    proc.start()
    out_w.close()
    err_w.close()
    assert proc.pid is not None
    relay.add(out_r.detach(), proc.pid, 0, "stdout")
    relay.add(err_r.detach(), proc.pid, 0, "stderr")
    proc.join(30)
    assert proc.exitcode == 0
    wait_for(lambda: relay.stats()["streams"] == 0, what="EOF on both sockets")
    got = {(r.stream, r.getMessage().split(": ", 1)[1]) for r in captured.lines(proc.pid)}
    assert got == {
        ("stdout", "print to stdout"),
        ("stderr", "print to stderr"),
        ("stdout", "os.write to fd 1"),
        ("stdout", "subprocess stdout"),
        ("stderr", "subprocess stderr"),
    }


def test_redirect_output_makes_print_line_buffered_so_a_line_arrives_before_the_child_exits(
    make_relay: MakeRelay, children: list[subprocess.Popen[bytes]]
) -> None:
    relay, captured = make_relay()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    code = (
        "import sys\nfrom workers.local.output import redirect_output\n"
        f"redirect_output({out_w}, {err_w})\nprint('before the wait')\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        pass_fds=(out_w, err_w),
        cwd=ROOT,
    )
    children.append(proc)
    os.close(out_w)
    os.close(err_w)
    relay.add(out_r, proc.pid, 0, "stdout")
    relay.add(err_r, proc.pid, 0, "stderr")
    wait_for(lambda: captured.messages() == [f"worker {proc.pid} (-) stdout: before the wait"])
    assert proc.poll() is None
