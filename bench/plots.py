"""PNG plots with matplotlib (Agg, no display): a load test's latency over time and its percentile
curve, and the benchmark's comparisons. Imported only when plots are asked for."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

MAX_POINTS = 20_000  # the timeline scatter is thinned (evenly) beyond this many requests
COLORS = {"ok": "#1f77b4", "overloaded": "#ff7f0e", "errors": "#d62728", "unfinished": "#7f7f7f"}


def _save(fig: Any, path: str | Path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def timeline(
    ends: Sequence[float], latencies_ms: Sequence[float], kinds: Sequence[int], measure_from: float,
    path: str | Path, title: str,
) -> str:
    """Latency of each request against the time it finished, and completions per second."""
    t = np.asarray(ends, dtype=np.float64)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    k = np.asarray(kinds, dtype=np.int8)
    if t.size > MAX_POINTS:
        pick = np.linspace(0, t.size - 1, MAX_POINTS).astype(np.int64)
        t, lat, k = t[pick], lat[pick], k[pick]
        thinned = f" (every {math.ceil(len(ends) / MAX_POINTS)}th request shown)"
    else:
        thinned = ""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for code, name in enumerate(("ok", "overloaded", "errors", "unfinished")):
        sel = k == code
        if sel.any():
            ax.scatter(t[sel], np.maximum(lat[sel], 1e-3), s=2, alpha=0.5, color=COLORS[name], label=name,
                       rasterized=True)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(title + thinned, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if measure_from > 0:
        for a in (ax, ax2):
            a.axvline(measure_from, color="black", linestyle=":", linewidth=1)
        ax.text(measure_from, ax.get_ylim()[1], " warm-up ends", va="top", fontsize=8)
    ax.legend(loc="upper right", fontsize=8, markerscale=4)
    all_t = np.asarray(ends, dtype=np.float64)
    if all_t.size:
        edges = np.arange(0.0, math.floor(all_t.max()) + 2.0)
        counts, _ = np.histogram(all_t, bins=edges)
        ax2.step(edges[:-1], counts, where="post", color="black", linewidth=1)
    ax2.set_ylabel("done / s")
    ax2.set_xlabel("seconds since start")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


_PCT_TICKS = [0.0, 90.0, 99.0, 99.9, 99.99, 99.999]


def _pct_x(p: float) -> float:
    return 1.0 / max(1.0 - p / 100.0, 1e-6)


def percentiles(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, title: str) -> str:
    """HDR-style percentile curves: latency (ms, log) against the percentile, on a 1/(1-p) axis."""
    fig, ax = plt.subplots(figsize=(9, 5))
    top = 0.0
    for label, curve in curves.items():
        pts = [(p, v) for p, v in curve if p < 100.0]
        if not pts:
            continue
        xs = [_pct_x(p) for p, _ in pts]
        ys = [max(v, 1e-3) for _, v in pts]
        top = max(top, pts[-1][0])
        ax.plot(xs, ys, marker=".", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [p for p in _PCT_TICKS if p <= max(top, 99.0)]
    ax.xaxis.set_major_locator(FixedLocator([_pct_x(p) for p in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{100 * (1 - 1 / x):g}%"))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def bars(groups: Mapping[str, Mapping[str, float | None]], path: str | Path, title: str, ylabel: str) -> str:
    """Grouped bars: one group per key of `groups`, one bar per contender inside it."""
    names = list(groups)
    contenders: list[str] = []
    for g in groups.values():
        contenders.extend(c for c in g if c not in contenders)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        vals = [groups[name].get(c) for c in contenders]
        heights = [v if v is not None else 0.0 for v in vals]
        rects = ax.bar(range(len(contenders)), heights, color=[f"C{i}" for i in range(len(contenders))])
        for rect, v in zip(rects, vals, strict=True):
            ax.annotate("n/a" if v is None else f"{v:,.0f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(contenders)), contenders, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scaling(points: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> str:
    """CPU efficiency against the worker count (log 2 axis), one line per task size; 1.0 is ideal."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    workers = [int(p["workers"]) for p in points]
    for ms in (10, 1):
        ys = [p.get(f"burn{ms}_efficiency") for p in points]
        ax.plot(workers, [y if y is not None else np.nan for y in ys], marker="o", label=f"burn {ms} ms")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(workers))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.set_ylim(0.0, 1.1)
    ax.set_xlabel("workers")
    ax.set_ylabel("throughput / (workers × direct rate)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def loadtest_plots(recorder: Any, result: Mapping[str, Any], prefix: str, title: str) -> dict[str, str]:
    """The load test's two plots: PREFIX-timeline.png and PREFIX-percentiles.png."""
    out = {
        "timeline": timeline(
            recorder.ends, recorder.latencies, recorder.kinds, recorder.measure_from - recorder.t0,
            f"{prefix}-timeline.png", title,
        )
    }
    curves = {}
    if result["latency_ms"].get("count"):
        curves["ok responses"] = result["latency_ms"]["curve"]
    if result["latency_ms_all"].get("count") and result["latency_ms_all"]["count"] != result["latency_ms"].get("count"):
        curves["all responses"] = result["latency_ms_all"]["curve"]
    out["percentiles"] = percentiles(curves, f"{prefix}-percentiles.png", title)
    return out
