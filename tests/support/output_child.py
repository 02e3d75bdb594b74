"""A stand-in worker for the output relay's wiring test: started from the forkserver with socket write
ends as its arguments (as the pool passes its frame socket), it redirects fds 1 and 2 onto them the
way a worker would, then prints through every path a task can: `print`, `os.write` and a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from workers.local.output import redirect_output


def print_everywhere(out: socket.socket, err: socket.socket) -> None:
    redirect_output(out.fileno(), err.fileno())
    out.detach()  # redirect_output closed them; the socket objects must not close the numbers again
    err.detach()
    print("print to stdout")
    print("print to stderr", file=sys.stderr)
    os.write(1, b"os.write to fd 1\n")
    subprocess.run(["sh", "-c", "echo subprocess stdout; echo subprocess stderr >&2"], check=True)
