"""docs/models.md, run as a user runs it: train the model with the documented command, serve
`--tasks examples.digits.tasks --workers 2`, then send the guide's own curl body (read from the
guide), the sample bodies, a bad image, and run the guide's Python block against the real server.
And what step 3 promises of the preload: a missing model file is trained by it in the worker parent
before the first worker is ready (its output in the service's log), and without `DIGITS_MODEL` the
start fails with exit code 1 and the line the guide shows.

`DIGITS_TREES=30` keeps the training under a second; the digits the guide shows are still the answers
(held-out digits 0-3 are 7, 6, 3, 7 for every forest size tried), and the Python block must get at
least 90 % of the 360 held-out digits right (the 30-tree forest gets ~97 %, the guide's 98 %).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess, http, post_json, start_server, wait_for

GUIDE = ROOT / "docs" / "models.md"
ENV = {"DIGITS_TREES": "30"}


def guide() -> str:
    return GUIDE.read_text()


def python(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], input=stdin, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Step 2 of the guide: `python -m examples.digits.train digits.joblib`."""
    path = tmp_path_factory.mktemp("model") / "digits.joblib"
    done = python("-m", "examples.digits.train", str(path))
    assert done.returncode == 0, done.stderr
    assert re.match(r"trained 30 trees \([\d,]+ nodes\) in [\d.]+ s; accuracy on 360 held-out digits 0\.9\d\d; wrote ",
                    done.stderr), done.stderr
    return path


@pytest.fixture
def server(server_factory, model_file: Path) -> ServerProcess:
    """Step 3: `DIGITS_MODEL=digits.joblib ./scripts/serve --tasks examples.digits.tasks --workers 2`."""
    assert "./scripts/serve --tasks examples.digits.tasks --workers 2" in guide()
    return server_factory("--tasks", "examples.digits.tasks", "--workers", "2",
                          env={**ENV, "DIGITS_MODEL": str(model_file)})


def test_the_guides_calls_get_the_answers_it_shows(server: ServerProcess) -> None:
    text = guide()
    # The first curl call: its body and the digit of the output line under it, as written in the guide.
    call = re.search(r"-d '(\{\"pixels\": \[[\d, ]+\]\})'\n\s+(\{\"task\":\"classify_digit\".*)", text)
    assert call, "the guide's first classify_digit curl call and its output"
    body, shown = json.loads(call.group(1)), json.loads(call.group(2))
    assert len(body["pixels"]) == 64
    sample = python("-m", "examples.digits.sample", "0")
    assert json.loads(sample.stdout) == body, "the guide's body is held-out digit 0"
    reply = post_json(server.url + "/v1/tasks/classify_digit", body)
    assert reply.status == 200, reply.body
    assert reply.json()["task"] == "classify_digit"
    assert reply.json()["result"]["digit"] == shown["result"]["digit"] == 7
    assert 0.5 <= reply.json()["result"]["probability"] <= 1.0

    # `python -m examples.digits.sample 3 | curl ...` and `--batch 3 | curl .../classify_digits`
    one = python("-m", "examples.digits.sample", "3")
    assert one.stderr.strip() == "true digit: 7"
    reply = http("POST", server.url + "/v1/tasks/classify_digit", one.stdout.encode(),
                 {"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json()["result"]["digit"] == 7, reply.body
    batch = python("-m", "examples.digits.sample", "--batch", "3")
    assert batch.stderr.strip() == "true digits: 7 6 3"
    reply = http("POST", server.url + "/v1/tasks/classify_digits", batch.stdout.encode(),
                 {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert [r["digit"] for r in reply.json()["result"]] == [7, 6, 3]

    # A bad image never reaches a worker: 422, with the detail the guide shows.
    reply = post_json(server.url + "/v1/tasks/classify_digit", {"pixels": [0, 16, 16]})
    assert reply.status == 422
    assert reply.json()["detail"] in text
    assert post_json(server.url + "/v1/tasks/classify_digit", {"pixels": [17] + [0] * 63}).status == 422

    workers = http("GET", server.url + "/v1/workers").json()
    assert workers["size"] == 2 and len(workers["workers"]) == 2
    assert sum(w["tasks_done"] for w in workers["workers"]) == 3
    assert server.stop() == 0
    assert server.leftovers() == []


def test_the_guides_python_block_runs_against_the_server(server: ServerProcess, tmp_path: Path) -> None:
    after = guide().split("From Python, with the standard library only")[1]
    found = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert found, "the guide's Python block"
    block = found.group(1)
    assert 'URL = "http://127.0.0.1:8080/v1/tasks/classify_digits"' in block
    script = tmp_path / "classify.py"
    script.write_text(block.replace("http://127.0.0.1:8080", server.url))
    done = python(str(script))
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"(\d+) of 360 held-out digits right in \d+ ms\n", done.stdout)
    assert match, done.stdout
    assert int(match.group(1)) >= 324
    assert server.stop() == 0


def test_a_missing_model_file_is_trained_by_the_preload_before_a_worker_is_ready(server_factory, tmp_path) -> None:
    path = tmp_path / "new" / "digits.joblib"
    server = server_factory("--tasks", "examples.digits.tasks", "--workers", "2",
                            env={**ENV, "DIGITS_MODEL": str(path)})
    assert path.is_file(), "/readyz said ready before the preload had trained the model"
    log = server.log()
    assert re.search(rf"procbridge\.task: worker \d+ \(preload\) stderr: DIGITS_MODEL={re.escape(str(path))} does not "
                     r"exist: training the model into it", log), log
    assert re.search(r"\(preload\) stderr: trained 30 trees", log), log
    body = json.loads(python("-m", "examples.digits.sample").stdout)
    reply = post_json(server.url + "/v1/tasks/classify_digit", body)
    assert reply.status == 200 and reply.json()["result"]["digit"] == 7, reply.body
    assert server.stop() == 0


def test_without_DIGITS_MODEL_the_start_fails_with_the_line_the_guide_shows(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DIGITS_MODEL", raising=False)
    server = start_server(tmp_path, "--tasks", "examples.digits.tasks", wait_ready=False)
    try:
        assert server.proc.wait(60) == 1, server.log()
        wait_for(lambda: not server.leftovers(), 10, what="every process of the service to be gone")
        last = server.log().strip().splitlines()[-1]
        line = "cannot start: preload hook examples.digits.tasks.model raised RuntimeError: DIGITS_MODEL is not set"
        assert line in last, last
        assert line in guide()
    finally:
        server.kill_all()
