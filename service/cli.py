"""The `procbridge` command: `procbridge serve [FLAGS]` (flags and environment: see --help)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: procbridge serve [FLAGS]

commands:
  serve     run the HTTP service (procbridge serve --help lists every flag)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from service import config as config_module
        from service.server import run

        try:
            config = config_module.load(rest)
        except config_module.ConfigError as exc:
            print(f"procbridge: bad setting: {exc}", file=sys.stderr)
            return 2
        return run(config)
    print(f"procbridge: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2
