"""The container's start, health check, life and stop, reproduced without a container engine.

Run by scripts/container-smoke. It reads the runtime stage of ./Dockerfile (ENV, USER, ENTRYPOINT,
CMD, HEALTHCHECK) and runs that entrypoint as the container would: PID 1 of a fresh PID and mount
namespace (unshare), tini in front, as the image's non-root uid, with a 64 MB tmpfs on /dev/shm
(Docker's default size), bound to 0.0.0.0 on a free port. The image's /opt/venv is this checkout's
.venv (the image cannot be built here); the job store goes to a temporary directory instead of the
/data volume. Then it checks:

1. the HEALTHCHECK command, run inside the namespace as the same user, exits 0;
2. a task call answers 200 with the right result;
3. a SIGKILLed worker leaves no zombie (the pool reaps and replaces it), and an orphan a task leaves
   behind is reaped by PID 1 (tini) once it exits;
4. SIGTERM to PID 1 (what `docker stop` sends) drains: /readyz turns 503, the call in flight
   finishes with 200, the process exits 0 within the grace, /dev/shm is left empty.

Exit 0 when everything holds, 1 when something does not, 0 with "SKIP: <reason>" on a machine that
cannot do this (not root, no unshare, no tini, namespaces not allowed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
IMAGE_VENV = "/opt/venv"
SHM_SIZE = "64m"
GRACE = 10.0


class Failed(Exception):
    pass


def skip(reason: str) -> None:
    print(f"container-smoke: SKIP: {reason}")
    sys.exit(0)


def step(text: str) -> None:
    print(f"container-smoke: {text}", flush=True)


# -- the Dockerfile's runtime stage ---------------------------------------------------------------


def runtime_stage(path: Path) -> dict[str, Any]:
    """ENV, USER, ENTRYPOINT, CMD, HEALTHCHECK CMD and STOPSIGNAL of the last stage (exec form)."""
    lines: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    stage: dict[str, Any] = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = {"env": {}}
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage["env"][key] = value
        elif word in ("USER", "STOPSIGNAL"):
            stage[word.lower()] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            stage["healthcheck"] = json.loads(rest[rest.index("CMD") + 3 :])
    for key in ("user", "entrypoint", "cmd", "healthcheck"):
        if key not in stage:
            raise Failed(f"the Dockerfile's last stage has no {key.upper()} (exec form expected)")
    return stage


def local(argv: list[str]) -> list[str]:
    """The image's paths as this machine has them: /opt/venv is the checkout's .venv."""
    return [a.replace(IMAGE_VENV, str(VENV), 1) if a.startswith(IMAGE_VENV) else a for a in argv]


# -- HTTP -----------------------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- processes in the namespace --------------------------------------------------------------------


def ns_pid(host_pid: int) -> int:
    """A process's pid inside its innermost PID namespace (the last NSpid field)."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise Failed(f"no NSpid for {host_pid}")


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def zombies(pid: int) -> list[int]:
    out = []
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() == psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


def expose(path: Path, work: Path) -> list[str]:
    """Shell steps that make `path` reachable for any user inside the smoke's mount namespace.

    In the image Python lives in /usr/local. Here the venv's interpreter may live under a directory
    other users cannot enter (pyenv under /root, mode 0700): inside the namespace only, that
    directory is covered by an empty tmpfs and `path` alone is bound back into it. Nothing changes
    outside the namespace."""
    blocked = None
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            blocked = parent
            break
    if blocked is None:
        return []
    stash = work / "stash"
    rel = path.relative_to(blocked)
    q = shlex.quote
    return [
        f"mkdir -p {q(str(stash))}",
        f"mount --bind {q(str(path))} {q(str(stash))}",
        f"mount -t tmpfs -o mode=755,size=1m tmpfs {q(str(blocked))}",
        f"mkdir -p {q(str(blocked / rel))}",
        f"mount --bind {q(str(stash))} {q(str(blocked / rel))}",
    ]


