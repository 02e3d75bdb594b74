"""The dashboard (GET /dashboard) opened in a real headless browser against the real server, under load.

Debian's chromium (/usr/bin/chromium; scripts/test installs it with apt-get when it runs as root) is
driven by Playwright's Python package pointed at that executable; Playwright's own browser download is
never used. The page runs under the Content-Security-Policy the service sends, so an inline script or
style, or a request to a CDN, would show up here as a console error or a foreign request.

One server (2 workers, kept busy by a few threads of `burn` calls) and one browser serve the whole
module; the test behind keys starts a second, small server with --api-keys. With
PROCBRIDGE_SCREENSHOT_DIR set, the screenshot of the page under load is written there as dashboard.png
(`PROCBRIDGE_SCREENSHOT_DIR=docs` makes docs/dashboard.png), after 25 s more of load so that the
charts have some history; otherwise to the temporary folder, at once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, http, post_json, serving, wait_for

CHROMIUM = "/usr/bin/chromium"
KEY = "dashboard-test-key-7c1e9a"
SCREENSHOT_WARMUP = 25.0  # seconds of load before the docs' screenshot (only with PROCBRIDGE_SCREENSHOT_DIR)

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"{CHROMIUM} not found: the dashboard's browser tests need Debian's chromium "
        "(`apt-get install chromium`; scripts/test installs it when run as root)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Request, sync_playwright
except ImportError:  # pragma: no cover - the dev lock pins it
    pytest.skip("the playwright package is not installed (it is in requirements-dev.lock)", allow_module_level=True)


@dataclass
class Watch:
    """What a page did: every request it made (URL and headers), its console errors and page errors."""

    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.page_errors.append(str(err)))

    def _request(self, request: Request) -> None:
        self.requests.append((request.url, dict(request.headers)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def assert_clean(self, origin: str, allowed_errors: tuple[str, ...] = ()) -> None:
        assert not self.page_errors, self.page_errors
        errors = [e for e in self.console_errors if not any(a in e for a in allowed_errors)]
        assert not errors, errors
        assert self.requests, "the page made no request at all"
        foreign = [url for url, _ in self.requests if not url.startswith(origin + "/")]
        assert not foreign, f"requests that left the service: {foreign}"


class Load:
    """A few threads of real `burn` calls, each loop bounded, until stopped."""

    def __init__(self, url: str, threads: int = 3, ms: float = 20, max_calls: int = 5000) -> None:
        self.url, self.ms, self.max_calls = url, ms, max_calls
        self.stop_event = threading.Event()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        for _ in range(self.max_calls):
            if self.stop_event.is_set():
                return
            try:
                reply = post_json(self.url + "/v1/tasks/burn", {"ms": self.ms}, timeout=30)
            except OSError as err:
                self.failures.append(repr(err))
                continue
            if reply.status != 200:
                self.failures.append(f"{reply.status} {reply.body[:200]!r}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(35)


@dataclass
class Dashboard:
    server: ServerProcess
    page: Page
    watch: Watch
    load: Load


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(context: BrowserContext, url: str) -> tuple[Page, Watch]:
    page = context.new_page()
    watch = Watch()
    watch.attach(page)
    response = page.goto(url + "/dashboard")
    assert response is not None and response.status == 200
    # The page is tested under the policy the service sends with it (no inline code, nothing foreign).
    csp = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp, csp
    return page, watch


@pytest.fixture(scope="module")
def dashboard(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    with serving(tmp_path_factory.mktemp("dashboard"), "--workers", "2") as server, Load(server.url) as load:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            page, watch = open_page(context, server.url)
            if os.environ.get("PROCBRIDGE_SCREENSHOT_DIR"):
                time.sleep(SCREENSHOT_WARMUP)  # for the docs' picture only: charts with some history
            yield Dashboard(server, page, watch, load)
        finally:
            context.close()
    assert not load.failures, load.failures[:5]


def texts(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


def worker_pids(url: str, key: str | None = None) -> set[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = http("GET", url + "/v1/workers", headers=headers)
    assert reply.status == 200, reply.body
    return {str(w["pid"]) for w in reply.json()["workers"] if w.get("pid")}


def shows_pids(page: Page, pids: set[str]) -> bool:
    return pids <= set(texts(page, "#workers-body td.c-pid"))


def shows_no_pid(page: Page, pids: set[str]) -> bool:
    """No element anywhere in the document (hidden ones included) holds a worker's pid as its text."""
    return page.locator("#workers-body tr").count() == 0 and not pids & {t.strip() for t in texts(page, "body *")}


