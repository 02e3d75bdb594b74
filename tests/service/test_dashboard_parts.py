"""The dashboard's parts on their own: the per-second call series and its percentiles (a fake clock),
the snapshot hub (a fake snapshot builder, short intervals), the file loader, and --cors-origins."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import pytest

from service.config import ConfigError, load
from service.converters import cors_origins
from service.dashboard.hub import SnapshotHub
from service.dashboard.series import WINDOW, CallSeries, percentile
from service.dashboard.static import OTHER
from service.dashboard.static import load as load_files
from service.metrics import _DURATION_BUCKETS, Metrics
from tests.conftest import wait_until

BOUNDS = (0.001, 0.01, 0.1, 1.0)


class FakeClock:
    def __init__(self, now: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = now
        self.offset = wall - now

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.offset


# -- percentiles from bucket counts ---------------------------------------------------------------


def test_a_percentile_is_interpolated_within_its_bucket() -> None:
    # 10 calls in (1 ms, 10 ms]: the median is half-way through that bucket, the p90 nine tenths in.
    counts = [0, 10, 0, 0, 0]
    assert percentile(counts, BOUNDS, 0.5) == pytest.approx(0.001 + 0.009 * 0.5)
    assert percentile(counts, BOUNDS, 0.9) == pytest.approx(0.001 + 0.009 * 0.9)
    # The first bucket starts at 0; ranks cross buckets by their counts.
    assert percentile([4, 0, 0, 0, 0], BOUNDS, 0.5) == pytest.approx(0.0005)
    assert percentile([50, 0, 50, 0, 0], BOUNDS, 0.75) == pytest.approx(0.01 + 0.09 * 0.5)
    assert percentile([99, 0, 0, 1, 0], BOUNDS, 0.99) == pytest.approx(0.001)  # rank 99 is the 99th call
    assert percentile([98, 0, 0, 2, 0], BOUNDS, 0.99) == pytest.approx(0.1 + 0.9 * 0.5)


def test_a_percentile_in_the_overflow_bucket_is_its_lower_bound_and_none_without_calls() -> None:
    assert percentile([0, 0, 0, 0, 3], BOUNDS, 0.5) == 1.0
    assert percentile([0, 0, 0, 0, 0], BOUNDS, 0.5) is None


# -- the per-second series ------------------------------------------------------------------------


def _series(clock: FakeClock) -> CallSeries:
    return CallSeries(BOUNDS, clock, clock.wall)


def test_each_finished_second_has_its_calls_and_percentiles_oldest_first() -> None:
    clock = FakeClock(1000.2)
    series = _series(clock)
    for _ in range(3):
        series.observe(1)  # 1-10 ms
    series.observe(None)  # refused: counted, no latency
    clock.now = 1001.5
    series.advance()
    for _ in range(4):
        series.observe(3)  # 0.1-1 s
    clock.now = 1002.1
    snap = series.snapshot()
    rows = snap["series"]
    assert snap["window_s"] == WINDOW and len(rows) == WINDOW
    assert [r[0] for r in rows] == list(range(rows[0][0], rows[0][0] + WINDOW))  # one per second, in order
    assert rows[-1][0] == int(1001 + clock.offset)  # the last finished second; the one going on is not shown
    assert rows[-2][1:] == [4, 5.5, 9.91]  # 4 calls; p50, p99 of the 3 that ran, interpolated in 1-10 ms
    assert rows[-1][1:] == [4, 550.0, 991.0]
    assert all(r[1:] == [0, None, None] for r in rows[:-2])
    assert snap["rate_1m"] == 4.0  # 8 calls in the 2 seconds counted so far
    # 3 fast, 4 slow: the median (rank 3.5 of 7) is an eighth into the slow calls' bucket
    assert snap["latency_ms_1m"] == {"p50": 212.5, "p95": 921.25, "p99": 984.25}
    assert snap["latency_ms_5m"] == snap["latency_ms_1m"]


def test_seconds_move_on_without_calls_and_old_ones_leave_the_window() -> None:
    clock = FakeClock(500.0)
    series = _series(clock)
    series.observe(0)
    clock.now = 501.0
    series.advance()
    first = series.snapshot()["series"]
    assert first[-1][1] == 1
    clock.now = 501.0 + 59  # a minute later the call still counts in the 5-minute figures only
    snap = series.snapshot()
    assert sum(r[1] for r in snap["series"]) == 1
    clock.now = 561.0 + 1
    snap = series.snapshot()
    assert snap["rate_1m"] == 0.0 and snap["latency_ms_1m"] is None and snap["latency_ms_5m"] is not None
    clock.now = 500.0 + WINDOW + 2  # past the window: gone, and its row is clear for reuse
    snap = series.snapshot()
    assert sum(r[1] for r in snap["series"]) == 0 and snap["latency_ms_5m"] is None
    series.observe(2)
    clock.now += 1
    assert series.snapshot()["series"][-1][1:] == [1, 55.0, 99.1]


def test_a_jump_longer_than_the_window_clears_every_row() -> None:
    clock = FakeClock(10.0)
    series = _series(clock)
    for second in range(WINDOW + 1):
        clock.now = 10.0 + second
        series.advance()
        series.observe(1)
    clock.now += 10 * WINDOW
    assert sum(r[1] for r in series.snapshot()["series"]) == 0


def test_metrics_observe_counts_each_call_in_its_second() -> None:
    clock = FakeClock(100.0)
    metrics = Metrics(lambda: None, clock)
    metrics.series = CallSeries(_DURATION_BUCKETS, clock, clock.wall)
    metrics.observe("t", "ok", 0.003)  # 2.5-5 ms
    metrics.observe("t", "ok", 0.003)
    metrics.observe("t", "overloaded")
    clock.now = 101.0
    snap = metrics.series.snapshot()
    assert snap["series"][-1][1:] == [3, 3.75, 4.975]
    # the Prometheus figures are unchanged
    text = metrics.render().decode()
    assert 'procbridge_task_duration_seconds_count{task="t"} 2.0' in text
    assert 'procbridge_tasks_total{outcome="overloaded",task="t"} 1.0' in text


def test_observe_costs_next_to_nothing() -> None:
    """The hot path's added work is two list slots: observe stays within a microsecond or two."""
    metrics = Metrics(lambda: None)
    n = 200_000
    started = time.perf_counter()
    for _ in range(n):
        metrics.observe("noop", "ok", 0.0001)
    per_call = (time.perf_counter() - started) / n
    assert per_call < 5e-6, per_call


