"""docs/models.md's example, examples/digits/, in this process (no server): the preload trains the
model into the path `DIGITS_MODEL` names when the file is missing, then loads it; the tasks classify
held-out digits right; bad input is refused with a ValueError that names the problem.

A small forest keeps it fast: `DIGITS_TREES` (read by examples/digits/train.py) is set to 30, which
trains in well under a second and still gets ~97% of the held-out digits right. The full model
(300 trees) is what docs/models.md serves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from examples.digits import tasks
from examples.digits.train import held_out  # scikit-learn: requirements-dev.lock carries it
from tests.conftest import ROOT
from workers import hooks

TREES = 30


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The preload run as the worker parent would run it, with DIGITS_MODEL naming a file that does
    not exist yet: it trains the model into it, then loads it."""
    path = tmp_path_factory.mktemp("digits") / "models" / "digits.joblib"
    assert not tasks.model.built, "the example's model was already loaded in this process"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tasks.MODEL_ENV, str(path))
        mp.setenv("DIGITS_TREES", str(TREES))
        assert hooks.run_preloads(["examples.digits.tasks"]) == 1
    assert tasks.model.built
    return path


@pytest.fixture(scope="module")
def digits() -> tuple[list[list[float]], list[int]]:
    images, labels = held_out()
    return images[:50].tolist(), labels[:50].tolist()


def test_the_preload_trains_a_missing_model_file_then_loads_it(model_file: Path) -> None:
    assert model_file.is_file()
    assert [p.name for p in model_file.parent.iterdir()] == ["digits.joblib"]  # no temporary file left
    forest = tasks.model()
    assert len(forest.estimators_) == TREES
    assert forest.n_features_in_ == 64
    assert tasks.model() is forest  # built once, then returned


def test_classify_digit_gets_most_held_out_digits_right(model_file: Path, digits: Any) -> None:
    images, labels = digits
    answers = [tasks.classify_digit(image) for image in images]
    right = sum(a["digit"] == label for a, label in zip(answers, labels, strict=True))
    assert right >= 45, f"{right} of {len(labels)} right"
    for answer in answers:
        assert set(answer) == {"digit", "probability"}
        assert isinstance(answer["digit"], int) and 0 <= answer["digit"] <= 9
        assert 0.1 <= answer["probability"] <= 1.0
    json.dumps(answers)  # what the service sends back


def test_classify_digits_answers_each_image_as_classify_digit_does(model_file: Path, digits: Any) -> None:
    images, _ = digits
    assert tasks.classify_digits(images[:10]) == [tasks.classify_digit(image) for image in images[:10]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tasks.classify_digit([1.0] * 63), "pixels: expected 64 values (an 8×8 image, row by row), got 63"),
        (lambda: tasks.classify_digit([0.0] * 65), "pixels: expected 64 values (an 8×8 image, row by row), got 65"),
        (lambda: tasks.classify_digit([0.0] * 10 + [17.0] + [0.0] * 53), "pixels[10]: 17.0 is outside 0..16"),
        (lambda: tasks.classify_digit([-1] + [0] * 63), "pixels[0]: -1 is outside 0..16"),
        (lambda: tasks.classify_digit([float("nan")] * 64), "pixels[0]: nan is outside 0..16"),
        (lambda: tasks.classify_digit(["1"] * 64), "pixels[0]: expected a number, got str"),
        (lambda: tasks.classify_digit("0" * 64), "pixels: expected a list of 64 numbers, got str"),
        (lambda: tasks.classify_digits([]), "images: expected at least one image"),
        (lambda: tasks.classify_digits([[0.0] * 64, [0.0] * 8]), "images[1]: expected 64 values"),
    ],
    ids=["63-values", "65-values", "above-16", "negative", "nan", "a-string-pixel", "a-string", "no-images",
         "a-short-image-in-a-batch"],
)
def test_bad_input_raises_a_value_error_naming_the_problem(model_file: Path, call: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call()


def test_the_preload_without_DIGITS_MODEL_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tasks.MODEL_ENV, raising=False)
    with pytest.raises(RuntimeError, match="DIGITS_MODEL is not set: set it to the model file's path"):
        tasks.model.fn()  # the undecorated function: the built model of this process is left alone


def test_the_preload_refuses_another_kind_of_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import joblib

    joblib.dump({"not": "a model"}, tmp_path / "other.joblib")
    monkeypatch.setenv(tasks.MODEL_ENV, str(tmp_path / "other.joblib"))
    with pytest.raises(TypeError, match="not a classifier of 64-pixel images"):
        tasks.model.fn()


def test_the_worker_start_hook_caps_every_thread_pool_at_one(model_file: Path) -> None:
    """In a fresh interpreter (the cap is process-wide): the hook loads the model when no preload ran
    there, then every BLAS and OpenMP pool it loaded runs one thread."""
    script = (
        "import json\n"
        "from threadpoolctl import threadpool_info\n"
        "from examples.digits import tasks\n"
        "from workers import hooks\n"
        "assert hooks.run_worker_start(['examples.digits.tasks']) == 1\n"
        "assert tasks.model.built\n"
        "print(json.dumps([(i['internal_api'], i['num_threads']) for i in threadpool_info()]))\n"
    )
    env = {**os.environ, tasks.MODEL_ENV: str(model_file), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pools = json.loads(out.stdout)
    assert {api for api, _ in pools} >= {"openblas", "openmp"}, pools
    assert all(threads == 1 for _, threads in pools), pools