def test_every_worker_pid_appears_and_values_change_by_themselves(dashboard: Dashboard) -> None:
    page, url = dashboard.page, dashboard.server.url
    wait_for(lambda: page.inner_text("#status") == "connected", 15, 0.05, "the status line to say connected")
    pids = worker_pids(url)
    assert len(pids) == 2
    wait_for(lambda: shows_pids(page, pids), 15, 0.05, f"every worker's pid {pids} on the page")
    # Under load the numbers move without anyone touching the page: tasks done, calls/s, the chart.
    wait_for(lambda: sum(int(t) for t in texts(page, "#workers-body td.c-done")) > 0, 15, 0.05, "tasks done > 0")
    first_done = texts(page, "#workers-body td.c-done")
    first_rate = page.inner_text("#calls-rate")
    first_updated = page.inner_text("#updated")
    wait_for(lambda: texts(page, "#workers-body td.c-done") != first_done, 10, 0.05, "tasks done to change")
    wait_for(lambda: page.inner_text("#calls-rate") not in (first_rate, "—", "0.0"), 10, 0.05, "calls/s to change")
    wait_for(lambda: page.inner_text("#updated") != first_updated, 10, 0.05, "a new snapshot")
    assert float(page.inner_text("#calls-rate")) > 0
    assert page.locator("#chart-calls canvas").count() == 1 and page.locator("#chart-latency canvas").count() == 1
    assert set(texts(page, "#workers-body .c-state .badge")) <= {"idle", "busy", "starting"}
    assert page.inner_text("#pending").isdigit()


def submit_burn(url: str, ms: float) -> str:
    reply = post_json(url + "/v1/jobs", {"task": "burn", "args": {"ms": ms}})
    assert reply.status == 202, reply.body
    return str(reply.json()["id"])


def test_a_jobs_progress_bar_moves_and_its_cancel_button_cancels_it(dashboard: Dashboard) -> None:
    page, url = dashboard.page, dashboard.server.url
    done_id = submit_burn(url, 300)  # one that finishes: a full bar beside the moving one
    job_id = submit_burn(url, 8000)  # progress every 10%: every 0.8 s
    row = f'#jobs-body tr[data-job-id="{job_id}"]'
    page.wait_for_selector(row, timeout=15_000)

    def width() -> float:
        return float(page.eval_on_selector(row + " .bar-fill", "e => e.getBoundingClientRect().width"))

    wait_for(lambda: width() > 0, 15, 0.05, "the job's bar to start filling")
    moved_from = width()
    wait_for(lambda: width() > moved_from + 1, 10, 0.05, f"the job's bar to grow past {moved_from}px")
    wait_for(
        lambda: page.inner_text(f'#jobs-body tr[data-job-id="{done_id}"] .c-status') == "succeeded", 15, 0.05,
        "the short job to show succeeded",
    )
    screenshot(page)

    assert http("GET", f"{url}/v1/jobs/{job_id}").json()["status"] == "running"
    page.click(row + " button.cancel")
    wait_for(lambda: http("GET", f"{url}/v1/jobs/{job_id}").json()["status"] == "cancelled", 10, 0.05,
             "the job to be cancelled")
    wait_for(lambda: page.inner_text(row + " .c-status") == "cancelled", 10, 0.05, "the page to show cancelled")
    assert page.locator(row + " button.cancel").count() == 0  # finished jobs get no button
    assert page.locator(f'#jobs-body tr[data-job-id="{done_id}"] button.cancel').count() == 0


