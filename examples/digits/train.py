"""Train the example model and save it with joblib.

    python -m examples.digits.train PATH [--trees N] [--seed S]

A random forest on scikit-learn's bundled digits (`load_digits`: 1,797 images of 8×8 pixels, values
0-16, no download). Every training image is also shifted by one pixel in each of the four directions
(five times the data, a classic augmentation), so the forest tolerates off-centre digits; its trees
grow deep on that data, which is what makes the model heavy: with the default 300 trees it is
590,500 nodes, an 81 MiB file and 84 MiB in memory once loaded (docs/models.md, "Measured").
A fifth of the images (a fixed, stratified split) is held out and never trained on: the accuracy
printed is on those, and `examples.digits.sample` and the tests take their digits from them.

`--trees` defaults to the `DIGITS_TREES` environment variable, else 300; the tests set a small
number to train in a fraction of a second. The file is written next to PATH and renamed onto it, so
a reader never sees half a model, and two trainings racing for the same PATH both leave a whole one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from examples.digits import PIXELS, SIDE

DEFAULT_TREES = 300
TREES_ENV = "DIGITS_TREES"


def trees_from_env() -> int:
    """`DIGITS_TREES` when set (a positive integer), else DEFAULT_TREES."""
    raw = os.environ.get(TREES_ENV, "").strip()
    if not raw:
        return DEFAULT_TREES
    try:
        trees = int(raw)
    except ValueError:
        raise ValueError(f"{TREES_ENV}={raw!r}: expected a positive integer") from None
    if trees < 1:
        raise ValueError(f"{TREES_ENV}={raw!r}: expected a positive integer")
    return trees


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): the same split every time."""
    images, labels = load_digits(return_X_y=True)
    parts: list[np.ndarray] = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    train_x, test_x, train_y, test_y = parts
    return train_x, train_y, test_x, test_y


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The images (n × 64 floats) and labels the model never saw."""
    _, _, test_x, test_y = split()
    return test_x, test_y


def shifted(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images, plus each one moved one pixel right, left, down and up (the edge that comes in is
    blank): five times the data."""
    grid = images.reshape(-1, SIDE, SIDE)
    out = [grid]
    for axis, step in ((2, 1), (2, -1), (1, 1), (1, -1)):
        moved = np.roll(grid, step, axis=axis)
        edge = 0 if step == 1 else -1
        if axis == 1:
            moved[:, edge, :] = 0
        else:
            moved[:, :, edge] = 0
        out.append(moved)
    return np.concatenate(out).reshape(-1, PIXELS), np.tile(labels, len(out))


def train(trees: int, seed: int = 0) -> RandomForestClassifier:
    """Fit the forest on the augmented training split, with every core; the model it returns predicts
    in the calling thread only (n_jobs=None), which is what a worker process wants."""
    train_x, train_y, _, _ = split()
    x, y = shifted(train_x, train_y)
    model = RandomForestClassifier(n_estimators=trees, n_jobs=-1, random_state=seed)
    model.fit(x, y)
    model.n_jobs = None  # one request, one core: the pool runs one task per worker process
    return model


def save(model: Any, path: Path) -> None:
    """joblib.dump into a temporary file beside `path`, then rename it onto `path` (atomic). The file
    is created as any other (the umask decides its mode), so the service's user can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        joblib.dump(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="where to write the model (joblib)")
    parser.add_argument("--trees", type=int, default=None,
                        help=f"trees in the forest [${TREES_ENV}, else {DEFAULT_TREES}]")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the forest [0]")
    args = parser.parse_args(argv)
    trees = args.trees if args.trees is not None else trees_from_env()
    if trees < 1:
        parser.error("--trees must be at least 1")
    started = time.perf_counter()
    model = train(trees, args.seed)
    fitted = time.perf_counter() - started
    test_x, test_y = held_out()
    accuracy = float((model.predict(test_x) == test_y).mean())
    save(model, args.path)
    nodes = sum(tree.tree_.node_count for tree in model.estimators_)
    print(f"trained {trees} trees ({nodes:,} nodes) in {fitted:.1f} s; accuracy on {len(test_y)} held-out "
          f"digits {accuracy:.3f}; wrote {args.path} ({args.path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
