"""`pip install procbridge` gives the client and nothing of the server.

Offline, so no index is asked: the project's wheel is built here (`pip wheel --no-deps`, the pinned
setuptools), then
1. its metadata says so: the only unconditional Requires-Dist is httpx; the server's dependencies
   (aiohttp, uvloop, numpy, pillow, distributed, the stores) come only with the `server` extra;
2. it works so: the wheel is installed (`--no-index --no-deps`) into a fresh venv without system site
   packages, which is then given exactly the distributions its Requires-Dist closure names (followed
   recursively from this venv's metadata, markers evaluated, extras off) and nothing else, by a .pth
   file pointing at a folder of links to their files. In there, `import procbridge` works, a call to a
   real server works, uvloop, dask, numpy, aiohttp and pillow cannot even be found, and neither
service nor workers (in the same wheel) is imported.
What this does not prove: that an index serves those distributions (pip's resolver is not run).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT, ServerProcess

# The server's dependencies: not installed with the client. (service/ and workers/ are in the same
# wheel, so importable, but importing the client must not import them.)
HEAVY = ("aiohttp", "uvloop", "numpy", "PIL", "dask", "distributed", "redis", "aiosqlite", "orjson", "pydantic",
         "psutil")
SERVER = (*HEAVY, "service", "workers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(ROOT)], check=True, cwd=build,
                   env={**os.environ, "PIP_FIND_LINKS": ""})
    [found] = out.glob("procbridge-*.whl")
    return found


def metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(name).decode()
    prefix = "Requires-Dist:"
    return [Requirement(line[len(prefix):].strip()) for line in text.splitlines() if line.startswith(prefix)]


def test_the_wheel_requires_httpx_alone_and_the_server_only_with_its_extra(wheel: Path) -> None:
    env = {**default_environment(), "extra": ""}
    base = [r for r in metadata(wheel) if r.marker is None or r.marker.evaluate(env)]
    assert [canonicalize_name(r.name) for r in base] == ["httpx"]
    server = {canonicalize_name(r.name) for r in metadata(wheel)
              if r.marker is not None and r.marker.evaluate({**env, "extra": "server"}) and r not in base}
    assert {"aiohttp", "uvloop", "numpy", "pillow", "distributed", "redis", "aiosqlite"} <= server
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "procbridge/__init__.py" in names and "procbridge/client.py" in names and "procbridge/aio.py" in names
    # The dashboard's files are package data: the image installs the wheel, and serves the page from it.
    assert "service/dashboard/static/index.html" in names


def closure(roots: list[Requirement]) -> set[str]:
    """The distributions `roots` need, transitively, extras off (read from this venv's metadata)."""
    env = {**default_environment(), "extra": ""}
    todo, seen = list(roots), set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.distribution(name).requires or []]
    return seen


def test_the_installed_wheel_works_with_its_declared_dependencies_only(
        wheel: Path, tmp_path: Path, server: ServerProcess) -> None:
    env = {**default_environment(), "extra": ""}
    needed = closure([r for r in metadata(wheel) if r.marker is None or r.marker.evaluate(env)])
    assert needed >= {"httpx", "httpcore", "h11", "anyio", "idna", "certifi"}
    assert not needed & {"uvloop", "numpy", "dask", "aiohttp", "pillow"}
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in needed:  # a link to each top-level file or folder of each needed distribution
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (deps / top).exists() and top != "__pycache__":
                (deps / top).symlink_to(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
                    "--no-deps", str(wheel)], check=True, env={**os.environ, "PIP_FIND_LINKS": ""})
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "client-deps.pth").write_text(str(deps) + "\n")
    probe = f"""
import importlib.util, sys
import procbridge
from procbridge import AsyncClient, Client, ProblemError
assert procbridge.__file__.startswith({str(venv)!r}), procbridge.__file__
missing = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is None]
assert missing == list({HEAVY!r}), "importable here: " + str(sorted(set({HEAVY!r}) - set(missing)))
with Client({server.url!r}) as pb:
    assert pb.call("primes", limit=100) == 25
    try:
        pb.call("no_such_task")
    except procbridge.UnknownTask:
        pass
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {SERVER!r}))
"""
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"