def screenshot(page: Page) -> None:
    """The page under load, 1280×800 PNG: docs/dashboard.png when PROCBRIDGE_SCREENSHOT_DIR=docs."""
    target = os.environ.get("PROCBRIDGE_SCREENSHOT_DIR")
    folder = Path(target) if target else Path(os.environ.get("TMPDIR", "/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("dashboard.png" if target else f"procbridge-dashboard-{os.getpid()}.png")
    page.mouse.move(0, 0)  # no hover state in the picture
    page.screenshot(path=str(path), type="png")
    assert path.stat().st_size > 10_000


def test_no_script_error_and_no_request_leaves_the_service(dashboard: Dashboard) -> None:
    # Runs after the others on the same page (and stands alone too): a few more snapshots, then
    # everything the page did since it opened is checked.
    page = dashboard.page
    first = page.inner_text("#updated")
    wait_for(lambda: page.inner_text("#updated") != first, 10, 0.05, "another snapshot")
    dashboard.watch.assert_clean(dashboard.server.url)
    urls = [u for u, _ in dashboard.watch.requests]
    assert any(u.endswith("/v1/dashboard/events") for u in urls)
    assert any(u.endswith("/dashboard/static/uPlot.iife.min.js") for u in urls)


def test_behind_keys_nothing_without_the_key(browser: Browser, tmp_path: Path) -> None:
    with serving(tmp_path, "--workers", "1", "--api-keys", KEY) as server:
        pids = worker_pids(server.url, KEY)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            page, watch = open_page(context, server.url)
            # Without a key: the key form, the 401 on the status line, and no data at all.
            page.wait_for_selector("#key-form", state="visible", timeout=15_000)
            assert "401" in page.inner_text("#status")
            assert shows_no_pid(page, pids) and page.locator("#data").is_hidden()

            # A wrong key: refused, asked again, still nothing.
            page.fill("#key-input", "not-the-key")
            page.click("#key-form button[type=submit]")
            wait_for(lambda: "refused" in page.inner_text("#status"), 10, 0.05, "the wrong key to be refused")
            assert page.locator("#key-form").is_visible() and "401" in page.inner_text("#key-message")
            assert shows_no_pid(page, pids)
            assert page.evaluate("() => sessionStorage.length") == 0

            # The key: the data appears; the key is kept in this tab's sessionStorage only.
            page.fill("#key-input", KEY)
            page.click("#key-form button[type=submit]")
            wait_for(lambda: shows_pids(page, pids), 15, 0.05, f"the pids {pids} once the key is given")
            assert page.inner_text("#status") == "connected" and page.locator("#key-form").is_hidden()
            assert KEY in page.evaluate("() => Object.values(sessionStorage)")
            assert page.evaluate("() => localStorage.length") == 0
            assert KEY not in page.evaluate("() => document.cookie")

            # A reload in the same tab keeps it; another tab asks again.
            page.reload()
            wait_for(lambda: shows_pids(page, pids), 15, 0.05, "the pids after a reload")
            other, other_watch = open_page(context, server.url)
            other.wait_for_selector("#key-form", state="visible", timeout=15_000)
            assert shows_no_pid(other, pids)

            for w in (watch, other_watch):
                # The 401s themselves are logged by Chromium as failed resources; nothing else may be.
                w.assert_clean(server.url, allowed_errors=("status of 401",))
                assert not any(KEY in url for url, _ in w.requests), "the key appeared in a URL"
            streams = [h for u, h in watch.requests if u.endswith("/v1/dashboard/events")]
            assert {h.get("authorization") for h in streams} >= {None, "Bearer not-the-key", f"Bearer {KEY}"}
        finally:
            context.close()


def test_the_page_only_loads_its_own_files() -> None:
    """Static check of what the browser tests rely on: no inline script or style in the page."""
    static = Path(__file__).resolve().parents[2] / "service" / "dashboard" / "static"
    html = (static / "index.html").read_text()
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html
    for tag in html.split("<script")[1:]:
        assert tag.split(">", 1)[0].strip().startswith('src="/dashboard/static/'), tag[:80]
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    # The service serves the plain files directly in static/ (no sub-folders): the vendored ones sit there too.
    files = {p.name for p in static.iterdir() if p.is_file()}
    assert {"uPlot-LICENSE.txt", "VENDORED.md", "uPlot.iife.min.js", "uPlot.min.css"} <= files
    assert not [p for p in static.iterdir() if p.is_dir()]
    for name in re.findall(r'(?:src|href)="/dashboard/static/([^"]+)"', html):
        assert name in files, name
