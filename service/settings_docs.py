"""The settings table (service/settings.py) as text: --help lines, and the markdown tables in the docs.

The docs hold generated tables between markers, so they cannot drift from the flags:

    <!-- settings-table -->                    every setting (README.md)
    <!-- settings-table: api_keys rate_limit -->  the named ones, in that order (docs/api.md)
    | flag | env | default | meaning |
    ...
    <!-- /settings-table -->

`python -m service.settings_docs --write` regenerates every such block in README.md and docs/*.md;
`--check` says which differ (tests/service/test_settings_docs.py does the same); `--markdown [NAME ...]`
prints a table.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.settings import BY_NAME, SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("flag", "env", "default", "meaning")
_BLOCK = re.compile(r"(<!-- settings-table(?::(?P<names>[^>]*))? -->\n)(?P<table>.*?)(<!-- /settings-table -->)",
                    re.DOTALL)
_LINK = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")


# -- plain text, for --help ---------------------------------------------------------------------------


def plain(markdown: str) -> str:
    """`code` -> code, [text](link) -> text: what a terminal should show of a markdown help text."""
    return _LINK.sub(r"\1", markdown).replace("`", "")


def plain_help(setting: Setting) -> str:
    """One option's --help text: its help, its default in brackets, its variable."""
    default = f" [{plain(setting.default_text)}]" if setting.default_text else ""
    return f"{plain(setting.help)}{default} (${setting.env})"


# -- markdown ----------------------------------------------------------------------------------------


def rebase_links(markdown: str, doc_dir: str) -> str:
    """Links in the table are written from the repository root (docs/dask.md); a table in docs/ needs
    them relative to its own folder (dask.md), and a link that shows its path shows the new one."""

    def rebase(m: re.Match[str]) -> str:
        text, target = m.group(1), m.group(2)
        if "://" in target or target.startswith(("#", "/")):
            return m.group(0)
        rebased = posixpath.relpath(target, doc_dir or ".")
        return f"[{rebased if text == target else text}]({rebased})"

    return _LINK.sub(rebase, markdown)


def default_cell(setting: Setting) -> str:
    """The default as the docs show it: a constant as code (`-`, `8080`), a description as text."""
    if setting.is_constant and setting.default_text:
        return f"`{setting.default_text}`"
    return setting.default_text


def row_cells(setting: Setting, doc_dir: str = ".") -> tuple[str, str, str, str]:
    """flag, env, default, meaning as a table shows them (before `|` is escaped)."""
    return (f"`{setting.flag}`", f"`{setting.env}`", rebase_links(default_cell(setting), doc_dir),
            rebase_links(setting.help, doc_dir))


def markdown_table(settings: Iterable[Setting] = SETTINGS, doc_dir: str = ".") -> str:
    """The settings as a GitHub markdown table, one row each, ending with a newline."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for s in settings:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row_cells(s, doc_dir)) + " |")
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> list[tuple[str, ...]]:
    """The rows of a markdown table (header and separator included), cells stripped, `\\|` read as `|`."""
    rows = []
    for line in text.strip().splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            raise ValueError(f"not a table row: {line!r}")
        cells = re.split(r"(?<!\\)\|", line[1:-1])
        rows.append(tuple(cell.strip().replace("\\|", "|") for cell in cells))
    return rows


# -- the docs' blocks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One marked table in a document: the settings it should list and the table it has."""

    path: str  # relative to the repository root
    names: tuple[str, ...]
    table: str

    @property
    def settings(self) -> list[Setting]:
        return [BY_NAME[name] for name in self.names]


def blocks(text: str, path: str) -> list[Block]:
    """The marked tables of a document; a marker naming an unknown setting is an error."""
    found = []
    for m in _BLOCK.finditer(text):
        names = tuple((m.group("names") or "").split()) or tuple(BY_NAME)
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"{path}: the settings-table marker names unknown settings {unknown}")
        found.append(Block(path, names, m.group("table")))
    return found


def differences(block: Block) -> list[str]:
    """What differs between a block's table and the settings table: a flag missing, extra or out of
    order, or a row whose env, default or meaning is not the table's. Empty when they agree."""
    where = block.path
    try:
        rows = parse_table(block.table)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    if not rows or rows[0] != HEADER:
        return [f"{where}: the header must be | {' | '.join(HEADER)} |, not {rows[0] if rows else 'missing'}"]
    problems: list[str] = []
    by_flag = {row[0].strip("`"): row for row in rows[2:]}
    expected = [s.flag for s in block.settings]
    listed = list(by_flag)
    problems += [f"{where}: {flag} is missing" for flag in expected if flag not in by_flag]
    problems += [f"{where}: {flag} is not a setting" for flag in listed if flag not in expected]
    if len(rows) - 2 != len(by_flag):
        problems.append(f"{where}: a flag is listed twice")
    elif not problems and listed != expected:
        problems.append(f"{where}: the flags are not in the table's order {expected}")
    doc_dir = posixpath.dirname(block.path)
    for s in block.settings:
        row = by_flag.get(s.flag)
        if row is None:
            continue
        if len(row) != len(HEADER):
            problems.append(f"{where}: {s.flag}: {len(row)} cells, not {len(HEADER)}")
            continue
        for column, want, got in zip(HEADER[1:], row_cells(s, doc_dir)[1:], row[1:], strict=True):
            if got != want:
                problems.append(f"{where}: {s.flag}: {column} is {got!r}, the settings table says {want!r}")
    return problems


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def check(root: Path = ROOT) -> list[str]:
    """Every difference between the docs' marked tables and the settings table."""
    problems = []
    for doc in documents(root):
        path = doc.relative_to(root).as_posix()
        for block in blocks(doc.read_text(encoding="utf-8"), path):
            problems += differences(block)
    return problems


def regenerate(text: str, path: str) -> str:
    """The document with every marked table rewritten from the settings table."""
    doc_dir = posixpath.dirname(path)

    def fill(m: re.Match[str]) -> str:
        names = tuple((m.group("names") or "").split()) or tuple(BY_NAME)
        table = markdown_table([BY_NAME[n] for n in names], doc_dir)
        return m.group(1) + table + m.group(4)

    blocks(text, path)  # unknown names are refused before anything is written
    return _BLOCK.sub(fill, text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.settings_docs", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", nargs="*", metavar="NAME", help="print the table (all settings, or NAMEs)")
    mode.add_argument("--write", action="store_true", help="regenerate the tables in README.md and docs/*.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if a table in the docs differs")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table([BY_NAME[n] for n in args.markdown] if args.markdown else SETTINGS), end="")
        return 0
    if args.write:
        for doc in documents():
            path = doc.relative_to(ROOT).as_posix()
            text = doc.read_text(encoding="utf-8")
            new = regenerate(text, path)
            if new != text:
                doc.write_text(new, encoding="utf-8")
                print(f"rewrote the settings table in {path}")
        return 0
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("regenerate with: python -m service.settings_docs --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
