"""The dashboard's files: every plain file directly in service/dashboard/static/, read once when the
app is made and then served from memory (no file is opened on the loop, and no path a request names
is ever joined to a folder: a name is looked up among the files found, so `..` and `/` find nothing).

Every answer carries the page's security headers: a Content-Security-Policy that allows only this
service's own scripts, styles, images and connections (no inline script or style, no framing), no
sniffing of content types, no referrer. `Cache-Control: no-cache` with an ETag: a browser asks again
each time and gets 304 while the file is the same (the files change only with the installation).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

log = logging.getLogger("procbridge.dashboard")

FOLDER = Path(__file__).with_name("static")
PAGE = "index.html"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webp": "image/webp",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
}
OTHER = "application/octet-stream"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load(folder: Path = FOLDER) -> dict[str, Asset]:
    """Name -> file, for the plain files directly in `folder` (not links, not hidden files, not
    sub-folders). Blocking: called once, when the app is made."""
    assets: dict[str, Asset] = {}
    if not folder.is_dir():
        log.error("dashboard: %s is missing: the dashboard is not installed", folder)
        return assets
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[path.name] = Asset(body, TYPES.get(path.suffix.lower(), OTHER), etag)
    if PAGE not in assets:
        log.error("dashboard: %s has no %s: GET /dashboard will answer 404", folder, PAGE)
    return assets


def respond(request: web.Request, asset: Asset) -> web.Response:
    """The file, or 304 when the request's If-None-Match names its ETag."""
    headers = {**HEADERS, "ETag": asset.etag}
    match = request.headers.get("If-None-Match")
    if match is not None and asset.etag in {tag.strip().removeprefix("W/") for tag in match.split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})
