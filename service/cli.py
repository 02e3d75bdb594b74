"""The `procbridge` command: `procbridge serve [FLAGS]` (flags and environment: see --help), and
`procbridge loadtest URL [...]`, the load generator of `bench/loadtest.py` (it needs the dev lock)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: procbridge {serve,loadtest} ...

commands:
  serve     run the HTTP service (procbridge serve --help lists every flag)
  loadtest  drive a procbridge URL (or any HTTP endpoint) with load: open or closed loop, HDR latencies,
            JSON and PNG results (procbridge loadtest --help; needs requirements-dev.lock installed)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from service import config as config_module
        from service.server import Server, run
        from service.serving import CoreServer

        try:
            config = config_module.load(rest)
        except config_module.ConfigError as exc:
            print(f"procbridge: bad setting: {exc}", file=sys.stderr)
            return 2
        # With --http-processes N ≥ 2 this process is the core and N serving processes accept calls.
        return run(config, CoreServer if config.http_processes > 1 else Server)
    if command == "loadtest":
        try:
            from bench import loadtest_cli
        except ImportError as exc:  # a checkout installed without its bench package, or without aiohttp
            print(f"procbridge loadtest is not available here ({exc}); install the checkout with "
                  "`pip install -e .` and `pip install -r requirements-dev.lock`", file=sys.stderr)
            return 2
        return loadtest_cli.main(rest)
    print(f"procbridge: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2
