"""The polite client against a real local server: retries, Retry-After, robots, pacing, UA."""
import asyncio
import time

import pytest

from culbot.pipeline_config.schema import HttpPolicy
from culbot.tasks._http import FetchError, PoliteClient, RobotsDisallowed, backoff_delay, parse_retry_after
from tests.conftest import fast_http
from tests.servers.base import serve
from tests.servers.univ100 import Univ100App, Univ100Handler, make_questions

LIST = "/find/qna/question/list"


def _settings(**kw) -> HttpPolicy:
    return HttpPolicy(user_agent="Mozilla/5.0 CulbotTest", **fast_http(**kw))


def _get(base, settings, path, params=None):
    async def main():
        async with PoliteClient(settings) as c:
            r = await c.get(base + path, params=params)
            return r, dict(c.stats)

    return asyncio.run(main())


@pytest.fixture
def app():
    qs, ans = make_questions(5)
    return Univ100App(questions=qs, answers=ans)


def test_retries_429_honouring_retry_after(app):
    app.faults["list:0"] = ["429"]
    with serve(Univ100Handler, app) as base:
        t0 = time.monotonic()
        r, stats = _get(base, _settings(), LIST, {"offset": 0, "limit": 20})
        elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert app.hits["list:0"] == 2
    assert stats["retries"] == 1 and stats["status_429"] == 1
    assert elapsed >= 1.0  # Retry-After: 1 beat the 0.05 s backoff


def test_5xx_retries_are_bounded(app):
    app.faults["list:0"] = ["500"] * 10
    with serve(Univ100Handler, app) as base:
        with pytest.raises(FetchError, match=r"HTTP 500 after 3 attempts"):
            _get(base, _settings(max_retries=2), LIST, {"offset": 0})
    assert app.hits["list:0"] == 3


def test_timeouts_are_retried(app):
    app.faults["list:0"] = ["slow"]
    app.slow_s = 1.0
    with serve(Univ100Handler, app) as base:
        r, stats = _get(base, _settings(timeout_s=0.3), LIST, {"offset": 0})
    assert r.status_code == 200 and stats["timeouts"] == 1


def test_retry_after_over_the_cap_fails_clearly(app):
    app.faults["list:0"] = ["429"]
    with serve(Univ100Handler, app) as base:
        with pytest.raises(FetchError, match="over http.retry_after_max_s"):
            _get(base, _settings(retry_after_max_s=0.5), LIST, {"offset": 0})


def test_robots_disallow_is_obeyed(app):
    app.robots = "User-agent: *\nDisallow: /find/qna/question/list\n"
    with serve(Univ100Handler, app) as base:
        with pytest.raises(RobotsDisallowed):
            _get(base, _settings(), LIST, {"offset": 0})
    assert app.hits["list:0"] == 0 and app.hits["robots"] == 1


def test_robots_wildcards_and_the_longest_rule_follow_rfc_9309():
    """Measured with stdlib's robotparser: `Disallow: /*.do?mode=edit` let the edit page through, and `Allow: /search/about`
    after `Disallow: /search` was blocked (first match wins there, and `*` is literal)."""
    from tests.servers.cbnu_site import SiteApp, SiteHandler, page

    robots = "User-agent: *\nDisallow: /search\nAllow: /search/about\nDisallow: /*.do?mode=edit\n"
    pages = {p: (page("안내", "<p>본문</p>"), "text/html", "utf-8") for p in ("/search/about", "/search/list", "/board/list.do?mode=view")}
    app = SiteApp(pages=pages, robots=robots)

    async def main(base):
        out = {}
        async with PoliteClient(_settings()) as c:
            for path in ("/search/about", "/search/list", "/board/list.do?mode=edit", "/board/list.do?mode=view"):
                try:
                    out[path] = (await c.get(base + path)).status_code
                except RobotsDisallowed:
                    out[path] = "disallowed"
        return out

    with serve(SiteHandler, app) as base:
        got = asyncio.run(main(base))
    assert got == {"/search/about": 200, "/search/list": "disallowed", "/board/list.do?mode=edit": "disallowed",
                   "/board/list.do?mode=view": 200}
    assert app.hits["/search/list"] == 0 and app.hits["/robots.txt"] == 1


def test_rate_limit_spaces_requests_per_host(app):
    async def main(base):
        async with PoliteClient(_settings(rate_per_host=5.0, max_concurrency_per_host=4, respect_robots=False)) as c:
            await asyncio.gather(*(c.get(base + LIST, params={"offset": 0}) for _ in range(6)))

    with serve(Univ100Handler, app) as base:
        asyncio.run(main(base))
    gaps = [b - a for a, b in zip(app.times, app.times[1:])]
    assert len(app.times) == 6
    # 5 requests/s: starts are reserved 0.2 s apart; arrival times carry some network jitter
    assert app.times[-1] - app.times[0] >= 0.9 and min(gaps) >= 0.1


def test_user_agent_is_sent(app):
    with serve(Univ100Handler, app) as base:
        _get(base, _settings(), LIST, {"offset": 0})
    assert app.user_agents == {"Mozilla/5.0 CulbotTest"}


def test_parse_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None


def test_backoff_grows_and_is_capped():
    import random

    rng = random.Random(0)
    ds = [backoff_delay(a, 1.0, 8.0, rng) for a in range(6)]
    assert 0.5 <= ds[0] <= 1.0 and 4.0 <= ds[5] <= 8.0


def test_the_pacer_starts_a_burst_at_once_then_keeps_its_rate_and_a_crawler_gets_no_burst():
    from culbot.tasks._http import Pacer

    def starts(pacer: Pacer, n: int) -> list[float]:
        async def main():
            t0, out = time.monotonic(), []

            async def one():
                await pacer.turn()
                out.append(time.monotonic() - t0)
            await asyncio.gather(*(one() for _ in range(n)))
            return sorted(out)
        return asyncio.run(main())

    api = starts(Pacer(10.0, in_flight=100, burst=8), 18)
    assert api[7] < 0.05                      # a second's worth at once (an LLM API's first wave)
    assert 0.95 <= api[17] <= 1.15            # then 10 per second: the 18th starts at 1.0 s
    polite = starts(Pacer(10.0, in_flight=100), 5)
    assert 0.38 <= polite[4] <= 0.55          # burst 1: every start 0.1 s after the last
