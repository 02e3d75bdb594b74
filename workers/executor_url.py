"""`--executor`, parsed once: `local`, or `dask://HOST:PORT[?isolate=process|thread]`.

In workers/ (which never imports service/) because the process side consumes it: the config checks
the text with `parse_executor` and keeps the result (`Config.executor_url`), and whatever opens the
executor (`workers.backends.open_executor`, `workers.dask.options.DaskOptions`) reads `kind`,
`scheduler` and `isolate` from it instead of parsing the URL again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Isolation = Literal["process", "thread"]

_DASK = re.compile(r"dask://(?P<host>[^\s:/?#@]+):(?P<port>\d+)(?:\?isolate=(?P<isolate>process|thread))?")
_REFUSED = "must be 'local' or dask://HOST:PORT (optionally ?isolate=process or ?isolate=thread)"


@dataclass(frozen=True)
class ExecutorURL:
    """Where tasks run: the local pool, or the Dask scheduler at host:port. `isolate` says how a Dask
    worker runs a task: in a child process (killable at its timeout) or in a thread."""

    kind: Literal["local", "dask"]
    host: str = ""
    port: int = 0
    isolate: Isolation = "process"

    @property
    def scheduler(self) -> str:
        """The address distributed's Client takes: tcp://HOST:PORT."""
        if self.kind != "dask":
            raise ValueError("the local executor has no scheduler")
        return f"tcp://{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.kind == "local":
            return "local"
        return f"dask://{self.host}:{self.port}?isolate={self.isolate}"


LOCAL = ExecutorURL("local")


def parse_executor(text: str) -> ExecutorURL:
    """The executor a `--executor` value names; ValueError (worded for `--executor=...: <message>`) for
    anything else, a port outside 1-65535 included."""
    if text == "local":
        return LOCAL
    m = _DASK.fullmatch(text)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(_REFUSED)
    isolate: Isolation = "thread" if m["isolate"] == "thread" else "process"
    return ExecutorURL("dask", m["host"], int(m["port"]), isolate)
