#!/usr/bin/env python3
"""`scripts/loadtest.py URL [...]`: the load generator, the same as `procbridge loadtest`.

The implementation is the importable module `bench/loadtest.py` (`from bench.loadtest import
LoadTest, Options, run`), its command line `bench/loadtest_cli.py`; this file only makes it runnable
from a checkout without installing it:

    .venv/bin/python scripts/loadtest.py http://127.0.0.1:8080 --task burn --args '{"ms": 10}' \\
        --rate 150 --duration 10 --json out.json --plots out/burn

Run by a python3 without the dev lock (`./scripts/loadtest.py` takes the first one on the PATH), it
names the missing modules and says how to run it with the venv, and exits 2: `bench.loadtest_cli`
(and what it imports) needs only the standard library at the top, so the check in `main` runs before
anything fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadtest_cli import main

if __name__ == "__main__":
    sys.exit(main())