# -- the hub --------------------------------------------------------------------------------------


class Builds:
    def __init__(self, delay: float = 0.0) -> None:
        self.n = 0
        self.delay = delay

    async def __call__(self) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.n += 1
        return f"snapshot {self.n}"


async def _collect(hub: SnapshotHub, into: list[tuple[float, str]], pause: float = 0.0) -> None:
    with hub.watch() as watcher:
        while (snapshot := await watcher.next()) is not None:
            into.append((time.monotonic(), snapshot))
            if pause:
                await asyncio.sleep(pause)


async def test_one_producer_serves_every_watcher_and_runs_only_while_watched() -> None:
    builds = Builds()
    hub = SnapshotHub(builds, interval=0.05)
    assert hub.producer is None
    a: list[tuple[float, str]] = []
    b: list[tuple[float, str]] = []
    first = asyncio.ensure_future(_collect(hub, a))
    await wait_until(lambda: a)
    producer = hub.producer
    assert producer is not None
    second = asyncio.ensure_future(_collect(hub, b))
    await wait_until(lambda: len(b) >= 5)
    assert hub.producer is producer  # the second watcher shares it
    assert b[0][1] in [s for _, s in a]  # at once, the latest there was
    assert builds.n <= len(a) + 1  # one build per snapshot sent, not one per watcher
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert hub.producer is producer  # someone still watches
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await wait_until(lambda: hub.producer is None, 2.0)
    built = builds.n
    await asyncio.sleep(0.2)
    assert builds.n == built  # nobody watches: nothing is built
    again: list[tuple[float, str]] = []
    third = asyncio.ensure_future(_collect(hub, again))
    await wait_until(lambda: again)
    assert again[0][1] == f"snapshot {built + 1}"  # a fresh one, not the one left from before
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)


