"""Every promise the docs make has a test that proves it, and the list says which.

A promise in docs/*.md or README.md is tagged where it is written with `<!-- promise: ID -->` (an HTML
comment: invisible when the page is read). docs/promises.md holds one row per ID: `| ID | what is
promised | tests/…py::test_name |`. This test reads both and fails when a tagged promise has no row,
a row names no tagged promise, an ID is repeated, or a row's test does not exist (its file and a
function of that name, found with `ast`, nothing imported). So a promise written with its tag and
without a test fails CI; a test renamed or deleted under a promise fails CI.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "docs" / "promises.md"
TAG = re.compile(r"<!-- promise: ([a-z0-9][a-z0-9-]*) -->")
ROW = re.compile(r"^\| `([a-z0-9][a-z0-9-]*)` \| (.+?) \| (.+) \|$")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def tagged(root: Path = ROOT) -> dict[str, list[str]]:
    """Promise ID -> the pages that tag it."""
    found: dict[str, list[str]] = {}
    for page in [*sorted((root / "docs").glob("*.md")), root / "README.md"]:
        if page.name == "promises.md" or not page.exists():
            continue
        for promise in TAG.findall(page.read_text()):
            found.setdefault(promise, []).append(page.name)
    return found


def registry(path: Path = REGISTRY) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(ID, what, [(test file, test name), ...]) of each row of the table."""
    rows = []
    for line in path.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows.append((match.group(1), match.group(2), TEST_REF.findall(match.group(3))))
    return rows


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def problems(root: Path = ROOT) -> list[str]:
    """Everything wrong between the tags, the registry and the tests (empty: all is well)."""
    tags = tagged(root)
    rows = registry(root / "docs" / "promises.md")
    out = []
    ids = [row[0] for row in rows]
    out += [f"{i}: listed twice in docs/promises.md" for i in sorted({i for i in ids if ids.count(i) > 1})]
    out += [f"{i}: tagged in {', '.join(pages)} but not in docs/promises.md" for i, pages in tags.items()
            if i not in ids]
    out += [f"{i}: in docs/promises.md but tagged in no page" for i in ids if i not in tags]
    for promise, pages in tags.items():
        if len(pages) > 1:
            out.append(f"{promise}: tagged in more than one place ({', '.join(pages)})")
    for promise, _, tests in rows:
        if not tests:
            out.append(f"{promise}: no test named (`tests/…py::test_name`)")
        for file, name in tests:
            path = root / file
            if not path.exists():
                out.append(f"{promise}: {file} does not exist")
            elif name not in functions_in(path) or not name.startswith("test_"):
                out.append(f"{promise}: {file} has no test {name}")
    return out


def test_every_tagged_promise_has_an_existing_test_and_every_listed_one_is_tagged() -> None:
    assert problems() == []
    assert len(registry()) >= 20  # the list is the real one, not an empty table


@pytest.mark.parametrize(
    ("page", "table", "expected"),
    [
        ("x <!-- promise: new-one -->", "", "new-one: tagged in a.md but not in docs/promises.md"),
        ("", "| `gone` | a promise | `tests/t.py::test_it` |", "gone: in docs/promises.md but tagged in no page"),
        ("<!-- promise: p -->", "| `p` | a promise | `tests/t.py::test_renamed` |",
         "p: tests/t.py has no test test_renamed"),
        ("<!-- promise: p -->", "| `p` | a promise | `tests/nope.py::test_it` |", "p: tests/nope.py does not exist"),
        ("<!-- promise: p -->", "| `p` | a promise | nothing yet |", "p: no test named (`tests/…py::test_name`)"),
        ("<!-- promise: p -->", "| `p` | a | `tests/t.py::test_it` |\n| `p` | b | `tests/t.py::test_it` |",
         "p: listed twice in docs/promises.md"),
    ],
)
def test_the_check_fails_a_promise_without_a_test(tmp_path: Path, page: str, table: str, expected: str) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def test_it():\n    pass\n")
    (tmp_path / "docs" / "a.md").write_text(page)
    (tmp_path / "docs" / "promises.md").write_text("| ID | promise | test |\n|---|---|---|\n" + table + "\n")
    assert expected in problems(tmp_path)
