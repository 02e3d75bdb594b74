"""The README's own task module, run exactly as written: the `# mytasks.py` block under "Your own
tasks" is taken from README.md, written to a folder as mytasks.py, and served by the real server
(`--tasks mytasks` with that folder on PYTHONPATH, as the README says); then both tasks are called
as the README's curl lines call them: count_words with a JSON body, thumbnail with `?size=64` and an
image as the binary body."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from tests.conftest import ROOT, http, post_json, serving


def readme_block(marker: str) -> str:
    """The fenced python block of README.md whose first line is `marker`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    found = [block for block in blocks if block.startswith(marker + "\n")]
    assert len(found) == 1, f"README.md has {len(found)} python blocks starting with {marker!r}"
    return str(found[0])


def test_the_block_is_found_as_the_readme_shows_it():
    source = readme_block("# mytasks.py")
    assert "def count_words(" in source and "def make_thumbnail(" in source
    assert "size: Literal[64, 128, 256] = 128" in source
    compile(source, "mytasks.py", "exec")  # the block is the whole module, not an excerpt with "..."


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "mytasks.py").write_text(readme_block("# mytasks.py"), encoding="utf-8")
    with serving(folder, "--tasks", "mytasks", "--workers", "1", env={"PYTHONPATH": str(folder)}) as server:
        yield server


def photo(width: int, height: int) -> bytes:
    """A JPEG, as `--data-binary @photo.jpg` would send one."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(out, format="JPEG")
    return out.getvalue()


def test_count_words_as_the_readme_calls_it(readme_server):
    reply = post_json(readme_server.url + "/v1/tasks/count_words", {"text": "to be or not to be", "top": 2})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == {"to": 2, "be": 2}
    reply = post_json(readme_server.url + "/v1/tasks/count_words", {"text": "x", "top": 0})
    assert reply.status == 422 and reply.json()["errors"][0]["field"] == "top"


def test_thumbnail_with_size_from_the_query_string_and_an_image_body(readme_server):
    reply = http("POST", readme_server.url + "/v1/tasks/thumbnail?size=64", photo(300, 200),
                 {"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(reply.body))
    assert (thumb.format, thumb.size) == ("PNG", (64, 43))  # fits 64 × 64, aspect kept
    reply = http("POST", readme_server.url + "/v1/tasks/thumbnail", photo(300, 200),
                 {"Content-Type": "application/octet-stream"})
    assert reply.status == 200 and Image.open(io.BytesIO(reply.body)).size == (128, 85)  # the default size
    reply = http("POST", readme_server.url + "/v1/tasks/thumbnail?size=100", photo(10, 10),
                 {"Content-Type": "application/octet-stream"})
    assert reply.status == 422 and reply.json()["errors"][0]["field"] == "size"


def test_the_readme_tasks_are_listed_with_their_schemas(readme_server):
    thumbnail = http("GET", readme_server.url + "/v1/tasks/thumbnail").json()
    assert thumbnail["doc"].startswith("The image scaled to fit")
    assert thumbnail["params"]["properties"]["size"]["enum"] == [64, 128, 256]
    openapi = http("GET", readme_server.url + "/openapi.json").json()
    [size] = [p for p in openapi["paths"]["/v1/tasks/thumbnail"]["post"]["parameters"] if p["name"] == "size"]
    assert size["schema"]["type"] == "integer" and size["in"] == "query"



def test_the_heavy_state_block_serves_as_written_with_its_preload_run_once_in_the_worker_parent(tmp_path):
    """The `# heavytasks.py` block under "Heavy state": served as the README says, called as its curl
    line calls it; the preload ran in the worker parent, not in the HTTP process."""
    source = readme_block("# heavytasks.py")
    (tmp_path / "heavytasks.py").write_text(source, encoding="utf-8")
    with serving(tmp_path, "--tasks", "heavytasks", "--workers", "2", env={"PYTHONPATH": str(tmp_path)}) as server:
        reply = post_json(server.url + "/v1/tasks/nearest", {"row": 7})
        assert reply.status == 200, reply.body
        rows = reply.json()["result"]
        assert len(rows) == 3 and 7 not in rows and all(0 <= r < 50_000 for r in rows)
        listing = http("GET", server.url + "/v1/workers").json()
        assert listing["parent"]["private_bytes"] is not None
        for worker in listing["workers"]:  # the 49 MiB table is shared, not copied into each worker
            assert worker["rss_bytes"] > 45 * 2**20 > worker["private_bytes"], worker


def test_the_options_streams_and_batches_block_serves_as_written(tmp_path):
    """The `# moretasks.py` block: each task called as the README shows (the countdown with a bare
    POST, as its curl line does), and concurrent square roots answered each with its own value."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "moretasks.py").write_text(readme_block("# moretasks.py"), encoding="utf-8")
    with serving(tmp_path, "--tasks", "moretasks", "--workers", "2", env={"PYTHONPATH": str(tmp_path)}) as server:
        assert post_json(server.url + "/v1/tasks/report", {"name": "q3"}).json()["result"] == "report for q3"
        assert post_json(server.url + "/v1/tasks/echo_twice", {"text": "hi"}).json()["result"] == ["hi", "hi"]
        streamed = http("POST", server.url + "/v1/tasks/countdown")  # a bare POST, as the curl line
        assert streamed.status == 200 and streamed.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in streamed.body.splitlines()]
        assert lines == [{"item": {"left": 3}}, {"item": {"left": 2}}, {"item": {"left": 1}}, {"end": True, "items": 3}]
        values = [float(v) for v in range(40)]
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda v: post_json(server.url + "/v1/tasks/square_root", {"x": v}), values))
        assert [r.json()["result"] for r in replies] == pytest.approx([v ** 0.5 for v in values])
