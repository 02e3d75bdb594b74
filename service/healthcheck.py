"""`python -m service.healthcheck`: the container's HEALTHCHECK. Exit 0 if GET /healthz answers 200.

It reads the same PROCBRIDGE_HOST and PROCBRIDGE_PORT as the server (a wildcard bind address is
asked on loopback), uses only the standard library, and gives up after 2 seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("PROCBRIDGE_HOST", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]", "*"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("PROCBRIDGE_PORT", "") or "8080"
    url = f"http://{host}:{port}/healthz"
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
