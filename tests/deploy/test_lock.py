"""The pinned locks are complete for every Python that pyproject.toml admits.

Both locks are installed with `pip install --no-deps` (scripts/_bootstrap, the Dockerfile): nothing is
resolved at install time, so a dependency that a pinned package needs only on some Pythons (a
`python_full_version < "3.11.3"` marker, say) must be in the lock with that marker, or the install
on that Python silently lacks it. These tests read each pinned package's own metadata (Requires-Dist,
Requires-Python) from this machine's venv and evaluate every marker for several Pythons the project
allows, not only the one running the tests.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The oldest releases of each minor line (where markers such as `< "3.11.3"` bite) and later lines.
CANDIDATES = ["3.11.0", "3.11.2", "3.11.3", "3.12.0", "3.13.0"]
PYTHONS = [v for v in CANDIDATES if Version(v) in SpecifierSet(PROJECT["requires-python"])]


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    line: str


def read_lock(path: Path) -> list[Pin]:
    """The `name==version [; marker]` lines of a lock, following its `-r` includes."""
    pins: list[Pin] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins += read_lock(path.parent / line[3:].strip())
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {raw!r} is not an exact pin"
        pins.append(Pin(canonicalize_name(req.name), Version(spec.version), req.marker, raw))
    return pins


def environment(python: str) -> dict[str, str]:
    env = dict(default_environment())
    env.update(python_full_version=python, python_version=".".join(python.split(".")[:2]),
               implementation_version=python, sys_platform="linux", platform_system="Linux", os_name="posix")
    return env


def active(pins: list[Pin], env: dict[str, str]) -> dict[str, Pin]:
    return {p.name: p for p in pins if p.marker is None or p.marker.evaluate(env)}


def unmet(pins: list[Pin], roots: list[str], python: str) -> list[str]:
    """What installing `pins` with --no-deps on `python` would lack or get wrong."""
    env = environment(python)
    installed = active(pins, env)
    problems = []
    wanted = [("pyproject.toml", Requirement(r)) for r in roots]
    for pin in installed.values():
        try:
            dist = importlib.metadata.distribution(pin.name)
        except importlib.metadata.PackageNotFoundError:
            # Pinned for other Pythons only (this venv's Python skips it): its own needs cannot be
            # read here, and the ones it has are plain (checked where it is installed).
            continue
        if Version(dist.version) != pin.version:
            problems.append(f"{pin.name}: the lock pins {pin.version}, this venv has {dist.version}")
        requires_python = dist.metadata.get("Requires-Python")
        if requires_python and Version(python) not in SpecifierSet(requires_python):
            problems.append(f"{pin.name} {pin.version} requires Python {requires_python}")
        wanted += [(f"{pin.name} {pin.version}", Requirement(r)) for r in dist.requires or []]
    for who, req in wanted:
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        got = installed.get(canonicalize_name(req.name))
        if got is None:
            problems.append(f"{who} needs {req} on Python {python}: not in the lock for it")
        elif got.version not in req.specifier:
            problems.append(f"{who} needs {req}: the lock pins {got.version}")
    return problems


@pytest.mark.parametrize("python", PYTHONS)
def test_the_runtime_lock_alone_satisfies_the_project_and_every_pin_on(python: str) -> None:
    """The client's dependencies and the server's (the image installs this lock alone)."""
    pins = read_lock(ROOT / "requirements.lock")
    assert unmet(pins, PROJECT["dependencies"] + PROJECT["optional-dependencies"]["server"], python) == []


@pytest.mark.parametrize("python", PYTHONS)
def test_the_dev_lock_satisfies_the_dev_extra_and_every_pin_on(python: str) -> None:
    pins = read_lock(ROOT / "requirements-dev.lock")
    extras = PROJECT["optional-dependencies"]
    roots = PROJECT["dependencies"] + extras["server"] + extras["dev"]
    assert unmet(pins, roots, python) == []


def test_a_dependency_pinned_without_its_marker_is_missing_on_the_pythons_that_need_it() -> None:
    """The check itself: the runtime lock without its marked async-timeout line is found incomplete
    on 3.11.2 (redis needs it below 3.11.3) and complete on 3.12."""
    pins = [p for p in read_lock(ROOT / "requirements.lock") if p.name != "async-timeout"]
    roots = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["server"]
    problems = unmet(pins, roots, "3.11.2")
    assert any(p.startswith("redis ") and "async-timeout" in p for p in problems), problems
    assert unmet(pins, roots, "3.12.0") == []
