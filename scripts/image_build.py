"""The image's /opt/venv, built the way the Dockerfile builds it, without a container engine.

Used by scripts/container_smoke.py. What a `docker build .` would put in the image depends on three
things a checkout's own .venv hides: the build context (what .dockerignore leaves), what the build
stage COPYs out of it, and what its RUN steps install. So this module:

    checkout ──.dockerignore──▶ context/ ──build stage: COPY──▶ src/ ──build stage: RUN──▶ opt/venv

1. copies the files a build context would hold into an empty folder (.dockerignore honoured with
   the Docker SDK's own matcher, `docker.utils.build.exclude_paths`, the rules the engine applies);
2. replays the build stage in order: `WORKDIR` and `ENV` as they are, `COPY` from that context only,
   `RUN` through /bin/sh with the image's /opt/venv mapped to a fresh folder. So the lock is installed
   with the Dockerfile's own pip command into a fresh virtual environment, and the project is built
   into a wheel and installed from exactly what was copied: a package that pyproject.toml lists and
   the Dockerfile does not copy, or a file .dockerignore drops, fails here as it fails in the engine.

What it cannot replay (and says so): the base image's own Python (the interpreter running this is
used; `python` on PATH points at it) and anything other than COPY, RUN, WORKDIR, ENV, ARG and FROM in
the build stage, which raises rather than being skipped silently.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from docker.utils.build import exclude_paths

IMAGE_VENV = "/opt/venv"


class BuildFailed(Exception):
    pass


@dataclass
class Instruction:
    word: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction] = field(default_factory=list)


def parse(dockerfile: Path) -> list[Stage]:
    """The Dockerfile's stages: logical lines (continuations joined, comments dropped) by stage."""
    stages: list[Stage] = []
    current = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        line, current = current + line, ""
        word, _, args = line.partition(" ")
        word, args = word.upper(), args.strip()
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            raise BuildFailed(f"{dockerfile.name}: {word} before the first FROM")
        else:
            stages[-1].steps.append(Instruction(word, args))
    return stages


def make_context(root: Path, dest: Path) -> list[str]:
    """Copy what `docker build root` sends as its context into `dest`; return the files copied."""
    ignore = root / ".dockerignore"
    patterns = ignore.read_text().splitlines() if ignore.exists() else []
    copied = []
    for rel in sorted(exclude_paths(str(root), patterns, dockerfile="Dockerfile")):
        src = root / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            copied.append(rel)
    return copied


def _copy_args(args: str) -> tuple[list[str], str]:
    if args.startswith("--"):
        raise BuildFailed(f"COPY {args}: options are not replayed in the build stage")
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    return parts[:-1], parts[-1]


def build_stage(dockerfile: Path, context: Path, work: Path, log: Path) -> Path:
    """Replay the build stage (the stage the last stage copies /opt/venv from) into `work`.

    Returns the built virtual environment (the image's /opt/venv)."""
    stages = parse(dockerfile)
    final = stages[-1]
    source = next((s.args.split()[0] for s in final.steps if s.word == "COPY" and IMAGE_VENV in s.args), None)
    if source is None or not source.startswith("--from="):
        raise BuildFailed(f"the last stage does not COPY --from=<stage> {IMAGE_VENV}")
    build = next((s for s in stages if s.name == source.removeprefix("--from=")), None)
    if build is None:
        raise BuildFailed(f"no stage named {source.removeprefix('--from=')}")
    venv = work / "opt" / "venv"
    bindir = work / "bin"  # `python` of the base image: this interpreter's own
    bindir.mkdir(parents=True)
    (bindir / "python").symlink_to(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}."
                                                                   f"{sys.version_info[1]}")
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    # This machine's pip settings (a local wheel folder, an index mirror, a CA bundle) still apply,
    # as a build on this machine would get them from the base image; nothing else leaks in.
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.endswith("_CA_BUNDLE")})
    workdir = work / "root"
    workdir.mkdir()

    def here(path: str) -> Path:
        if path.startswith(IMAGE_VENV):
            return venv / path[len(IMAGE_VENV):].lstrip("/")
        return work / "root" / path.lstrip("/") if path.startswith("/") else workdir / path

    with open(log, "ab") as out:
        for step in build.steps:
            if step.word == "WORKDIR":
                workdir = here(step.args)
                workdir.mkdir(parents=True, exist_ok=True)
            elif step.word == "ENV":
                for item in shlex.split(step.args):
                    key, _, value = item.partition("=")
                    env[key] = value
            elif step.word == "ARG":
                continue
            elif step.word == "COPY":
                sources, target = _copy_args(step.args)
                for src in sources:
                    origin = context / src
                    if not origin.exists():
                        raise BuildFailed(f"COPY {step.args}: {src} is not in the build context "
                                          "(missing, or dropped by .dockerignore)")
                    dest = here(target)
                    if origin.is_dir():
                        shutil.copytree(origin, dest, dirs_exist_ok=True)
                    else:
                        if target.endswith("/") or len(sources) > 1:
                            dest = dest / origin.name
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, dest)
            elif step.word == "RUN":
                command = step.args.replace(IMAGE_VENV, str(venv))
                out.write(f"\n$ {command}\n".encode())
                out.flush()
                done = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise BuildFailed(f"RUN {step.args[:100]}: exit {done.returncode}")
            else:
                raise BuildFailed(f"{step.word} in the build stage is not replayed here")
    if not (venv / "bin" / "python").exists():
        raise BuildFailed(f"the build stage made no {IMAGE_VENV}")
    return venv
