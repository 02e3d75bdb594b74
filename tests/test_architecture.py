"""The package structure holds: no import circle anywhere in service/, workers/, bench/ and procbridge/,
the process side (workers/) never imports the HTTP side (service/), and the client (procbridge/)
imports only the standard library, httpx and itself, so `pip install procbridge` needs nothing else.

Imports are read from the source with `ast` (nothing is imported): every `import` and `from ...
import` statement, at module level, inside functions, and under `if TYPE_CHECKING:` alike, since a
circle is a design problem even when Python tolerates it at run time. `from pkg import name` counts
as an edge to `pkg.name` when that is a module, else to `pkg`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "workers", "bench", "procbridge")
# The one way from the client into the server: `procbridge serve|loadtest` hands over to service.cli,
# imported only then (procbridge/cli.py; without the server extra it says what to install).
CLIENT_TO_SERVER = {("procbridge.cli", m) for m in ("service.cli", "service.config", "service.server")}
MAX_LINES = 500  # a module a newcomer reads in one sitting (issue 15: "no module ... over ~500 lines")


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def external_imports(name: str, path: Path) -> set[str]:
    """The top-level names of everything module `name` imports that is not relative."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_the_client_imports_only_the_standard_library_httpx_and_itself() -> None:
    wrong = {}
    for name, path in modules().items():
        if name.split(".")[0] != "procbridge":
            continue
        bad = sorted(
            target for target in external_imports(name, path)
            if target.split(".")[0] not in (*sys.stdlib_module_names, "httpx", "procbridge", "__future__")
            and (name, target) not in CLIENT_TO_SERVER
        )
        if bad:
            wrong[name] = bad
    assert wrong == {}


def test_no_module_of_service_workers_or_bench_is_part_of_an_import_circle() -> None:
    assert circles(import_graph()) == []


def test_the_process_side_never_imports_the_http_side() -> None:
    graph = import_graph()
    wrong = {m: sorted(t for t in targets if t.split(".")[0] == "service")
             for m, targets in graph.items() if m.split(".")[0] == "workers"}
    assert {m: t for m, t in wrong.items() if t} == {}


@pytest.mark.parametrize("package", ["service", "workers", "procbridge"])
def test_no_module_is_longer_than_one_sitting(package: str) -> None:
    long = {str(p.relative_to(ROOT)): n for name, p in modules().items()
            if name.split(".")[0] == package and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_circle_finder_finds_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    """The check itself: two modules that import each other, one of them only inside a function."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "service" / "a.py").write_text("from service.b import thing\n")
    (tmp_path / "service" / "b.py").write_text("def thing():\n    from service import a\n    return a\n")
    (tmp_path / "workers" / "c.py").write_text("from service.a import thing\n")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["service.a", "service.b"]]
    assert graph["workers.c"] == {"service.a"}
