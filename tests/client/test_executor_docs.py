"""docs/client-executor.md as written: every fenced python block runs in its own interpreter, every sh
block in bash (`set -e`, the venv's `procbridge` script first on PATH), against a real server that
PROCBRIDGE_URL points at; and the page's exit-code table is the command's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procbridge.cli import EXIT_CODES
from tests.conftest import ROOT, ServerProcess, serving

DOC = ROOT / "docs" / "client-executor.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("executor-docs"), "--workers", "2",
                 "--tasks", "tests.support.executor_tasks") as srv:
        yield srv


def example_env(server: ServerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env.update(PROCBRIDGE_URL=server.url, PYTHONPATH=str(ROOT),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def test_the_page_has_its_examples() -> None:
    assert len(blocks("python")) >= 2 and len(blocks("sh")) >= 1
    assert "# with ProcessPoolExecutor() as pool:" in blocks("python")[0]


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_python_example_runs_as_written(index: int, doc_server: ServerProcess, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(blocks("python")[index], encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env=example_env(doc_server), timeout=90)
    assert done.returncode == 0, done.stderr
    if index == 0:
        assert done.stdout.splitlines() == ["42", "[0, 1, 4, 9, 16]", "[0, 10, 20, 30, 40]"]


@pytest.mark.parametrize("index", range(len(blocks("sh"))))
def test_each_shell_example_runs_as_written(index: int, doc_server: ServerProcess, tmp_path: Path) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks("sh")[index]], capture_output=True, text=True,
                          cwd=tmp_path, env=example_env(doc_server), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    if index == 0:
        digest = '"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"'  # sha256 of "hello"
        assert done.stdout.splitlines() == ["42", "168", digest, "exit 1"]
        assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")
        assert '"event": "result"' in (tmp_path / "events.ndjson").read_text().splitlines()[-1]


def test_the_exit_code_table_on_the_page_is_the_commands() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.MULTILINE))
    assert sorted(int(code) for code in rows) == sorted(EXIT_CODES)
