"""Pacing, retries and the polite async HTTP client shared by the crawlers and the LLM client.

The pacer (requests per second, requests in flight) and the retry loop (exponential
backoff with jitter, honouring Retry-After) live here once. The polite client adds
robots.txt, the User-Agent and timeouts for the crawlers.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import httpx

from culbot.pipeline_config.schema import HttpPolicy, RetryPolicy

log = logging.getLogger("culbot.http")

RETRY_STATUS = {429, 500, 502, 503, 504}
T = TypeVar("T")


class FetchError(RuntimeError):
    """A URL could not be fetched after the allowed retries (or must not be retried)."""

    def __init__(self, url: str, reason: str, status: int | None = None):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.status = url, reason, status


class RobotsDisallowed(FetchError):
    """robots.txt disallows this URL for our User-Agent."""


class Transient(Exception):
    """One attempt failed in a way worth retrying (429, 5xx, timeout, connection error)."""

    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status


class GaveUp(Exception):
    """Retries are spent, or the server asked to wait longer than allowed."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason, self.status = reason, status


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


async def with_retries(attempt: Callable[[], Awaitable[T]], rule: RetryPolicy, *, what: str = "request", setting: str = "retry_after_max_s",
                       on_retry: Callable[[Transient, float, int], None] | None = None) -> T:
    """Call ``attempt`` until it returns; a :class:`Transient` failure is retried after a backoff (or Retry-After) as
    ``rule`` says. ``setting`` names the rule's retry_after_max_s in the config, for the message that refuses a wait."""
    last: Transient | None = None
    for n in range(rule.max_retries + 1):
        try:
            return await attempt()
        except Transient as e:
            last = e
        if n == rule.max_retries:
            break
        delay = backoff_delay(n, rule.backoff_base_s, rule.backoff_max_s)
        if last.retry_after is not None:
            if last.retry_after > rule.retry_after_max_s:
                raise GaveUp(f"{last.reason}; server asks to wait {last.retry_after:.0f}s, over {setting}={rule.retry_after_max_s:.0f}", last.status)
            delay = max(delay, last.retry_after)
        if on_retry:
            on_retry(last, delay, n)
        log.info("retrying %s in %.1fs (%s, attempt %d/%d)", what, delay, last.reason, n + 1, rule.max_retries)
        await asyncio.sleep(delay)
    raise GaveUp(f"{last.reason} after {rule.max_retries + 1} attempts", last.status)


class Pacer:
    """At most ``in_flight`` requests at once, started at ``rate_per_s`` on average: a request may start at once while
    no more than ``burst`` have started in the last ``burst`` intervals (the generic cell rate algorithm). ``burst=1``
    spaces every start 1/``rate_per_s`` apart (a polite crawler); an API client may start up to a second's worth at
    once, as per-second rate limits allow, instead of spending the first wave's stagger (0.7 s of 6 s in bench_data)."""

    def __init__(self, rate_per_s: float, in_flight: int, burst: int = 1):
        self.sem = asyncio.Semaphore(in_flight)
        self.interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self.slack = (max(1, burst) - 1) * self.interval   # how far ahead of the schedule a start may be
        self.lock = asyncio.Lock()
        self.next_at = 0.0   # the theoretical time of the next start, were starts evenly spaced

    async def turn(self) -> None:
        # Reserve the next start under the lock, sleep outside it.
        async with self.lock:
            now = time.monotonic()
            self.next_at = max(self.next_at, now)
            start = max(now, self.next_at - self.slack)
            self.next_at += self.interval
        if start > now:
            await asyncio.sleep(start - now)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold an in-flight slot from our turn to start until the answer is in."""
        async with self.sem:
            await self.turn()
            yield


class Robots:
    """A host's robots.txt rules, read by protego as RFC 9309 says: `*` and `$` wildcards, the longest matching rule
    wins and Allow wins a tie (stdlib's robotparser takes the first match and reads `*` literally)."""

    def __init__(self, rules=None, default: bool = True):
        self.rules, self.default = rules, default

    @classmethod
    def parse(cls, text: str) -> "Robots":
        from protego import Protego

        return cls(Protego.parse(text))

    @classmethod
    def allow_all(cls) -> "Robots":
        return cls(None, True)

    @classmethod
    def disallow_all(cls) -> "Robots":
        return cls(None, False)

    def can_fetch(self, url: str, user_agent: str) -> bool:
        return self.default if self.rules is None else self.rules.can_fetch(url, user_agent)


@dataclass
class _Host:
    pacer: Pacer
    robots: Robots | None = None
    robots_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PoliteClient:
    """``async with PoliteClient(policy) as c: r = await c.get(url)``."""

    def __init__(self, policy: HttpPolicy, *, transport: httpx.AsyncBaseTransport | None = None):
        self.policy = policy
        self.rule: RetryPolicy = policy
        self._client = httpx.AsyncClient(
            headers={"User-Agent": policy.user_agent},
            timeout=httpx.Timeout(policy.timeout_s),
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
            self._hosts[key] = _Host(Pacer(self.policy.rate_per_host, self.policy.max_concurrency_per_host))
        return self._hosts[key]

    async def _robots(self, url: str, host: _Host) -> Robots:
        async with host.robots_lock:
            if host.robots is None:
                parts = urlsplit(url)
                robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
                try:
                    r = await self._request(robots_url, host)
                    if r.status_code in (401, 403):
                        host.robots = Robots.disallow_all()
                    elif r.status_code >= 400:
                        host.robots = Robots.allow_all()   # no robots.txt: everything allowed
                    else:
                        host.robots = Robots.parse(r.text)
                except FetchError as e:
                    # RFC 9309: an unreachable robots.txt means "assume complete disallow".
                    log.warning("robots.txt for %s unreachable (%s); treating the host as disallowed", parts.netloc, e.reason)
                    host.robots = Robots.disallow_all()
            return host.robots

    async def get(self, url: str, *, headers: dict[str, str] | None = None, params: dict | None = None) -> httpx.Response:
        host = self._host(url)
        if self.policy.respect_robots:
            rp = await self._robots(url, host)
            full = str(httpx.URL(url, params=params)) if params else url
            if not rp.can_fetch(full, self.policy.user_agent):
                self.stats["robots_disallowed"] += 1
                raise RobotsDisallowed(full, "disallowed by robots.txt")
        return await self._request(url, host, headers=headers, params=params)

    async def _request(self, url: str, host: _Host, *, headers=None, params=None) -> httpx.Response:
        async def attempt() -> httpx.Response:
            async with host.pacer.slot():
                self.stats["requests"] += 1
                try:
                    r = await self._client.get(url, headers=headers, params=params)
                except httpx.TimeoutException:
                    self.stats["timeouts"] += 1
                    raise Transient("timed out") from None
                except httpx.TransportError as e:
                    self.stats["transport_errors"] += 1
                    raise Transient(f"transport error: {type(e).__name__}") from None
            self.stats[f"status_{r.status_code}"] += 1
            if r.status_code in RETRY_STATUS:
                raise Transient(f"HTTP {r.status_code}", parse_retry_after(r.headers.get("Retry-After")), r.status_code)
            return r

        def counted(*_) -> None:
            self.stats["retries"] += 1

        try:
            return await with_retries(attempt, self.rule, what=url, setting="http.retry_after_max_s", on_retry=counted)
        except GaveUp as e:
            raise FetchError(url, e.reason, e.status) from None


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
