"""The polite async HTTP client shared by both crawlers.

Rate limit, concurrency cap, robots.txt, User-Agent, timeouts and bounded
retries (exponential backoff with jitter, honouring Retry-After) live here once.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import httpx

log = logging.getLogger("culbot.http")

RETRY_STATUS = {429, 500, 502, 503, 504}


class FetchError(RuntimeError):
    """A URL could not be fetched after the allowed retries (or must not be retried)."""

    def __init__(self, url: str, reason: str, status: int | None = None):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.status = url, reason, status


class RobotsDisallowed(FetchError):
    """robots.txt disallows this URL for our User-Agent."""


@dataclass
class HttpSettings:
    user_agent: str
    rate_per_host: float = 1.0          # requests per second per host
    max_concurrency_per_host: int = 2
    timeout_s: float = 20.0
    max_retries: int = 4
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    respect_robots: bool = True


@dataclass
class _Host:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sem: asyncio.Semaphore | None = None
    next_at: float = 0.0
    robots: RobotFileParser | None = None
    robots_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [d/2, d], d = min(cap, base·2^attempt)."""
    d = min(cap, base * (2 ** attempt))
    return (rng or random).uniform(d / 2, d)


class PoliteClient:
    """``async with PoliteClient(settings) as c: r = await c.get(url)``."""

    def __init__(self, settings: HttpSettings, *, transport: httpx.AsyncBaseTransport | None = None):
        self.s = settings
        self._client = httpx.AsyncClient(
            headers={"User-Agent": settings.user_agent},
            timeout=httpx.Timeout(settings.timeout_s),
            follow_redirects=True,
            transport=transport,
        )
        self._hosts: dict[str, _Host] = {}
        self.stats: Counter = Counter()

    async def __aenter__(self) -> "PoliteClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    def _host(self, url: str) -> _Host:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        if key not in self._hosts:
            self._hosts[key] = _Host(sem=asyncio.Semaphore(self.s.max_concurrency_per_host))
        return self._hosts[key]

    async def _wait_turn(self, host: _Host) -> None:
        # Reserve the next slot under the lock, sleep outside it: requests to one
        # host start at least 1/rate apart even with several in flight.
        interval = 1.0 / self.s.rate_per_host if self.s.rate_per_host > 0 else 0.0
        async with host.lock:
            now = time.monotonic()
            start = max(now, host.next_at)
            host.next_at = start + interval
        if start > now:
            await asyncio.sleep(start - now)

    async def _robots(self, url: str, host: _Host) -> RobotFileParser:
        async with host.robots_lock:
            if host.robots is None:
                parts = urlsplit(url)
                robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
                rp = RobotFileParser(robots_url)
                try:
                    r = await self._request(robots_url, host)
                    if r.status_code in (401, 403):
                        rp.disallow_all = True
                    elif r.status_code >= 400:
                        rp.allow_all = True   # no robots.txt: everything allowed
                    else:
                        rp.parse(r.text.splitlines())
                except FetchError as e:
                    # RFC 9309: an unreachable robots.txt means "assume complete disallow".
                    log.warning("robots.txt for %s unreachable (%s); treating the host as disallowed", parts.netloc, e.reason)
                    rp.disallow_all = True
                host.robots = rp
            return host.robots

    async def get(self, url: str, *, headers: dict[str, str] | None = None, params: dict | None = None) -> httpx.Response:
        host = self._host(url)
        if self.s.respect_robots:
            rp = await self._robots(url, host)
            full = str(httpx.URL(url, params=params)) if params else url
            if not rp.can_fetch(self.s.user_agent, full):
                self.stats["robots_disallowed"] += 1
                raise RobotsDisallowed(full, "disallowed by robots.txt")
        return await self._request(url, host, headers=headers, params=params)

    async def _request(self, url: str, host: _Host, *, headers=None, params=None) -> httpx.Response:
        last_reason = ""
        for attempt in range(self.s.max_retries + 1):
            await self._wait_turn(host)
            wait = None
            async with host.sem:
                self.stats["requests"] += 1
                try:
                    r = await self._client.get(url, headers=headers, params=params)
                except httpx.TimeoutException:
                    last_reason, status = "timed out", None
                    self.stats["timeouts"] += 1
                except httpx.TransportError as e:
                    last_reason, status = f"transport error: {type(e).__name__}", None
                    self.stats["transport_errors"] += 1
                else:
                    status = r.status_code
                    self.stats[f"status_{status}"] += 1
                    if status not in RETRY_STATUS:
                        return r
                    last_reason = f"HTTP {status}"
                    wait = parse_retry_after(r.headers.get("Retry-After"))
            if attempt == self.s.max_retries:
                break
            delay = backoff_delay(attempt, self.s.backoff_base_s, self.s.backoff_max_s)
            if wait is not None:
                if wait > self.s.retry_after_max_s:
                    raise FetchError(url, f"{last_reason}; server asks to wait {wait:.0f}s, over retry_after_max_s={self.s.retry_after_max_s:.0f}", status)
                delay = max(delay, wait)
            self.stats["retries"] += 1
            log.info("retrying %s in %.1fs (%s, attempt %d/%d)", url, delay, last_reason, attempt + 1, self.s.max_retries)
            await asyncio.sleep(delay)
        raise FetchError(url, f"{last_reason} after {self.s.max_retries + 1} attempts", status)


class Progress:
    """Logs count, rate and ETA every ``every_s`` seconds (and at the end)."""

    def __init__(self, what: str, total: int | None = None, logger: logging.Logger | None = None, every_s: float = 5.0):
        self.what, self.total, self.log, self.every_s = what, total, logger or log, every_s
        self.done = 0
        self.t0 = self._last = time.monotonic()

    def advance(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line())

    def line(self) -> str:
        el = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / el
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            return f"{self.what}: {self.done}/{self.total} ({rate:.2f}/s, ETA {left:.0f}s)"
        return f"{self.what}: {self.done} ({rate:.2f}/s, {el:.0f}s)"
