"""The task module of the `batch_speedup` figure (bench/batch.py; served as `--tasks bench.apps.batching`):
one small model scored two ways, one call per invocation (`score`) and gathered into batches
(`score_batch`, `@task(batch=Batch(max_size=32, max_wait_ms=5))`).

The model is a dense network on 16 features: 16 -> 2048 -> 2048 -> 2048 -> 1 (ReLU), float32, its 33 MB of
weights built once by a `@preload` (shared by the workers, not in the HTTP process). Scoring one input is
three matrix-vector products that stream every weight from memory (memory-bound: milliseconds); scoring a
batch is three matrix products that read each weight once for the whole batch (compute-bound: a fraction
of that per input). That is the shape of real inference (why model servers batch), and what numpy gains
from vectorising here. BLAS runs one thread per worker (threadpoolctl, in each worker), so the workers do
not fight over the cores.
"""

from __future__ import annotations

import os

import numpy as np

from workers import Batch, on_worker_start, preload, task

FEATURES = 16
WIDTH = int(os.environ.get("BENCH_BATCH_WIDTH", "2048"))
MAX_SIZE = 32
MAX_WAIT_MS = 5.0


def _one_blas_thread() -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the dev lock has it; without it BLAS picks its own thread count
        return
    threadpool_limits(1)


@preload
def weights() -> list[np.ndarray]:
    """The model's layers, from a fixed seed (the same model in every run)."""
    _one_blas_thread()
    rng = np.random.default_rng(17)
    shapes = [(FEATURES, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, 1)]
    return [(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32) for shape in shapes]


@on_worker_start
def one_blas_thread() -> None:
    _one_blas_thread()


def forward(inputs: np.ndarray) -> np.ndarray:
    """Scores of a (n, FEATURES) array of inputs: n floats."""
    h = inputs.astype(np.float32, copy=False)
    layers = weights()
    for w in layers[:-1]:
        h = np.maximum(h @ w, 0.0)
    return (h @ layers[-1])[:, 0]


@task
def score(x: list[float]) -> float:
    """The model's score of one input (16 features): one invocation per call."""
    return float(forward(np.asarray([x]))[0])


@task(batch=Batch(max_size=MAX_SIZE, max_wait_ms=MAX_WAIT_MS))
def score_batch(x: list[list[float]]) -> list[float]:
    """The same score, calls gathered: `x` holds one input per call; one score per call back."""
    return [float(v) for v in forward(np.asarray(x))]
