"""Measure the example model outside the service: its file, the cost of loading it, its memory, and
what copy-on-write sharing gives forked processes.

    python -m examples.digits.measure PATH [--forks 2] [--calls 200]
    python -m examples.digits.measure --tree PID

With PATH, in one fresh interpreter, in order:

1. the file's size;
2. the import of scikit-learn (what the worker parent pays once, before any model): time and RSS;
3. `joblib.load(PATH)`: time, and RSS before and after (the model's memory as the process sees it,
   allocator slack included), then after `gc.collect()` and glibc's `malloc_trim(0)` (what the model
   itself keeps);
4. `gc.freeze()`, then `--forks` children made with `os.fork()` (as a worker parent forks its
   workers), each classifying `--calls` held-out digits one at a time, then reporting its RSS, USS
   (pages only it has) and PSS. USS is what each extra worker costs; without sharing it would be
   about the parent's RSS.

This is plain `os.fork`, not procbridge's pool: the pool's own figures are in docs/models.md.

With `--tree PID` (a running server's pid): RSS, USS and PSS of that process and every process under
it (the worker parent, the workers), which is how the pool's figures are read.

Linux only (USS and PSS come from /proc/PID/smaps_rollup, via psutil).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import sys
import time
from pathlib import Path

import psutil

MiB = 2**20


def rss() -> float:
    return psutil.Process().memory_info().rss / MiB


def trim() -> None:
    """Give freed heap back to the kernel (glibc's malloc_trim), so RSS shows what is still in use."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def tree(pid: int) -> int:
    """RSS, USS and PSS of `pid` and its descendants; the PSS total is what they hold together."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            mem = proc.memory_full_info()
            name, command = proc.name(), " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        total += mem.pss / MiB
        sizes = f"RSS {mem.rss / MiB:7.1f} MiB  USS {mem.uss / MiB:7.1f} MiB  PSS {mem.pss / MiB:7.1f} MiB"
        print(f"{proc.pid:<8} {sizes}  {name[:15]:<15} {command[:45]}")
    print(f"{'total':<8} PSS {total:7.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, nargs="?", help="a model written by python -m examples.digits.train")
    parser.add_argument("--forks", type=int, default=2, help="children to fork [2]")
    parser.add_argument("--calls", type=int, default=200, help="digits each child classifies [200]")
    parser.add_argument("--tree", type=int, metavar="PID", help="measure this running process and its children instead")
    args = parser.parse_args(argv)
    if args.tree is not None:
        return tree(args.tree)
    if args.path is None:
        parser.error("give a model PATH, or --tree PID")

    print(f"file                    {args.path.stat().st_size / MiB:8.1f} MiB  {args.path}")
    base = rss()
    started = time.perf_counter()
    import joblib
    import numpy as np
    import sklearn.ensemble  # noqa: F401 - what unpickling the forest imports

    from examples.digits.train import held_out

    print(f"import sklearn          {rss() - base:+8.1f} MiB RSS  {time.perf_counter() - started:6.2f} s")
    test_x, test_y = held_out()
    gc.collect()
    trim()
    before = rss()
    started = time.perf_counter()
    forest = joblib.load(args.path)
    loaded = time.perf_counter() - started
    forest.n_jobs = None
    after = rss()
    gc.collect()
    trim()
    kept = rss()
    print(f"joblib.load             {after - before:+8.1f} MiB RSS  {loaded:6.2f} s  "
          f"({len(forest.estimators_)} trees, {sum(t.tree_.node_count for t in forest.estimators_):,} nodes)")
    print(f"  after gc + malloc_trim {kept - before:+8.1f} MiB RSS  (the model itself)")
    forest.predict_proba(np.zeros((1, test_x.shape[1])))
    parent = rss()
    print(f"parent before fork      {parent:8.1f} MiB RSS")

    gc.freeze()  # as the worker parent does: the objects made so far are left out of every collection
    children = []
    for _ in range(args.forks):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: work, measure, report, leave
            os.close(read_end)
            calls = args.calls
            started = time.perf_counter()
            right = sum(int(forest.predict(test_x[i % len(test_x)][None, :])[0] == test_y[i % len(test_y)])
                        for i in range(calls))
            per_call = (time.perf_counter() - started) / calls * 1000
            mem = psutil.Process().memory_full_info()
            os.write(write_end, f"{mem.rss / MiB:.1f} {mem.uss / MiB:.1f} {mem.pss / MiB:.1f} "
                                f"{right}/{calls} {per_call:.2f}".encode())
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    for pid, read_end in children:
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            c_rss, c_uss, c_pss, c_right, c_per_call = f.read().split()
        print(f"child {pid:<7}           RSS {c_rss} MiB, USS {c_uss} MiB, PSS {c_pss} MiB; "
              f"{c_right} right, {c_per_call} ms a call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
