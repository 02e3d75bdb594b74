"""workers.cpus: the CPU count (the default of --workers) from the affinity mask and a (fake) cgroup
quota, v2 and v1, nested and inherited limits included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.cpus import available_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def cgroup(tmp_path):
    """A fake cgroup mount and a fake /proc/self/cgroup saying we sit at the root."""
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    return root, proc


def test_v2_quota_caps_the_count(cgroup):
    root, proc = cgroup
    write(root / "cpu.max", "200000 100000\n")
    assert available_cpus(root, str(proc)) == min(affinity(), 2)


def test_v2_single_cpu_quota(cgroup):
    root, proc = cgroup
    write(root / "cpu.max", "100000 100000\n")
    assert available_cpus(root, str(proc)) == 1


def test_v2_fractional_quota_rounds_up(cgroup):
    root, proc = cgroup
    write(root / "cpu.max", "150000 100000\n")
    assert available_cpus(root, str(proc)) == min(affinity(), 2)
    write(root / "cpu.max", "10000 100000\n")  # a tenth of a CPU still gets one worker
    assert available_cpus(root, str(proc)) == 1


def test_v2_no_limit_is_the_affinity_count(cgroup):
    root, proc = cgroup
    write(root / "cpu.max", "max 100000\n")
    assert available_cpus(root, str(proc)) == affinity()


def test_no_cgroup_files_at_all(tmp_path):
    assert available_cpus(tmp_path / "missing", str(tmp_path / "missing-proc")) == affinity()


def test_v2_nested_cgroup_from_proc_self_cgroup(cgroup):
    root, proc = cgroup
    proc.write_text("0::/kubepods/pod1\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "100000 100000\n")
    assert available_cpus(root, str(proc)) == 1


def test_v2_parent_limit_applies_to_an_unlimited_child(cgroup):
    root, proc = cgroup
    proc.write_text("0::/kubepods/pod1\n")
    write(root / "kubepods" / "cpu.max", "100000 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert available_cpus(root, str(proc)) == 1


def test_v2_nested_path_missing_falls_back_to_the_mount_root(cgroup):
    root, proc = cgroup
    proc.write_text("0::/docker/abc123\n")  # no cgroup namespace: our path is not under this mount
    write(root / "cpu.max", "100000 100000\n")
    assert available_cpus(root, str(proc)) == 1


def test_v1_cfs_quota(cgroup):
    root, proc = cgroup
    proc.write_text("12:cpu,cpuacct:/\n11:memory:/\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert available_cpus(root, str(proc)) == 1


def test_v1_fractional_and_nested(cgroup):
    root, proc = cgroup
    proc.write_text("4:cpu,cpuacct:/docker/abc\n")
    write(root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "150000\n")
    write(root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert available_cpus(root, str(proc)) == min(affinity(), 2)


def test_v1_quota_minus_one_is_no_limit(cgroup):
    root, proc = cgroup
    proc.write_text("4:cpu,cpuacct:/\n")
    write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert available_cpus(root, str(proc)) == affinity()
