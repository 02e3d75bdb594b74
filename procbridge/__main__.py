"""`python -m procbridge ...`: the `procbridge` command (procbridge/cli.py)."""

import sys

from procbridge.cli import main

if __name__ == "__main__":
    sys.exit(main())
