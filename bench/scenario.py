"""Scenarios for the load generator: what to send, as `RequestSpec`s, from the command line's
task or path or from a JSON scenario (inline or a file). The format is in docs/loadtest.md."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class UsageError(ValueError):
    """A bad command line or scenario."""


@dataclass
class RequestSpec:
    """One kind of request of a scenario."""

    name: str
    method: str
    url: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0


# -- scenarios ------------------------------------------------------------------------------------


def _join(base: str, path: str) -> str:
    if path.startswith(("http://", "https://")):
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")


def _as_given(url: str) -> str:
    """The URL itself, as the user wrote it: only a bare `http://host:port` gets its "/"."""
    parts = urlsplit(url)
    return url if parts.path else urlunsplit(parts._replace(path="/"))


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


# The keys of a scenario entry and the JSON types they take (docs/loadtest.md describes them).
ENTRY_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "task": (str,), "args": (dict,), "method": (str,), "path": (str,), "json": (object,),
    "body": (str,), "body_file": (str,), "content_type": (str,), "headers": (dict,), "weight": (int, float),
}
_TYPE_WORDS = {str: "a string", dict: "a JSON object", int: "a number", float: "a number"}


def _check_entry(item: dict[str, Any], where: str) -> None:
    """Refuse unknown keys and values of the wrong JSON type, naming the entry and the key."""
    unknown = set(item) - set(ENTRY_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(ENTRY_KEYS)})")
    for key, value in item.items():
        types = ENTRY_KEYS[key]
        if types == (object,):  # any JSON
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UsageError(f"{where}: {key!r} must be {_TYPE_WORDS[types[0]]}, got {json.dumps(value)}")
    headers = item.get("headers") or {}
    if not all(isinstance(v, str) for v in headers.values()):
        raise UsageError(f'{where}: "headers" maps names to strings, e.g. {{"X-Token": "abc"}}, got '
                         f"{json.dumps(headers)}")
    if "task" in item and "path" in item:
        raise UsageError(f"{where}: give either 'task' or 'path'")
    sources = [k for k in ("args", "json", "body", "body_file") if k in item]
    if len(sources) > 1:
        raise UsageError(f"{where}: give at most one of {sources}")
    weight = item.get("weight", 1.0)
    if not (weight > 0 and math.isfinite(weight)):
        raise UsageError(f"{where}: weight must be > 0")


def _read_body(name: str, root: Path, where: str) -> bytes:
    file = Path(name)
    file = file if file.is_absolute() else root / file
    try:
        return file.read_bytes()
    except OSError as exc:
        raise UsageError(f"{where}: cannot read the body file {str(file)!r}: {exc.strerror or exc}") from None


def spec_from_dict(base: str, item: dict[str, Any], where: str, root: Path) -> RequestSpec:
    """One request kind. With no 'task' and no 'path' it is the URL itself; a body (json, body,
    body_file) makes the method POST unless 'method' says otherwise, as --body-file does."""
    _check_entry(item, where)
    headers = dict(item.get("headers") or {})
    body: bytes | None = None
    sources = [k for k in ("args", "json", "body", "body_file") if k in item]
    if "task" in item:
        task = item["task"]
        method = item.get("method", "POST").upper()
        url = _join(base, f"/v1/tasks/{task}")
        default_name = task
    else:
        method = item.get("method", "POST" if sources else "GET").upper()
        url = _join(base, item["path"]) if "path" in item else _as_given(base)
        default_name = f"{method} {(item['path'] or '/') if 'path' in item else _shown(url)}"
    if sources:
        src = sources[0]
        if src in ("args", "json"):
            body = json.dumps(item[src]).encode()
            headers.setdefault("Content-Type", "application/json")
        elif src == "body":
            body = item["body"].encode()
        else:
            body = _read_body(item["body_file"], root, where)
            headers.setdefault("Content-Type", "application/octet-stream")
    elif "task" in item:
        body = b"{}"
        headers.setdefault("Content-Type", "application/json")
    if "content_type" in item:
        headers["Content-Type"] = item["content_type"]
    return RequestSpec(item.get("name", default_name), method, url, body, headers, float(item.get("weight", 1.0)))


def load_scenario(base: str, text_or_path: str) -> list[RequestSpec]:
    """A scenario: a JSON list of entries (or {"requests": [...]}), inline or in a file; a relative
    body_file is read from the scenario file's folder (inline: the current one). The format is in
    docs/loadtest.md."""
    stripped = text_or_path.lstrip()
    root = Path.cwd()
    text = stripped
    if not stripped.startswith(("[", "{")):
        file = Path(text_or_path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise UsageError(f"--scenario {text_or_path!r} is neither inline JSON nor a readable file: "
                             f"{exc.strerror or exc}") from None
        root = file.resolve().parent
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--scenario is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("requests")
    if not isinstance(data, list) or not data or not all(isinstance(x, dict) for x in data):
        raise UsageError("a scenario is a non-empty JSON list of objects (or {\"requests\": [...]})")
    specs = [spec_from_dict(base, item, f"scenario entry {i}", root) for i, item in enumerate(data)]
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):  # make names unique: they key the per-request results
        if names.count(spec.name) > 1:
            spec.name = f"{spec.name}#{i}"
    return specs

