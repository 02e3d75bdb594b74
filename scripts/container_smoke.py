"""The container image, built and run as a user would, with or without a container engine.

Run by scripts/container-smoke (and by ./scripts/test). Three parts, each reported on its own:

1. **build** (no engine needed): the image's /opt/venv built the way the Dockerfile builds it
   (scripts/image_build.py): exactly what the build stage COPYs, taken from a build context that
   honours .dockerignore, the lock and a wheel of the project installed into a fresh virtual
   environment by the Dockerfile's own RUN steps. A file or package the image would miss fails here.
2. **run** (no engine needed): the runtime stage's ENTRYPOINT + CMD from that fresh environment, as
   the container runs it: PID 1 of a new PID and mount namespace (unshare), tini in front, the image's
   non-root uid, a 64 MB tmpfs on /dev/shm, 0.0.0.0 on a free port, a working directory outside the
   checkout, and a user task module "mounted" in a folder of its own (nothing of the checkout is
   importable).
3. **engine** (where `docker info` answers): the real `docker build` and `docker run` of the image,
   with a read-only root file system (a tmpfs on /tmp, volumes for /data and /dev/shm).

Parts 2 and 3 run the same checks:
- the HEALTHCHECK passes (part 2: the command, run in the namespace as the user; part 3: the
  engine's own health status turns `healthy`);
- tini is PID 1 and runs as the image's uid; a task call answers 200 with the right result;
- a SIGKILLed worker is reaped and replaced and no zombie is left; an orphan a task leaves behind is
  re-parented to PID 1 and reaped by tini;
- SIGTERM to PID 1 (what `docker stop` sends) turns /readyz 503, lets the call in flight finish with
  200, exits 0 within the grace, and leaves /dev/shm empty.

Exit 0 when every part that ran passed; 1 when one failed. A part the machine cannot do prints
`SKIP: <part>: <reason>` (not root, no unshare or tini, namespaces refused, no engine, the base image
neither local nor pullable: `scripts/standin-base-image` makes a local stand-in) and does not fail.
"""

from __future__ import annotations

import argparse
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
from image_build import IMAGE_VENV, BuildFailed, build_stage, make_context, parse

ROOT = Path(__file__).resolve().parent.parent
SHM_SIZE = "64m"
GRACE = 10.0
USER_TASKS = ROOT / "tests" / "support" / "container_tasks.py"  # what an operator would mount
IMAGE_TAG = "procbridge:container-smoke"


class Failed(Exception):
    pass


class Skipped(Exception):
    pass


def step(text: str) -> None:
    print(f"container-smoke: {text}", flush=True)


# -- the Dockerfile's runtime stage ---------------------------------------------------------------


def runtime_stage(path: Path) -> dict[str, Any]:
    """ENV, USER, ENTRYPOINT, CMD, HEALTHCHECK CMD and STOPSIGNAL of the last stage (exec form)."""
    last = parse(path)[-1]
    stage: dict[str, Any] = {"env": {}, "base": last.base}
    for instruction in last.steps:
        word, rest = instruction.word, instruction.args
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage["env"][key] = value
        elif word in ("USER", "STOPSIGNAL", "WORKDIR"):
            stage[word.lower()] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            stage["healthcheck"] = json.loads(rest[rest.index("CMD") + 3 :])
    for key in ("user", "entrypoint", "cmd", "healthcheck"):
        if key not in stage:
            raise Failed(f"the Dockerfile's last stage has no {key.upper()} (exec form expected)")
    uid, _, gid = stage["user"].partition(":")
    if not (uid.isdigit() and (gid or uid).isdigit()):
        raise Failed(f"USER {stage['user']!r}: a numeric uid:gid is expected")
    stage["uid"], stage["gid"] = int(uid), int(gid or uid)
    return stage


def local(argv: list[str], venv: Path) -> list[str]:
    """The image's paths as this machine has them: /opt/venv is the venv built in part 1."""
    return [a.replace(IMAGE_VENV, str(venv), 1) if a.startswith(IMAGE_VENV) else a for a in argv]


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




# -- where the container runs: a namespace of this machine, or a real engine -----------------------


class Container:
    """A started container: its PID 1 (as a host process), its URL, and how to check, stop and read it."""

    init: psutil.Process
    url: str
    shm: Path
    label: str

    def healthy(self) -> str:
        raise NotImplementedError

    def exit_code(self, timeout: float) -> int:
        raise NotImplementedError

    def log(self) -> str:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


