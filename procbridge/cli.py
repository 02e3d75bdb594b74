"""The `procbridge` command: a procbridge server from shells and scripts, over `procbridge.Client`.

    procbridge call TASK [key=value ...] [@FILE] [-o FILE]    run a task, print its result
    procbridge stream TASK [key=value ...]                    a generator task's items, one JSON line each
    procbridge submit TASK [key=value ...] [--priority N] [--delay S | --run-at T] ...   start a job, print its id
    procbridge job ID [--follow] | procbridge cancel ID       a job (followed to its end) / cancel it
    procbridge jobs [--status S] [--task T] [--limit N] [--all] | tasks | workers
    procbridge serve ... | procbridge loadtest ...            the server's own commands (service/cli.py)

Arguments: `key=value` takes the value as JSON where it parses (`limit=10`, `flag=true`,
`xs=[1,2]`), else as a string (`name=Ada`); `key=@FILE` takes FILE's text as a string (`@-`: stdin),
`key=@@x` the string "@x". A lone `@FILE` (or `@-`) is the binary request body, for the task's `bytes`
parameter. Results are printed as JSON (indented on a terminal, one line otherwise); a binary result is
written raw to stdout, or to `-o FILE`.

Exit codes (EXIT_CODES): 0 done; 1 the task ran and failed (task-failed, task-timeout, worker-crashed,
a job that failed or was cancelled); 2 the request is wrong (usage, invalid-arguments, unknown-task,
unknown-job, job-finished, payload-too-large, ...); 3 no service to talk to (unreachable, unauthorized,
no answer in time); 4 the service is busy, try later (overloaded, rate-limited, draining, after the
client's retries); 5 anything else (an answer that breaks the API, an internal error); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from procbridge.errors import (
    Draining,
    InvalidArguments,
    Overloaded,
    ProblemError,
    ProcbridgeError,
    RateLimited,
    ServiceUnreachable,
    TaskFailed,
    TaskTimeout,
    Timeout,
    Unauthorized,
    WorkerCrashed,
)

OK, TASK_FAILED, USAGE, UNREACHABLE, BUSY, OTHER, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_CODES = {
    OK: "done",
    TASK_FAILED: "the task ran and failed: task-failed, task-timeout, worker-crashed; a job failed or was cancelled",
    USAGE: "the request is wrong: bad command line, invalid-arguments, unknown-task, unknown-job, job-finished, ...",
    UNREACHABLE: "no service to talk to: unreachable, unauthorized, or no answer within --timeout",
    BUSY: "the service is busy, try later: overloaded, rate-limited, draining (after the client's retries)",
    OTHER: "anything else: an answer that breaks the API, an internal error",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
SERVER_COMMANDS = ("serve", "loadtest")
FINAL = ("succeeded", "failed", "cancelled")


class UsageError(Exception):
    """A command line that cannot be run: printed with the usage hint, exit 2."""


def exit_code(error: BaseException) -> int:
    """The exit code an error stands for (see EXIT_CODES)."""
    if isinstance(error, TaskFailed | TaskTimeout | WorkerCrashed | JobEnded):
        return TASK_FAILED
    if isinstance(error, ServiceUnreachable | Unauthorized | Timeout):
        return UNREACHABLE
    if isinstance(error, Overloaded | RateLimited | Draining):
        return BUSY
    if isinstance(error, UsageError):
        return USAGE
    if isinstance(error, ProblemError):
        if error.slug in ("job-failed", "job-cancelled"):
            return TASK_FAILED
        return USAGE if 400 <= error.status < 500 else OTHER
    return OTHER


class JobEnded(ProcbridgeError):
    """A followed job ended failed or cancelled (its document was printed)."""


# -- arguments -------------------------------------------------------------------------------------


def parse_pairs(pairs: Sequence[str], stdin: IO[bytes] | None = None) -> tuple[dict[str, Any], bytes | None]:
    """`key=value` words as task arguments (JSON where the value parses, else the string; `key=@FILE`
    the file's text), and the binary body of a lone `@FILE` word."""
    args: dict[str, Any] = {}
    body: bytes | None = None
    for word in pairs:
        if word.startswith("@"):
            if body is not None:
                raise UsageError("only one @FILE body can be sent")
            body = _read(word[1:], binary=True, stdin=stdin)
            continue
        key, sep, raw = word.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"expected key=value or @FILE, got {word!r}")
        if key in args:
            raise UsageError(f"argument {key!r} given twice")
        if raw.startswith("@@"):
            args[key] = raw[1:]
        elif raw.startswith("@"):
            args[key] = _read(raw[1:], binary=False, stdin=stdin)
        else:
            try:
                args[key] = json.loads(raw)
            except ValueError:
                args[key] = raw
    return args, body


def _read(path: str, *, binary: bool, stdin: IO[bytes] | None) -> Any:
    if not path:
        raise UsageError("@ needs a file name (or @- for stdin)")
    try:
        if path == "-":
            data = (stdin or sys.stdin.buffer).read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if binary:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; send binary data as the body: @{path}") from None


# -- output ----------------------------------------------------------------------------------------


