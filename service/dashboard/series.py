"""Calls per second and latency percentiles over the last five minutes, for the dashboard.

What the hot path pays: `Metrics.observe` (once per call, on the loop's thread) adds one to the
current second's call count and one to the current second's count of the duration bucket the call
falls in (the index it has already computed for the Prometheus histogram). Both are slots of a
list made once at start-up: no object is kept per call, no lock, no clock read. The second moves on
when the loop's periodic timer (the event-loop lag timer, every 0.1 s) or a snapshot calls
`advance(now)`: that clears the rows of the seconds passed (in place) and points `row` at the new
one. So a second's boundaries are those of CLOCK_MONOTONIC, give or take the timer's lateness
(0.1 s plus the loop's lag), and a row never changes once its second is over.

Percentiles (the method, and what it can tell): the calls of a second, or of the last 60 or 300
seconds, are counted per bucket of the duration histogram (`procbridge_task_duration_seconds`: 0.5,
1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10, 30, 60, 120 s, then +Inf). The q-th
percentile is found as Prometheus' `histogram_quantile` finds it: the bucket holding the call of rank
q × n, and within it a linear interpolation between the bucket's bounds (the first bucket's lower
bound is 0). The resolution is therefore the bucket's width: a p99 reported as 17 ms lies somewhere
in 10-25 ms, exact only if the calls in that bucket are spread evenly; a percentile in the +Inf
bucket is reported as 120 000 ms (a lower bound). Latency counts only calls that ran (the seconds a
task ran in its worker, as for the histogram); the call counts include failed and refused calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

WINDOW = 300  # seconds of history kept and shown
_SLOTS = WINDOW + 1  # the finished seconds shown, and the one going on


def percentile(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The q-th quantile (0 < q < 1) of observations counted per bucket, in the unit of `bounds`;
    `counts` has one more entry than `bounds` (the +Inf bucket). None when nothing was counted."""
    total = sum(counts[: len(bounds) + 1])
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, n in enumerate(counts[: len(bounds) + 1]):
        if n and below + n >= rank:
            if i == len(bounds):  # +Inf: only its lower bound is known
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / n
        below += n
    return bounds[-1]  # not reached: rank <= total


class CallSeries:
    """Per-second rows of (duration bucket counts..., calls) for the last WINDOW seconds.

    `row` is the current second's list: `row[i]` (i < len(bounds) + 1) counts the calls whose
    duration fell in bucket i, `row[calls]` every call. Only the loop's thread writes or reads it.
    """

    def __init__(
        self,
        bounds: Sequence[float],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.bounds = tuple(bounds)
        self.calls = len(self.bounds) + 1  # the index of the call count in a row
        self._clock = clock
        self._wall = wall
        self._rows = [[0] * (self.calls + 1) for _ in range(_SLOTS)]
        self._zero = [0] * (self.calls + 1)
        self.second = int(clock())
        self.row = self._rows[self.second % _SLOTS]
        self._since = self.second  # the first second counted
        self._done: dict[int, tuple[int, float | None, float | None]] = {}  # finished seconds' entries

    def advance(self, now: float | None = None) -> None:
        """Move on to the second `now` (the clock's reading) falls in, clearing the rows in between."""
        second = int(self._clock() if now is None else now)
        if second <= self.second:
            return
        rows, zero = self._rows, self._zero
        for s in range(max(self.second + 1, second - _SLOTS + 1), second + 1):
            rows[s % _SLOTS][:] = zero
        self.second = second
        self.row = rows[second % _SLOTS]

    def observe(self, bucket: int | None) -> None:
        """Count one call (and its duration bucket, if it ran): what Metrics.observe does inline."""
        row = self.row
        row[self.calls] += 1
        if bucket is not None:
            row[bucket] += 1

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's `calls`: the finished seconds of the last WINDOW, oldest first, each
        [epoch second, calls, p50 ms, p99 ms]; calls/s over the last minute (over the seconds counted,
        when the service is younger); p50/p95/p99 over the last one and five minutes (None: no call ran)."""
        now = self._clock()
        self.advance(now)
        offset = self._wall() - now  # monotonic -> epoch
        first = self.second - WINDOW
        done = self._done
        for old in [s for s in done if s < first]:
            del done[old]
        series = []
        for s in range(first, self.second):
            entry = done.get(s)
            if entry is None:
                entry = done[s] = self._entry(s)
            series.append([int(s + offset), *entry])
        last_minute = self._sum(60)
        counted = min(60, max(1, self.second - self._since))
        return {
            "window_s": WINDOW,
            "series": series,
            "rate_1m": round(last_minute[self.calls] / counted, 3),
            "latency_ms_1m": self._latencies(last_minute),
            "latency_ms_5m": self._latencies(self._sum(WINDOW)),
        }

    def _entry(self, second: int) -> tuple[int, float | None, float | None]:
        row = self._rows[second % _SLOTS]
        return (row[self.calls], self._ms(row, 0.5), self._ms(row, 0.99))

    def _sum(self, seconds: int) -> list[int]:
        """Bucket and call counts summed over the last `seconds` finished seconds."""
        rows = [self._rows[s % _SLOTS] for s in range(max(self._since, self.second - seconds), self.second)]
        return [sum(column) for column in zip(*rows, strict=True)] if rows else list(self._zero)

    def _latencies(self, counts: list[int]) -> dict[str, float | None] | None:
        if not any(counts[: self.calls]):
            return None
        return {"p50": self._ms(counts, 0.5), "p95": self._ms(counts, 0.95), "p99": self._ms(counts, 0.99)}

    def _ms(self, counts: Sequence[int], q: float) -> float | None:
        value = percentile(counts, self.bounds, q)
        return None if value is None else round(value * 1000, 3)
