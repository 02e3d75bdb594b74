"""Digit recognition served by procbridge: one model loaded once, shared by every worker.

    python -m examples.digits.train digits.joblib              # ~80 MiB random forest, a few seconds
    DIGITS_MODEL=digits.joblib ./scripts/serve --tasks examples.digits.tasks --workers 2

- `model` (`@preload`) loads the model from the file named by the `DIGITS_MODEL` environment
  variable, once, in the process the workers are forked from; the workers share its memory
  copy-on-write. When the file does not exist it is trained there and then, in a child process
  (`python -m examples.digits.train PATH`, honouring `DIGITS_TREES`), and written to that path, so
  the first start takes a few seconds more and later ones just load it. `DIGITS_MODEL` unset is a
  start failure that says so.
- `one_thread_per_worker` (`@on_worker_start`) caps the BLAS and OpenMP thread pools of each worker
  at one thread: the pool already runs one worker per core, so a library that also spreads every
  call over all cores would put workers × cores threads on the cores. (It also makes sure the model
  is loaded before the first call where no preload ran: a Dask worker.)
- Tasks: `classify_digit(pixels)` for one 8×8 image, `classify_digits(images)` for several in one
  call. Pixels are load_digits' format: 64 values 0-16 (0 blank, 16 full ink), row by row.

Called directly (a test, a notebook), the tasks work too: the first call of `model()` loads it in
that process. The walk-through, with what runs where and what copy-on-write shares: docs/models.md.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from annotated_types import Interval, Len

from examples.digits import MAX_VALUE, PIXELS
from workers import on_worker_start, preload, task

if TYPE_CHECKING:
    import numpy as np

# Only light imports above: the HTTP process imports this module too, for the tasks' argument
# schemas, and never runs a hook or a task. numpy, joblib, scikit-learn (through the model) and
# threadpoolctl are imported where they are used: in the worker parent and the workers.

MODEL_ENV = "DIGITS_MODEL"
MAX_IMAGES = 1000  # per classify_digits call
# The folder that holds the `examples` package: the training child imports it from there.
_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)

# What the service validates before a call reaches a worker (422 otherwise); _as_images checks the
# same for direct calls, which skip the service.
Pixel = Annotated[float, Interval(ge=0, le=MAX_VALUE)]
Image = Annotated[list[Pixel], Len(PIXELS, PIXELS)]


def model_path() -> Path:
    """The model file: `DIGITS_MODEL`; RuntimeError when it is unset."""
    raw = os.environ.get(MODEL_ENV, "").strip()
    if not raw:
        raise RuntimeError(f"{MODEL_ENV} is not set: set it to the model file's path "
                           "(python -m examples.digits.train PATH writes one; a missing file is trained at start-up)")
    return Path(raw).expanduser()


def train_into(path: Path) -> None:
    """Train the model into `path` in a child process: the training's threads and its peak memory
    stay out of the process that workers are forked from."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    log.warning("%s=%s does not exist: training the model into it (python -m examples.digits.train)", MODEL_ENV, path)
    subprocess.run([sys.executable, "-m", "examples.digits.train", str(path)], env=env, check=True)


@preload
def model() -> Any:
    """The random forest, loaded once (trained first if its file is missing), checked with one
    prediction so that a broken file fails the start instead of the first call.

    The check runs with every BLAS/OpenMP pool capped at one thread: workers are forked from this
    process, and GNU OpenMP (bundled with scikit-learn) is not fork-safe once a parallel region has
    run in the parent. A forest's prediction with n_jobs=None starts no thread anyway; the cap keeps
    that true for a model that would (a HistGradientBoostingClassifier predicts with OpenMP).
    """
    import joblib
    import numpy as np
    from threadpoolctl import threadpool_limits

    path = model_path()
    if not path.exists():
        train_into(path)
    started = time.perf_counter()
    forest = joblib.load(path)
    if getattr(forest, "n_features_in_", None) != PIXELS or not hasattr(forest, "predict_proba"):
        raise TypeError(f"{path}: not a classifier of {PIXELS}-pixel images (made by examples.digits.train?)")
    forest.n_jobs = None  # predict in the calling thread: one task, one core
    with threadpool_limits(limits=1):
        forest.predict_proba(np.zeros((1, PIXELS)))
    log.info("loaded %s (%d trees) in %.2f s", path, len(forest.estimators_), time.perf_counter() - started)
    return forest


@on_worker_start
def one_thread_per_worker() -> None:
    """One BLAS/OpenMP thread per worker: the pool is the parallelism.

    numpy and scipy each bundle an OpenBLAS and scikit-learn an OpenMP runtime, and each would run a
    thread per core in every worker. threadpoolctl caps the libraries loaded at the time of the call,
    so the model comes first: in a worker forked from the worker parent it is already there (this
    returns at once); where no preload ran (a Dask worker) it is loaded now, before the first call.
    """
    from threadpoolctl import threadpool_limits

    model()
    threadpool_limits(limits=1)


def _as_images(images: Sequence[Sequence[float]], name: str) -> np.ndarray:
    """The images as an n × 64 float array; ValueError naming the first bad image or value."""
    import numpy as np

    rows = []
    for i, image in enumerate(images):
        where = f"{name}[{i}]" if name == "images" else name
        if isinstance(image, (str, bytes)) or not isinstance(image, Sequence):
            raise ValueError(f"{where}: expected a list of {PIXELS} numbers, got {type(image).__name__}")
        if len(image) != PIXELS:
            raise ValueError(f"{where}: expected {PIXELS} values (an 8×8 image, row by row), got {len(image)}")
        for j, value in enumerate(image):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}[{j}]: expected a number, got {type(value).__name__}")
            if not (math.isfinite(value) and 0 <= value <= MAX_VALUE):
                raise ValueError(f"{where}[{j}]: {value!r} is outside 0..{MAX_VALUE} (load_digits' scale)")
        rows.append(image)
    if not rows:
        raise ValueError(f"{name}: expected at least one image")
    return np.asarray(rows, dtype=np.float64)


def _answers(probabilities: np.ndarray, classes: np.ndarray) -> list[dict[str, Any]]:
    best = probabilities.argmax(axis=1)
    return [{"digit": int(classes[k]), "probability": round(float(row[k]), 4)}
            for row, k in zip(probabilities, best, strict=True)]


@task
def classify_digit(pixels: Image) -> dict[str, Any]:
    """The digit in one 8×8 image: 64 pixel values 0-16 (load_digits' scale), row by row. Returns
    {"digit": 0-9, "probability": the forest's, the mean of its trees' votes}."""
    forest = model()
    return _answers(forest.predict_proba(_as_images([pixels], "pixels")), forest.classes_)[0]


@task
def classify_digits(images: Annotated[list[Image], Len(1, MAX_IMAGES)]) -> list[dict[str, Any]]:
    """classify_digit for 1 to 1000 images in one call (one pass of the forest: far cheaper per image)."""
    forest = model()
    return _answers(forest.predict_proba(_as_images(images, "images")), forest.classes_)