class NamespaceContainer(Container):
    label = "run"

    def __init__(self, stage: dict[str, Any], venv: Path, work: Path, tasks: Path, port: int) -> None:
        self.stage, self.venv, self.work, self.shm = stage, venv, work, work / "shm"
        self.url = f"http://127.0.0.1:{port}"
        data = work / "data"
        for d in (self.shm, data):
            d.mkdir()
        os.chown(data, stage["uid"], stage["gid"])
        os.chown(work, stage["uid"], stage["gid"])
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_SIZE},mode=1777", "tmpfs", str(self.shm)],
                       check=True)
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(work),
                    "LANG": "C.UTF-8"}
        for key, value in stage["env"].items():
            self.env[key] = value.replace("$PATH", self.env["PATH"]).replace(IMAGE_VENV, str(venv))
        self.env.update({
            "PROCBRIDGE_PORT": str(port),
            "PROCBRIDGE_STORE": str(data / "procbridge.db"),  # the image's /data volume
            "PROCBRIDGE_WORKERS": "2",
            "PROCBRIDGE_SHUTDOWN_GRACE": str(GRACE),
            "PROCBRIDGE_TASKS": tasks.stem,
            "PYTHONPATH": str(tasks.parent),  # the mounted task folder, and nothing of the checkout
        })
        if self.env.get("PROCBRIDGE_HOST") != "0.0.0.0":
            raise Failed(f"the image sets PROCBRIDGE_HOST={self.env.get('PROCBRIDGE_HOST')!r}, not 0.0.0.0")
        self.as_user = ["setpriv", f"--reuid={stage['uid']}", f"--regid={stage['gid']}", "--clear-groups", "--"]
        # PID 1 of the new namespace is a shell for a few set-up steps as root (the tmpfs on /dev/shm; the
        # interpreter made reachable, see expose()), then it becomes tini, as the non-root user, exactly
        # as the image's ENTRYPOINT + CMD, in a working directory outside the checkout.
        setup = [f"mount --bind {shlex.quote(str(self.shm))} /dev/shm",
                 *expose(Path(sys.base_prefix).resolve(), work)]
        launcher = " && ".join([*setup, 'cd "$0"', 'exec "$@"'])
        argv = ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--propagation", "private", "--",
                "/bin/sh", "-c", launcher, str(work), *self.as_user,
                *local(stage["entrypoint"] + stage["cmd"], venv)]
        self.log_path = work / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.init = wait_for(lambda: psutil.Process(self.proc.pid).children(), 10, "PID 1 of the namespace")[0]

    def healthy(self) -> str:
        check = local(self.stage["healthcheck"], self.venv)
        done = subprocess.run(["nsenter", f"--target={self.init.pid}", "--pid", "--mount", *self.as_user, *check],
                              env=self.env, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise Failed(f"HEALTHCHECK {' '.join(self.stage['healthcheck'])} exited {done.returncode}: "
                         f"{done.stderr}")
        return "the command, run in the namespace as the user: exit 0"

    def exit_code(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def remove(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in reversed(tree(self.proc.pid)):
                    p.kill()
            self.proc.wait(10)
        subprocess.run(["umount", "-l", str(self.shm)], check=False)


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise Failed(f"docker {' '.join(args[:3])}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


class DockerContainer(Container):
    label = "engine"

    def __init__(self, stage: dict[str, Any], work: Path, tasks: Path, port: int) -> None:
        self.shm = work / "shm"
        data = work / "data"
        for d in (self.shm, data):
            d.mkdir()
        os.chown(data, stage["uid"], stage["gid"])
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_SIZE},mode=1777", "tmpfs", str(self.shm)],
                       check=True)
        self.url = f"http://127.0.0.1:{port}"
        self.name = f"procbridge-smoke-{os.getpid()}"
        docker(
            "run", "--detach", "--name", self.name, "--publish", f"127.0.0.1:{port}:8080",
            # The read-only root file system that deploy/kubernetes asks for: only these are writable.
            "--read-only", "--tmpfs", "/tmp",
            "--mount", f"type=bind,source={data},target=/data",
            "--mount", f"type=bind,source={self.shm},target=/dev/shm",
            "--mount", f"type=bind,source={tasks.parent},target=/app/tasks,readonly",
            "--env", "PYTHONPATH=/app/tasks", "--env", f"PROCBRIDGE_TASKS={tasks.stem}",
            "--env", "PROCBRIDGE_WORKERS=2", "--env", f"PROCBRIDGE_SHUTDOWN_GRACE={GRACE:g}",
            IMAGE_TAG,
        )
        pid = int(docker("inspect", "--format", "{{.State.Pid}}", self.name))
        if pid == 0:
            raise Failed(f"the container stopped at once:\n{self.log()}")
        self.init = psutil.Process(pid)

    def healthy(self) -> str:
        def status() -> str:
            return docker("inspect", "--format", "{{.State.Health.Status}}", self.name)

        wait_for(lambda: status() == "healthy", 60, "the engine to report the container healthy")
        return "the engine's health status: healthy"

    def exit_code(self, timeout: float) -> int:
        try:
            return int(docker("wait", self.name, timeout=timeout))
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(["docker", "wait"], timeout) from None

    def log(self) -> str:
        done = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr

    def remove(self) -> None:
        docker("rm", "--force", self.name, check=False)
        subprocess.run(["umount", "-l", str(self.shm)], check=False)


# -- the checks, the same for both -----------------------------------------------------------------


def check(box: Container, stage: dict[str, Any]) -> None:
    url, init = box.url, box.init
    wait_for(lambda: init.name() == "tini", 10, "tini to be PID 1")
    if ns_pid(init.pid) != 1:
        raise Failed("tini is not PID 1 of its namespace")
    if init.uids().real != stage["uid"]:
        raise Failed(f"PID 1 runs as uid {init.uids().real}, not {stage['uid']}")
    wait_for(lambda: init.is_running() and http("GET", url + "/readyz", timeout=2)[0] == 200, 60,
             "/readyz to answer 200")
    server = init.children()[0]
    step(f"{box.label}: ready: tini (PID 1) -> server (pid {ns_pid(server.pid)} in the namespace), "
         f"uid {server.uids().real}")

    # 1. the HEALTHCHECK
    step(f"{box.label}: HEALTHCHECK {' '.join(stage['healthcheck'])}: {box.healthy()}")

    # 2. a task call
    status, body = http("POST", url + "/v1/tasks/primes", {"limit": 100000})
    if status != 200 or body["result"] != 9592:
        raise Failed(f"POST /v1/tasks/primes: {status} {body}")
    step(f"{box.label}: POST /v1/tasks/primes: 200, result {body['result']}")

    # 3a. a killed worker leaves no zombie
    by_ns = {ns_pid(p.pid): p for p in tree(init.pid)}
    victim_ns = http("GET", url + "/v1/workers")[1]["workers"][0]["pid"]
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
    step(f"{box.label}: SIGKILL worker {victim_ns}: replaced, reaped, calls go on, no zombie")

    # 3b. an orphan re-parented to PID 1 is reaped by tini
    status, body = http("POST", url + "/v1/tasks/orphan", {"ms": 200})
    if status != 200:
        raise Failed(f"POST /v1/tasks/orphan: {status} {body}")
    orphan_ns = body["result"]["orphan"]
    by_ns = {ns_pid(p.pid): p for p in tree(init.pid)}
    if orphan_ns in by_ns and by_ns[orphan_ns].ppid() != init.pid:
        raise Failed(f"the orphan {orphan_ns} was not re-parented to PID 1")
    wait_for(lambda: orphan_ns not in {ns_pid(p.pid) for p in tree(init.pid)}, 10, "tini to reap the orphan")
    wait_for(lambda: not zombies(init.pid), 5, "no zombie in the namespace")
    step(f"{box.label}: orphan {orphan_ns} re-parented to PID 1 and reaped by tini once it exited")

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
        code = box.exit_code(GRACE + 5)
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
    left = os.listdir(box.shm)
    if left:
        raise Failed(f"/dev/shm holds {left} after the exit")
    step(f"{box.label}: {stop_signal.name} to PID 1: /readyz {status} ({body['status']}), the call in flight "
         f"got 200, exit 0 after {took:.2f} s (grace {GRACE:g} s), /dev/shm empty")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_checks(box: Container, stage: dict[str, Any]) -> None:
    try:
        check(box, stage)
    except Exception:
        print(f"---- {box.label}: server log ----\n{box.log()}", file=sys.stderr)
        raise
    finally:
        box.remove()


# -- the three parts -------------------------------------------------------------------------------


def part_build(work: Path) -> Path:
    context = work / "context"
    context.mkdir()
    files = make_context(ROOT, context)
    step(f"build: context of {len(files)} files (.dockerignore honoured); replaying the Dockerfile's build stage")
    started = time.monotonic()
    try:
        venv = build_stage(ROOT / "Dockerfile", context, work / "image", work / "build.log")
    except BuildFailed as exc:
        print(f"---- build log ----\n{(work / 'build.log').read_text(errors='replace')[-6000:]}", file=sys.stderr)
        raise Failed(f"build: {exc}") from None
    imports = "import procbridge, service, workers, sys; print(sys.prefix)"
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", imports],
                           cwd=work, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if probe.returncode != 0 or Path(probe.stdout.strip()) != venv:
        raise Failed(f"build: the built venv cannot import the project: {probe.stderr.strip()}")
    step(f"build: {IMAGE_VENV} built in {time.monotonic() - started:.0f} s from the lock and a wheel of the context")
    return venv


def part_run(stage: dict[str, Any], venv: Path, work: Path, tasks: Path) -> None:
    if os.geteuid() != 0:
        raise Skipped("needs root (unshare of PID and mount namespaces, a tmpfs for /dev/shm)")
    for tool in ("unshare", "nsenter", "setpriv", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Skipped(f"{tool} (util-linux) is not installed")
    tini = local(stage["entrypoint"], venv)[0]
    if not Path(tini).exists():
        raise Skipped(f"{tini} is not installed (apt-get install tini)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise Skipped(f"this machine does not allow new PID and mount namespaces: {probe.stderr.strip()}")
    port = free_port()
    step(f"run: {' '.join(stage['entrypoint'] + stage['cmd'])} as PID 1 (uid {stage['uid']}), 0.0.0.0:{port}, "
         f"/dev/shm {SHM_SIZE}, from the built venv, in {work}")
    run_checks(NamespaceContainer(stage, venv, work, tasks, port), stage)


def part_engine(stage: dict[str, Any], work: Path, tasks: Path) -> None:
    if shutil.which("docker") is None:
        raise Skipped("no docker command")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        raise Skipped("no container engine answers (docker info)")
    step(f"engine: docker build -t {IMAGE_TAG} {ROOT}")
    started = time.monotonic()
    built = subprocess.run(["docker", "build", "--tag", IMAGE_TAG, str(ROOT)], capture_output=True, text=True,
                           timeout=1200)
    if built.returncode != 0:
        have_base = subprocess.run(["docker", "image", "inspect", stage["base"]], capture_output=True).returncode == 0
        if not have_base:
            raise Skipped(f"the base image {stage['base']} is not on this engine and could not be pulled "
                          "(scripts/standin-base-image makes a local stand-in)")
        raise Failed(f"engine: docker build failed:\n{(built.stdout + built.stderr)[-6000:]}")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE_TAG))
    step(f"engine: built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    port = free_port()
    step(f"engine: docker run --read-only --tmpfs /tmp (uid {stage['uid']}), 127.0.0.1:{port} -> 8080")
    run_checks(DockerContainer(stage, work, tasks, port), stage)


def attempt(name: str, part: Any, failed: list[str]) -> Any:
    """Run one part; report it passed, skipped (with the reason) or failed. Its result, or None."""
    try:
        result = part()
        step(f"{name}: passed")
        return result
    except Skipped as exc:
        print(f"container-smoke: SKIP: {name}: {exc}", flush=True)
    except Failed as exc:
        print(f"container-smoke: FAILED: {name}: {exc}", file=sys.stderr, flush=True)
        failed.append(name)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-engine", action="store_true", help="skip part 3 even where an engine answers")
    args = parser.parse_args()
    stage = runtime_stage(ROOT / "Dockerfile")
    work = Path(tempfile.mkdtemp(prefix="procbridge-smoke-"))
    os.chmod(work, 0o755)
    failed: list[str] = []
    try:
        tasks = work / "tasks" / USER_TASKS.name
        tasks.parent.mkdir()
        shutil.copy2(USER_TASKS, tasks)
        for sub in ("run", "engine"):
            (work / sub).mkdir()
        venv = attempt("build", lambda: part_build(work), failed)
        if venv is not None:
            attempt("run", lambda: part_run(stage, venv, work / "run", tasks), failed)
        if not args.no_engine:
            attempt("engine", lambda: part_engine(stage, work / "engine", tasks), failed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"container-smoke: FAILED ({', '.join(failed)})" if failed else "container-smoke: all parts that ran passed",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
