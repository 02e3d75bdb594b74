"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

It lives with the workers because the worker count is the process side's concern: `--workers`
defaults to it (service/settings.py), and a container limited to 2 CPUs on a 64-core host must start
2 workers, not 64 that fight over two CPUs' worth of time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_quota"]


def available_cpus(
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup"
) -> int:
    """CPUs in this process's affinity mask, capped by a cgroup CPU quota (v2 cpu.max or v1 CFS).

    A container limited to 2 CPUs on a 64-core host gets 2; a fractional quota rounds up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path(cgroup_root), Path(proc_self_cgroup))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path, proc_self_cgroup: Path) -> float | None:
    """The CPU limit (in CPUs) the cgroup imposes on this process, or None if there is none."""
    paths = _own_cgroup_paths(proc_self_cgroup)
    # cgroup v2: cpu.max is "QUOTA PERIOD" or "max PERIOD". The limit in force is the tightest of our
    # cgroup and its ancestors (a parent slice may cap a child that says "max"), down to the mount root.
    found_v2 = False
    limits: list[float] = []
    for rel in _ancestors(paths.get("", "")):
        try:
            quota_s, period_s = (root / rel / "cpu.max").read_text().split()[:2]
            found_v2 = True
            if quota_s != "max" and int(period_s) > 0 and int(quota_s) > 0:
                limits.append(int(quota_s) / int(period_s))
        except (OSError, ValueError):
            continue
    if found_v2:
        return min(limits, default=None)
    # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us, under the cpu controller.
    v1 = paths.get("cpu", paths.get("cpu,cpuacct", paths.get("cpuacct,cpu"))) or ""
    for base in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for rel in _ancestors(v1):
            d = root / base / rel
            try:
                quota = int((d / "cpu.cfs_quota_us").read_text())
                period = int((d / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
        if limits:
            return min(limits)
    return None


def _ancestors(cgroup_path: str) -> list[str]:
    """'/a/b' -> ['a/b', 'a', '']: a cgroup's path relative to the mount, then its parents'."""
    parts = [p for p in cgroup_path.split("/") if p and p != ".."]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _own_cgroup_paths(proc_self_cgroup: Path) -> dict[str, str]:
    """controller list -> path, from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                out[parts[1]] = parts[2]
                for controller in parts[1].split(","):
                    out.setdefault(controller, parts[2])
    except OSError:
        pass
    return out
