"""Webhooks: a job's `webhook` URL gets the job's document POSTed when the job ends (docs/api.md, "Webhooks").

- `WebhookPolicy.check` decides whether a URL may be called: http(s), a host, no user or password, and
  the host and port allowed by `--webhook-allow` (service/jobs/webhook_allow.py: the SSRF guard).
  Submit calls it (422 otherwise) and the sender calls it again before every attempt, so a webhook
  stored under an older allow-list is never called once the operator has taken its host out.
- `sign` is the `X-Procbridge-Signature` of a body: `sha256=` and the hex HMAC-SHA256 with `--webhook-secret`.
- `WebhookSender` delivers. The store marks a webhook pending in the same write that makes its job
  final (`finish`, `cancel`); one timer loop here claims due webhooks (`claim_webhooks`, which leases
  them for one attempt's time plus LEASE_GRACE so no other replica takes them meanwhile) and delivers
  each in a task of its own, at most `concurrency` at once, so a slow receiver holds up nothing else.
  The loop wakes on `notify()` (a job ended here), at the earliest `next_webhook_at` (a retry, a lease
  of a dead process), and every `poll` seconds (webhooks of other replicas on a shared store).
- An attempt is delivered on any 2xx; anything else (a redirect, which is never followed, 4xx, 5xx,
  no connection, no answer within `--webhook-timeout`) fails it. A failed attempt is retried after
  1 s, 2 s, 4 s … (at most 5 min; each jittered to between half and all of it), up to `max_attempts`
  attempts in all, then the webhook is given up (`webhook_state` failed).
- Delivery is at-least-once: `close()` cancels deliveries in flight and their leases bring them back
  at the next start; a receiver dedupes on `X-Procbridge-Job` and the job's status.

The secret is never logged, and neither is a webhook URL (paths and queries often carry tokens): log
lines name the job and the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Iterable

import aiohttp
import orjson
from yarl import URL

from service.config import Config
from service.jobs.model import Job
from service.jobs.store.base import JobStore
from service.jobs.webhook_allow import DEFAULT_PORTS, AllowList, url_host
from service.metrics import WebhookDeliveries
from service.problems import Problem, invalid_argument

log = logging.getLogger("procbridge.webhooks")

MAX_ATTEMPTS = 10  # attempts in all, the first included
BACKOFF = 1.0  # before the first retry; doubled for each further one
MAX_BACKOFF = 300.0
MAX_CONCURRENT = 16  # deliveries in flight at once, per sender
POLL_EVERY = 2.0  # look for due webhooks even without a notify (other replicas, lost wake-ups)
LEASE_GRACE = 5.0  # a claimed webhook is leased for one attempt's timeout plus this
MAX_URL_LENGTH = 2048
USER_AGENT = "procbridge-webhook"
SIGNATURE_HEADER = "X-Procbridge-Signature"


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Procbridge-Signature` value of `body`: "sha256=" and the hex HMAC-SHA256 keyed with `secret`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def retry_delay(failed: int, base: float = BACKOFF, cap: float = MAX_BACKOFF,
                rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `failed` failed attempts (1, 2, …): base, 2 × base,
    4 × base, … at most `cap`, each jittered to between half and all of it (so receivers that failed
    together are not all retried in the same instant)."""
    delay = min(cap, base * 2.0 ** min(failed - 1, 64))
    return delay * (0.5 + 0.5 * rng())