def print_json(value: Any, out: IO[str]) -> None:
    """One JSON document: indented on a terminal, on one line otherwise (one document per line for scripts)."""
    tty = out.isatty()
    out.write(json.dumps(value, ensure_ascii=False, indent=2 if tty else None, default=_jsonable) + "\n")
    out.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": __import__("base64").b64encode(bytes(value)).decode()}
    return str(value)


def write_bytes(data: bytes, output: str | None, out: IO[str]) -> None:
    if output and output != "-":
        try:
            with open(output, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
        return
    if output is None and out.isatty():
        raise UsageError(f"the result is {len(data)} bytes of binary data: write it with -o FILE (or -o - to force)")
    out.flush()
    buffer = getattr(out, "buffer", None)
    if buffer is None:
        raise UsageError("cannot write binary data to this output: use -o FILE")
    buffer.write(data)
    buffer.flush()


class ProgressBar:
    """A one-line bar redrawn in place (`\\r`) on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.drawn = False

    def draw(self, progress: dict[str, Any] | None, status: str) -> None:
        width = max(20, min(shutil.get_terminal_size((80, 24)).columns, 120))
        done = (progress or {}).get("done")
        total = (progress or {}).get("total")
        message = (progress or {}).get("message") or ""
        if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
            fraction = max(0.0, min(1.0, done / total))
            label = f"{fraction * 100:3.0f}% {_num(done)}/{_num(total)}"
        else:
            fraction = None
            label = f"{_num(done)} done" if isinstance(done, int | float) else ""
        bar_width = max(10, width // 3)
        bar = "#" * round(fraction * bar_width) if fraction is not None else ""
        line = f"{status:<9} [{bar:<{bar_width}}] {label} {message}".rstrip()
        self.out.write("\r" + line[: width - 1].ljust(width - 1))
        self.out.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# -- commands --------------------------------------------------------------------------------------


def cmd_call(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    args, body = parse_pairs(ns.args)
    result = client.call(ns.task, body, **args) if body is not None else client.call(ns.task, **args)
    if isinstance(result, bytes | bytearray | memoryview):
        write_bytes(bytes(result), ns.output, out)
    elif ns.output and ns.output != "-":
        try:
            with open(ns.output, "w") as f:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {ns.output}: {exc.strerror or exc}") from None
    else:
        print_json(result, out)
    return OK


def cmd_stream(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    args, body = parse_pairs(ns.args)
    if body is not None:
        raise UsageError("stream sends JSON arguments only; a binary body goes with `call`")
    for item in client.stream(ns.task, **args):
        out.write(json.dumps(item, ensure_ascii=False, default=_jsonable) + "\n")
        out.flush()
    return OK


def cmd_submit(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    args, body = parse_pairs(ns.args)
    if body is not None:
        raise UsageError("a job takes JSON arguments; pass bytes as key=@FILE text or base64 ({\"base64\": ...})")
    job = client.submit(ns.task, idempotency_key=ns.idempotency_key, priority=ns.priority, delay=ns.delay,
                        run_at=ns.run_at, retries=ns.task_retries, webhook=ns.webhook, timeout=ns.task_timeout,
                        **args)
    out.write(f"{job.id}\n")
    out.flush()
    return OK


def cmd_job(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    job = client.job(ns.id)
    if not ns.follow:
        info = job.info()
        print_json(info, out)
        return OK
    bar = ProgressBar(out) if out.isatty() else None
    status, progress = "", None
    try:
        for event in job.events():
            kind, data = event.type, event.data
            if bar is None:
                out.write(json.dumps({"event": kind, "data": data}, ensure_ascii=False, default=_jsonable) + "\n")
                out.flush()
                continue
            if kind == "status" and isinstance(data, dict):
                status = str(data.get("status", status))
            elif kind == "progress" and isinstance(data, dict):
                progress = data
            if kind in ("status", "progress"):
                bar.draw(progress, status or "running")
    finally:
        if bar is not None:
            bar.end()
    info = job.info()
    if bar is not None:
        print_json(info, out)
    if info.get("status") in ("failed", "cancelled"):
        raise JobEnded(f"job {ns.id} {info.get('status')}" + _error_text(info.get("error")))
    return OK


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and (error.get("detail") or error.get("title")):
        return f": {error.get('detail') or error.get('title')}"
    return ""


def cmd_cancel(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    print_json(client.job(ns.id).cancel(), out)
    return OK


def cmd_jobs(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    if ns.all:
        jobs = list(client.iter_jobs(status=ns.status, task=ns.task, page_size=ns.limit or 100))
    else:
        jobs = client.jobs(status=ns.status, limit=ns.limit, task=ns.task)
    print_json(jobs, out)
    return OK


def cmd_tasks(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    print_json(client.tasks(), out)
    return OK


def cmd_workers(client: Any, ns: argparse.Namespace, out: IO[str]) -> int:
    print_json(client.workers(), out)
    return OK


# -- the parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    convert.__name__ = kind.__name__
    return convert


def epoch_seconds(text: str) -> float:
    """`--run-at`: epoch seconds, or an ISO 8601 time (`2030-01-31T02:00:00Z`; without a zone: local time)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(text) from None


epoch_seconds.__name__ = "time"  # argparse's message: "invalid time value: 'x'"


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the server [PROCBRIDGE_URL, else http://127.0.0.1:8080]")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="bearer key [PROCBRIDGE_API_KEY]")
    common.add_argument("--timeout", type=_positive(float), default=argparse.SUPPRESS,
                        help="seconds to wait for each answer [no limit]")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS,
                        help="retries of a failed connect, a 503 overloaded / 429 answer, a broken event stream [3]")
    epilog = "exit codes:\n" + "\n".join(f"  {code:<3} {text}" for code, text in EXIT_CODES.items())
    parser = _Parser(prog="procbridge", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Call a procbridge server from the shell (and run one: serve, loadtest).",
                     epilog=epilog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    pairs_help = "key=value (JSON where it parses, else a string), key=@FILE (its text), @FILE (binary body)"
    p = add("call", cmd_call, "run a task and print its result")
    p.add_argument("task")
    p.add_argument("args", nargs="*", default=[], metavar="ARG", help=pairs_help)
    p.add_argument("-o", "--output", help="write the result to this file (binary results: raw bytes)")
    p = add("stream", cmd_stream, "run a generator task, print each item as one JSON line as it comes")
    p.add_argument("task")
    p.add_argument("args", nargs="*", default=[], metavar="ARG", help="key=value, key=@FILE")
    p = add("submit", cmd_submit, "start a job, print its id")
    p.add_argument("task")
    p.add_argument("args", nargs="*", default=[], metavar="ARG", help="key=value, key=@FILE")
    p.add_argument("--idempotency-key", help="the same key returns the same job")
    p.add_argument("--priority", type=int, help="higher runs first [0]")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, help="seconds before it may start")
    when.add_argument("--run-at", type=epoch_seconds, metavar="TIME",
                      help="when it may start: epoch seconds, or ISO 8601 (2030-01-31T02:00:00Z)")
    p.add_argument("--task-retries", type=int, metavar="N",
                   help="runs of a failed attempt again [the task's retries] (--retries is the client's)")
    p.add_argument("--webhook", metavar="URL", help="POSTed the job document when it ends")
    p.add_argument("--task-timeout", type=_positive(float), help="seconds the task may run")
    p = add("job", cmd_job, "print a job; --follow: its events until it ends (a progress bar on a terminal)")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true")
    p = add("cancel", cmd_cancel, "cancel a job, print it")
    p.add_argument("id")
    p = add("jobs", cmd_jobs, "list jobs, newest first (one page; --all: every page)")
    p.add_argument("--status", choices=["queued", "running", *FINAL])
    p.add_argument("--task", help="only this task's jobs")
    p.add_argument("--limit", type=_positive(int), help="at most N jobs [100]; with --all, N per request")
    p.add_argument("--all", action="store_true", help="every job, following the listing page by page")
    add("tasks", cmd_tasks, "list the tasks served, with their parameters' JSON Schema")
    add("workers", cmd_workers, "the worker pool")
    for name, text in (("serve", "run the HTTP service (procbridge serve --help)"),
                       ("loadtest", "drive a server with load (procbridge loadtest --help)")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _server_command(argv: list[str]) -> int:
    """`serve` and `loadtest` belong to the server's install: handed to service.cli, imported only now."""
    try:
        from service.cli import main as service_main

        if argv[0] == "serve":  # what `serve` runs on: without the server extra, this is where it fails
            import service.config
            import service.server  # noqa: F401
    except ImportError as exc:
        print(f"procbridge: `procbridge {argv[0]}` needs the server, which is not installed here ({exc}).\n"
              "Install it with: pip install 'procbridge[server]'", file=sys.stderr)
        return USAGE
    return service_main(argv)


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SERVER_COMMANDS:
        return _server_command(args)
    out = stdout or sys.stdout
    try:
        ns = build_parser().parse_args(args)
        if getattr(ns, "handler", None) is None:
            raise UsageError("a command is needed\n" + build_parser().format_usage().rstrip())
        from procbridge.client import Client

        settings = {k: getattr(ns, k) for k in ("url", "api_key", "timeout", "retries") if hasattr(ns, k)}
        client = Client(**settings)
        try:
            return int(ns.handler(client, ns, out))
        finally:
            client.close()
    except KeyboardInterrupt:
        print("procbridge: interrupted", file=sys.stderr)
        return INTERRUPTED
    except UsageError as exc:
        print(f"procbridge: {exc}", file=sys.stderr)
        return USAGE
    except (ProcbridgeError, ValueError, TypeError) as exc:
        print(f"procbridge: {describe(exc)}", file=sys.stderr)
        return exit_code(exc) if isinstance(exc, ProcbridgeError) else USAGE
    except BrokenPipeError:
        # `procbridge jobs | head -1`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


def describe(error: BaseException) -> str:
    """An error as one line (plus the faulty fields of invalid arguments), never a traceback."""
    if isinstance(error, InvalidArguments) and error.errors:
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in error.errors if isinstance(e, dict))
        return f"{error} ({fields})" if fields and fields not in str(error) else str(error)
    if isinstance(error, ProcbridgeError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
