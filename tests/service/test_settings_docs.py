"""The settings tables in the docs (README.md, docs/api.md) against the settings table: a flag, a
variable, a default or a meaning that differs, a row missing, extra or out of order, fails — and the
check is shown to fail on doctored tables, so a green run means something."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import settings_docs
from service.settings import BY_NAME, SETTINGS
from service.settings_docs import Block, blocks, check, differences, markdown_table, parse_table, regenerate

ROOT = Path(__file__).resolve().parents[2]


def readme_block() -> Block:
    (block,) = blocks((ROOT / "README.md").read_text(encoding="utf-8"), "README.md")
    return block


def doctored(old: str, new: str) -> Block:
    block = readme_block()
    assert old in block.table, old
    return Block(block.path, block.names, block.table.replace(old, new, 1))


def test_the_docs_tables_are_the_settings_table():
    problems = check(ROOT)
    assert not problems, "\n".join([*problems, "regenerate with: python -m service.settings_docs --write"])


def test_readme_lists_every_setting_and_api_md_the_pool_webhook_cors_and_security_ones():
    assert readme_block().names == tuple(BY_NAME)
    rows = parse_table(readme_block().table)
    assert [row[0] for row in rows[2:]] == [f"`{s.flag}`" for s in SETTINGS]
    api = blocks((ROOT / "docs" / "api.md").read_text(encoding="utf-8"), "docs/api.md")
    assert [block.names for block in api] == [
        ("workers", "worker_idle"), ("webhook_allow", "webhook_secret", "webhook_timeout"), ("cors_origins",),
        ("api_keys", "rate_limit", "access_log"),
    ]


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("| `64 MiB` |", "| `32 MiB` |", "--max-body: default is '`32 MiB`'"),
        ("`PROCBRIDGE_JOB_LEASE`", "`PROCBRIDGE_LEASE`", "--job-lease: env is '`PROCBRIDGE_LEASE`'"),
        ("| `--job-lease` |", "| `--lease` |", "--job-lease is missing"),
        ("| 4 × workers |", "| 8 × workers |", "--max-pending: default is '8 × workers'"),
        ("TCP port", "the port", "--port: meaning is 'the port'"),
        ("| flag | env | default | meaning |", "| flag | env | meaning |", "the header must be"),
    ],
)
def test_a_doctored_table_fails(old: str, new: str, complaint: str):
    problems = differences(doctored(old, new))
    assert any(complaint in p for p in problems), problems


def test_a_missing_an_extra_a_repeated_and_a_moved_row_fail():
    block = readme_block()
    lines = block.table.splitlines(keepends=True)
    lease = next(line for line in lines if "`--job-lease`" in line)
    without = block.table.replace(lease, "")
    assert "README.md: --job-lease is missing" in differences(Block(block.path, block.names, without))
    extra = block.table + "| `--turbo` | `PROCBRIDGE_TURBO` | `off` | go faster |\n"
    assert "README.md: --turbo is not a setting" in differences(Block(block.path, block.names, extra))
    twice = block.table + lease
    assert "README.md: a flag is listed twice" in differences(Block(block.path, block.names, twice))
    moved = lines[:2] + lines[3:4] + lines[2:3] + lines[4:]  # --port before --host
    assert any("not in the table's order" in p for p in differences(Block(block.path, block.names, "".join(moved))))


def test_a_cell_with_an_escaped_bar_reads_as_one_cell():
    row = parse_table("| a | b |\n|---|---|\n| `x\\|y` | z |")[2]
    assert row == ("`x|y`", "z")


def test_check_reads_the_files_and_regenerate_repairs_them(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    (tmp_path / "README.md").write_text(readme.replace("| `8080` |", "| `8000` |"), encoding="utf-8")
    (tmp_path / "docs" / "api.md").write_text(api.replace("`PROCBRIDGE_RATE_LIMIT`", "`RATE`"), encoding="utf-8")
    problems = check(tmp_path)
    assert len(problems) == 2
    assert problems[0].startswith("README.md: --port: default") and problems[1].startswith("docs/api.md: --rate")
    assert regenerate((tmp_path / "README.md").read_text(encoding="utf-8"), "README.md") == readme
    assert regenerate((tmp_path / "docs" / "api.md").read_text(encoding="utf-8"), "docs/api.md") == api


def test_links_are_rebased_for_a_table_in_docs():
    assert "([docs/security.md](docs/security.md))" in markdown_table([BY_NAME["api_keys"]])
    assert "([security.md](security.md))" in markdown_table([BY_NAME["api_keys"]], "docs")


def test_a_marker_naming_an_unknown_setting_is_refused():
    text = "<!-- settings-table: port turbo -->\n<!-- /settings-table -->\n"
    with pytest.raises(ValueError, match="unknown settings"):
        blocks(text, "x.md")


def test_the_command_prints_a_table(capsys: pytest.CaptureFixture[str]):
    assert settings_docs.main(["--markdown", "port", "debug"]) == 0
    out = capsys.readouterr().out
    assert out == markdown_table([BY_NAME["port"], BY_NAME["debug"]])
    assert settings_docs.main(["--check"]) == 0
