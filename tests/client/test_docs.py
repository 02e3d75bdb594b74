"""The client's examples run as written: every fenced python block of docs/client.md, and the README's
`# client session` block, each in its own interpreter against a real server (PROCBRIDGE_URL points at
it; the README block's fixed URL is replaced by it). docs/client.md's `# counting.py` block is not
run but served: written to a folder and loaded with `--tasks counting`, as the page says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess, serving

DOC = ROOT / "docs" / "client.md"


def blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def client_blocks() -> list[str]:
    return [b for b in blocks(DOC) if not b.startswith("# counting.py\n")]


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("docs")
    [module] = [b for b in blocks(DOC) if b.startswith("# counting.py\n")]
    (folder / "counting.py").write_text(module, encoding="utf-8")
    with serving(folder, "--workers", "2", "--tasks", "counting", env={"PYTHONPATH": str(folder)}) as srv:
        yield srv


def run_example(source: str, server: ServerProcess, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env.update(PROCBRIDGE_URL=server.url, PYTHONPATH=str(ROOT))
    script = tmp_path / "example.py"
    script.write_text(source, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=90)
    assert done.returncode == 0, f"{source}\n---\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_page_has_its_examples() -> None:
    found = client_blocks()
    assert len(found) >= 7
    assert any("AsyncClient" in b for b in found) and any(".stream(" in b for b in found)


@pytest.mark.parametrize("index", range(len(client_blocks())))
def test_each_example_of_docs_client_md_runs(index: int, doc_server: ServerProcess, tmp_path: Path) -> None:
    run_example(client_blocks()[index], doc_server, tmp_path)


def test_the_readme_client_session_runs(doc_server: ServerProcess, tmp_path: Path) -> None:
    [session] = [b for b in blocks(ROOT / "README.md") if b.startswith("# client session\n")]
    assert 'Client("http://127.0.0.1:8080")' in session
    out = run_example(session.replace('"http://127.0.0.1:8080"', repr(doc_server.url)), doc_server, tmp_path)
    assert "422 [{'field': 'limit'" in out
    assert "progress {" in out and "result {" in out
    assert "[4, InvalidArguments(" in out and "168]" in out