def main() -> int:
    if os.geteuid() != 0:
        skip("needs root (unshare of PID and mount namespaces, a tmpfs for /dev/shm)")
    for tool in ("unshare", "nsenter", "setpriv", "mount", "umount"):
        if shutil.which(tool) is None:
            skip(f"{tool} (util-linux) is not installed")
    stage = runtime_stage(ROOT / "Dockerfile")
    entrypoint = local(stage["entrypoint"] + stage["cmd"])
    if not Path(entrypoint[0]).exists():
        skip(f"{entrypoint[0]} is not installed (apt-get install tini)")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        skip(f"this machine does not allow new PID and mount namespaces: {probe.stderr.strip()}")
    uid, _, gid = stage["user"].partition(":")
    if not (uid.isdigit() and (gid or uid).isdigit()):
        raise Failed(f"USER {stage['user']!r}: a numeric uid:gid is expected")
    gid = gid or uid

    work = Path(tempfile.mkdtemp(prefix="procbridge-smoke-"))
    shm = work / "shm"
    data = work / "data"
    shm.mkdir()
    data.mkdir()
    os.chown(data, int(uid), int(gid))
    os.chown(work, int(uid), int(gid))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_SIZE},mode=1777", "tmpfs", str(shm)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work),
           "LANG": "C.UTF-8"}
    for key, value in stage["env"].items():
        env[key] = value.replace("$PATH", env["PATH"]).replace(IMAGE_VENV, str(VENV))
    env.update({
        "PROCBRIDGE_PORT": str(port),
        "PROCBRIDGE_STORE": str(data / "procbridge.db"),  # the image's /data volume
        "PROCBRIDGE_WORKERS": "2",
        "PROCBRIDGE_SHUTDOWN_GRACE": str(GRACE),
        "PROCBRIDGE_TASKS": "tests.workers.container_tasks",  # a user module, as an operator would mount
        "PYTHONPATH": str(ROOT),
    })
    if env.get("PROCBRIDGE_HOST") != "0.0.0.0":
        raise Failed(f"the image sets PROCBRIDGE_HOST={env.get('PROCBRIDGE_HOST')!r}, not 0.0.0.0")
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    # PID 1 of the new namespace is a shell for a few set-up steps as root (the tmpfs on /dev/shm; the
    # interpreter made reachable, see expose()), then it becomes tini, as the non-root user, exactly
    # as the image's ENTRYPOINT + CMD.
    setup = [f"mount --bind {shlex.quote(str(shm))} /dev/shm", *expose(Path(sys.base_prefix).resolve(), work)]
    launcher = " && ".join([*setup, 'cd "$0"', 'exec "$@"'])
    argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private", "--",
            "/bin/sh", "-c", launcher, str(work), *as_user, *entrypoint]
    log_path = work / "server.log"
    url = f"http://127.0.0.1:{port}"
    step(f"starting {' '.join(stage['entrypoint'] + stage['cmd'])} as PID 1 (uid {uid}), 0.0.0.0:{port}, "
         f"/dev/shm {SHM_SIZE}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ok = False
    try:
        init = wait_for(lambda: psutil.Process(proc.pid).children(), 10, "PID 1 of the namespace")[0]
        wait_for(lambda: psutil.Process(init.pid).name() == "tini", 10, "tini to be PID 1")
        if ns_pid(init.pid) != 1:
            raise Failed("tini is not PID 1 of its namespace")
        if init.uids().real != int(uid):
            raise Failed(f"PID 1 runs as uid {init.uids().real}, not {uid}")
        wait_for(lambda: proc.poll() is None and http("GET", url + "/readyz", timeout=2)[0] == 200, 60,
                 "/readyz to answer 200")
        server = psutil.Process(init.pid).children()[0]
        step(f"ready: tini (PID 1) -> server (pid {ns_pid(server.pid)} in the namespace), uid {server.uids().real}")

        # 1. the HEALTHCHECK command, inside the namespace, as the user
        check = local(stage["healthcheck"])
        done = subprocess.run(
            ["nsenter", f"--target={init.pid}", "--pid", "--mount", *as_user, *check],
            env=env, capture_output=True, text=True, timeout=10,
        )
        if done.returncode != 0:
            raise Failed(f"HEALTHCHECK {' '.join(stage['healthcheck'])} exited {done.returncode}: {done.stderr}")
        step(f"HEALTHCHECK {' '.join(stage['healthcheck'])}: exit 0")

        # 2. a task call
        status, body = http("POST", url + "/v1/tasks/primes", {"limit": 100000})
        if status != 200 or body["result"] != 9592:
            raise Failed(f"POST /v1/tasks/primes: {status} {body}")
        step(f"POST /v1/tasks/primes: 200, result {body['result']}")

        # 3a. a killed worker leaves no zombie
        by_ns = {ns_pid(p.pid): p for p in tree(init.pid)}
        rows = http("GET", url + "/v1/workers")[1]["workers"]
        victim_ns = rows[0]["pid"]
        victim = by_ns[victim_ns]
        victim.send_signal(signal.SIGKILL)

        def replaced() -> bool:
            pids = [w["pid"] for w in http("GET", url + "/v1/workers")[1]["workers"]]
            return victim_ns not in pids and all(pids) and not psutil.pid_exists(victim.pid)

        wait_for(replaced, 15, "the killed worker to be reaped and replaced")
        status, body = http("POST", url + "/v1/tasks/primes", {"limit": 1000})
        if status != 200 or body["result"] != 168:
            raise Failed(f"call after the worker kill: {status} {body}")
        wait_for(lambda: not zombies(init.pid), 5, "no zombie in the namespace")
        step(f"SIGKILL worker {victim_ns}: replaced, reaped, calls go on, no zombie")

        # 3b. an orphan re-parented to PID 1 is reaped by tini
        status, body = http("POST", url + "/v1/tasks/orphan", {"ms": 200})
        if status != 200:
            raise Failed(f"POST /v1/tasks/orphan: {status} {body}")
        orphan_ns = body["result"]["orphan"]
        by_ns = {ns_pid(p.pid): p for p in tree(init.pid)}
        if orphan_ns in by_ns and by_ns[orphan_ns].ppid() != init.pid:
            raise Failed(f"the orphan {orphan_ns} was not re-parented to PID 1")
        wait_for(lambda: orphan_ns not in {ns_pid(p.pid) for p in tree(init.pid)}, 10,
                 "tini to reap the orphan")
        wait_for(lambda: not zombies(init.pid), 5, "no zombie in the namespace")
        step(f"orphan {orphan_ns} re-parented to PID 1 and reaped by tini once it exited")

        # 4. SIGTERM to PID 1 drains: the call in flight finishes, exit 0 within the grace
        answer: dict[str, Any] = {}

        def slow_call() -> None:
            answer["reply"] = http("POST", url + "/v1/tasks/burn", {"ms": 1500}, timeout=GRACE + 10)

        caller = threading.Thread(target=slow_call, daemon=True)
        caller.start()
        wait_for(lambda: any(w["state"] == "busy" for w in http("GET", url + "/v1/workers")[1]["workers"]), 10,
                 "the burn call to run")
        stop_signal = getattr(signal, stage.get("stopsignal", "SIGTERM"))
        sent = time.monotonic()
        init.send_signal(stop_signal)
        status, body = wait_for(lambda: (r := http("GET", url + "/readyz", timeout=2))[0] == 503 and r, 5,
                                "/readyz to turn 503")
        try:
            code = proc.wait(GRACE + 5)
        except subprocess.TimeoutExpired:
            raise Failed(f"still running {GRACE + 5:g} s after {stop_signal.name}") from None
        took = time.monotonic() - sent
        caller.join(5)
        reply = answer.get("reply")
        if not reply or reply[0] != 200:
            raise Failed(f"the call in flight during the drain got {reply}")
        if code != 0:
            raise Failed(f"exit code {code} after {stop_signal.name}")
        if took > GRACE:
            raise Failed(f"took {took:.1f} s to stop, past the grace of {GRACE:g} s")
        left = os.listdir(shm)
        if left:
            raise Failed(f"/dev/shm holds {left} after the exit")
        step(f"{stop_signal.name} to PID 1: /readyz {status} ({body['status']}), the call in flight got 200, "
             f"exit 0 after {took:.2f} s (grace {GRACE:g} s), /dev/shm empty")
        ok = True
    except Failed as exc:
        print(f"container-smoke: FAILED: {exc}", file=sys.stderr)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in reversed(tree(proc.pid)):
                    p.kill()
            proc.wait(10)
        if not ok:
            print(f"---- server log ----\n{log_path.read_text(errors='replace')}", file=sys.stderr)
        subprocess.run(["umount", "-l", str(shm)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("container-smoke: all checks passed" if ok else "container-smoke: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as exc:
        print(f"container-smoke: FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
