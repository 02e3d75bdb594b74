"""A real model served end to end: scikit-learn's bundled 8×8 digits, a random forest trained by
`train.py`, loaded once by a `@preload` in `tasks.py`. The walk-through is docs/models.md.

The image format both share is load_digits' own: 8 × 8 pixels, row by row, each 0 (blank) to 16
(full ink). This module imports nothing, so `tasks.py` can use it and stay light."""

SIDE = 8
PIXELS = SIDE * SIDE
MAX_VALUE = 16
