"""`python -m service.healthcheck [URL]`: the container's HEALTHCHECK. Exit 0 if the URL answers 200.

Without a URL it asks GET /healthz of the server in the same container, from the same
PROCBRIDGE_HOST and PROCBRIDGE_PORT the server reads (a wildcard bind address is asked on loopback).
With a URL it asks that URL: docker-compose.yml uses it for the Dask scheduler and workers built from
the same image (their /health endpoints), so every service of the image checks itself the same way.
Standard library only; gives up after 2 seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def default_url() -> str:
    host = os.environ.get("PROCBRIDGE_HOST", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]", "*"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("PROCBRIDGE_PORT", "") or "8080"
    return f"http://{host}:{port}/healthz"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and not args[0].startswith(("http://", "https://"))):
        print("usage: python -m service.healthcheck [http://HOST:PORT/PATH]", file=sys.stderr)
        return 2
    url = args[0] if args else default_url()
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"healthcheck: {url}: status {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