class WebhookPolicy:
    """Which webhook URLs may be called: built from `--webhook-allow` (empty: none)."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allow = AllowList(allow)

    @classmethod
    def from_config(cls, config: Config) -> WebhookPolicy:
        return cls(config.webhook_allow)

    def check(self, url: object) -> str:
        """The URL in its normal form (as it will be requested), or Problem 422 `invalid-arguments`
        (field `webhook`) saying why it may not be called."""
        return str(self.target(url))

    def target(self, url: object) -> URL:
        """`check`, as the URL object the sender requests (the very parse that was checked)."""
        if not isinstance(url, str):
            raise _refuse("must be a string: an http:// or https:// URL", "not a URL")
        if not self.allow:
            raise _refuse("webhooks are turned off on this service: the operator must allow the receiving host "
                          "with --webhook-allow", "webhooks are not allowed")
        if len(url) > MAX_URL_LENGTH:
            raise _refuse(f"the URL is longer than {MAX_URL_LENGTH} characters", "too long")
        try:
            parsed = URL(url)
            port = parsed.port
        except (ValueError, TypeError):
            raise _refuse("not a valid URL", "not a URL") from None
        if parsed.scheme not in DEFAULT_PORTS:
            raise _refuse("must be an http:// or https:// URL", "not an http(s) URL")
        if not parsed.raw_host:
            raise _refuse("the URL has no host", "no host")
        if parsed.raw_user is not None or parsed.raw_password is not None:
            raise _refuse("the URL must not carry a user name or password (check the signature instead)",
                          "credentials in the URL")
        try:
            kind, host = url_host(parsed.raw_host)
        except ValueError as exc:
            raise _refuse(f"{exc}", "bad host") from None
        if port is None or port == 0:
            raise _refuse("port 0 cannot be called", "bad port")
        if not self.allow.allows(kind, host, port, DEFAULT_PORTS[parsed.scheme]):
            shown = f"[{host}]" if kind == "ipv6" else host
            raise _refuse(f"{shown}:{port} is not allowed by this service's --webhook-allow", "host not allowed")
        return parsed


def _refuse(detail: str, message: str) -> Problem:
    return invalid_argument("webhook", detail, message)


def _body(job: Job) -> bytes:
    """The job's public document as JSON (the standard library for what orjson refuses: ints past 64 bits)."""
    document = job.public()
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document, separators=(",", ":")).encode()


def _host(url: str | None) -> str:
    """The host of a webhook URL, for log lines (never the whole URL)."""
    try:
        return URL(url or "").host or "?"
    except ValueError:
        return "?"