async def test_each_watcher_gets_at_most_one_snapshot_per_interval_and_a_slow_one_skips() -> None:
    hub = SnapshotHub(Builds(), interval=0.05)
    fast: list[tuple[float, str]] = []
    slow: list[tuple[float, str]] = []
    tasks = [asyncio.ensure_future(_collect(hub, fast)), asyncio.ensure_future(_collect(hub, slow, pause=0.3))]
    await asyncio.sleep(1.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(fast)]
    assert gaps and min(gaps) >= 0.05 * 0.95
    assert 2 <= len(slow) <= 5  # one per send it could make: the ones in between were skipped
    numbers = [int(s.split()[1]) for _, s in slow]
    assert numbers == sorted(numbers) and numbers[-1] - numbers[0] > len(numbers)  # it skipped, in order


async def test_a_drain_sends_one_last_snapshot_then_ends_every_stream() -> None:
    hub = SnapshotHub(Builds(), interval=10.0)  # no regular snapshot during the test
    got: list[tuple[float, str]] = []
    watcher = asyncio.ensure_future(_collect(hub, got))
    await wait_until(lambda: got)
    hub.drain()
    await asyncio.wait_for(watcher, 2.0)  # well before the 10 s interval
    assert [s for _, s in got] == ["snapshot 1", "snapshot 2"]
    assert hub.closing and hub.producer is None


async def test_close_ends_the_streams_at_once() -> None:
    hub = SnapshotHub(Builds(), interval=10.0)
    got: list[tuple[float, str]] = []
    watcher = asyncio.ensure_future(_collect(hub, got))
    await wait_until(lambda: got)
    await hub.close()
    await asyncio.wait_for(watcher, 1.0)
    assert hub.producer is None and hub.closed


async def test_a_failing_build_is_logged_once_and_the_stream_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RuntimeError("store down")
        return "ok"

    hub = SnapshotHub(flaky, interval=0.02)
    got: list[tuple[float, str]] = []
    watcher = asyncio.ensure_future(_collect(hub, got))
    await wait_until(lambda: got)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert got[0][1] == "ok"
    assert sum("building a snapshot failed" in r.message for r in caplog.records) == 1


# -- the files ------------------------------------------------------------------------------------


def test_only_plain_files_directly_in_the_folder_are_served_with_their_types(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "style.css").write_text("a{}")
    (tmp_path / "icon.svg").write_text("<svg/>")
    (tmp_path / "LICENSE.txt").write_text("MIT")
    (tmp_path / "blob.bin").write_bytes(b"\0")
    (tmp_path / ".hidden.js").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.js").write_text("x")
    (tmp_path / "link.js").symlink_to(tmp_path.parent / "elsewhere.js")
    files = load_files(tmp_path)
    assert {name: f.content_type for name, f in files.items()} == {
        "index.html": "text/html; charset=utf-8",
        "app.js": "text/javascript; charset=utf-8",
        "style.css": "text/css; charset=utf-8",
        "icon.svg": "image/svg+xml",
        "LICENSE.txt": "text/plain; charset=utf-8",
        "blob.bin": OTHER,
    }
    assert files["app.js"].body == b"1" and files["app.js"].etag.startswith('"')


# -- --cors-origins -------------------------------------------------------------------------------


def test_cors_origins_are_read_as_a_browser_writes_them() -> None:
    assert cors_origins("https://App.Example.com, http://localhost:3000") == (
        "https://app.example.com", "http://localhost:3000")
    assert cors_origins("https://a.example:443,http://b.example:80,*") == ("https://a.example", "http://b.example", "*")
    assert cors_origins("http://[::1]:9000") == ("http://[::1]:9000",)
    for bad in ("app.example.com", "ftp://x", "https://a.example/", "https://a.example/path", "https://u:p@a.example",
                "https://a.example:99999", " , "):
        with pytest.raises(ValueError):
            cors_origins(bad)
    assert load([], {"PROCBRIDGE_CORS_ORIGINS": "https://app.example.com"}).cors_origins == ("https://app.example.com",)
    assert load(["--cors-origins", "*"], {}).cors_origins == ("*",)
    assert load([], {}).cors_origins == ()
    with pytest.raises(ConfigError, match="--cors-origins"):
        load(["--cors-origins", "app.example.com"], {})