class WebhookSender:
    """Delivers the webhooks of final jobs (module docstring). `start()` in a running loop, `notify()`
    when a job with a webhook has just ended here, `close()` at shutdown."""

    def __init__(
        self,
        store: JobStore,
        policy: WebhookPolicy,
        *,
        secret: bytes | None,
        timeout: float = 10.0,
        metrics: WebhookDeliveries | None = None,
        backoff: float = BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        max_attempts: int = MAX_ATTEMPTS,
        concurrency: int = MAX_CONCURRENT,
        poll: float = POLL_EVERY,
    ) -> None:
        self.store = store
        self.policy = policy
        self.secret = secret
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else WebhookDeliveries()
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_attempts = max(1, max_attempts)
        self.concurrency = max(1, concurrency)
        self.poll = poll
        self.delivering: dict[str, asyncio.Task[None]] = {}
        self._retrying: dict[str, float] = {}  # job id -> when this sender scheduled its retry (the gauge)
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    @classmethod
    def from_config(cls, store: JobStore, config: Config, metrics: WebhookDeliveries | None = None,
                    policy: WebhookPolicy | None = None) -> WebhookSender:
        """`policy`: the one submits are checked against (the app's), so both ends use the same."""
        secret = config.webhook_secret.encode() if config.webhook_secret is not None else None
        return cls(store, policy if policy is not None else WebhookPolicy.from_config(config), secret=secret,
                   timeout=config.webhook_timeout, metrics=metrics)

    async def start(self) -> None:
        if self.policy.allow and self.secret is None:
            log.warning("--webhook-allow is set without --webhook-secret: webhooks are delivered unsigned, "
                        "so their receivers cannot tell them from forgeries")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            cookie_jar=aiohttp.DummyCookieJar(),  # a receiver's cookies are not sent to the next one
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # no proxy from the environment: the allow-list is about where requests go
        )
        self._loop_task = asyncio.ensure_future(self._loop())

    def notify(self) -> None:
        """A job with a webhook has just ended: look for due webhooks now, not at the next poll."""
        if not self._closed:
            self._wake.set()

    async def close(self) -> None:
        """Stop looking and cancel the deliveries in flight: their leases run out and they are
        delivered again after the next start (at-least-once)."""
        self._closed = True
        self._wake.set()  # should a store client swallow the cancel, the loop still sees it is closed
        tasks = [t for t in (self._loop_task, *self.delivering.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @property
    def pending(self) -> int:
        """Deliveries this sender is making, or has scheduled a retry of (`procbridge_webhooks_pending`)."""
        return len(self.delivering) + len(self._retrying)

    # -- the timer loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                wait = await self._claim()
            except Exception:
                log.exception("could not look for webhooks to deliver; trying again in %g s", self.poll)
                wait = self.poll
            if self._closed:
                return
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel (close()) that
            # comes as the wake-up does, and the loop would go on
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _claim(self) -> float:
        """Start a delivery for each due webhook, as many as there are free places; return how long
        to wait before looking again (a notify or the end of a delivery wakes the loop earlier)."""
        free = self.concurrency - len(self.delivering)
        if free <= 0:
            return self.poll
        now = time.time()
        jobs = await self.store.claim_webhooks(now, lease_until=now + self.timeout + LEASE_GRACE, limit=free)
        for job in jobs:
            if job.id in self.delivering:  # our attempt outlived its lease: leave the claim to run out
                continue
            self._retrying.pop(job.id, None)
            task = asyncio.ensure_future(self._deliver(job))
            self.delivering[job.id] = task
            task.add_done_callback(functools.partial(self._delivered, job.id))
        self._forget_overdue(now)
        if len(jobs) >= free:
            return self.poll
        next_at = await self.store.next_webhook_at()
        if next_at is None:
            return self.poll
        wait = next_at - time.time()
        if wait <= 0 and not jobs:  # due, yet nothing claimed: do not spin on it
            return min(self.poll, 0.05)
        return min(self.poll, max(0.0, wait))

    def _delivered(self, job_id: str, _task: object = None) -> None:
        self.delivering.pop(job_id, None)
        self.metrics.pending = self.pending
        self.notify()  # a place is free, and a retry may have been scheduled: look again

    def _forget_overdue(self, now: float) -> None:
        """A retry still not claimed here a lease and a poll after it was due was taken by another
        replica (shared store): it is that one's to count."""
        late = now - self.timeout - LEASE_GRACE - self.poll
        for job_id in [j for j, due in self._retrying.items() if due < late]:
            del self._retrying[job_id]
        self.metrics.pending = self.pending

    # -- one attempt ---------------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        attempt = job.webhook_attempts + 1
        try:
            target = self.policy.target(job.webhook)
        except Problem as refused:  # the allow-list changed since the job was submitted
            await self._record(job, attempt, f"refused: {refused.detail}", retry=False)
            return
        await self._record(job, attempt, await self._post(job, target, attempt))

    async def _post(self, job: Job, target: URL, attempt: int) -> str | None:
        """POST the job's document; None when delivered, else why the attempt failed (no URL in it)."""
        assert self._session is not None
        body = _body(job)
        headers = {"Content-Type": "application/json", "X-Procbridge-Job": job.id,
                   "X-Procbridge-Delivery": str(attempt)}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        try:
            async with asyncio.timeout(self.timeout):  # the session's timeout too; this one bounds it all
                async with self._session.post(target, data=body, headers=headers, allow_redirects=False) as answer:
                    status = answer.status
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except aiohttp.ClientConnectorError as exc:
            return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or type(exc.os_error).__name__}"
        except (aiohttp.ClientError, OSError) as exc:  # str() of some of these holds the URL
            return f"the request failed ({type(exc).__name__})"
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status} (redirects are not followed)"
        return f"HTTP {status}"

    async def _record(self, job: Job, attempt: int, error: str | None, *, retry: bool = True) -> None:
        host = _host(job.webhook)
        if error is None:
            outcome, next_at = "delivered", None
        elif retry and attempt < self.max_attempts:
            outcome, next_at = "failed", time.time() + retry_delay(attempt, self.backoff, self.max_backoff)
        else:
            outcome, next_at = "gave_up", None
        try:
            await self.store.webhook_attempted(job.id, delivered=error is None, next_at=next_at, error=error)
        except Exception:
            log.exception("could not record a webhook delivery of job %s; it is made again when its lease ends",
                          job.id)
            return
        self.metrics.count(outcome)
        if outcome == "delivered":
            log.debug("webhook of job %s delivered to %s (attempt %d)", job.id, host, attempt)
        elif outcome == "failed":
            assert next_at is not None
            self._retrying[job.id] = next_at
            log.info("webhook of job %s to %s: attempt %d of %d failed (%s); next in %.1f s", job.id, host, attempt,
                     self.max_attempts, error, next_at - time.time())
        else:
            log.warning("webhook of job %s given up after %d attempts: %s", job.id, attempt, error)
        self.metrics.pending = self.pending

