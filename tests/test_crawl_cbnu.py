"""CBNU page crawl against a real local site: boilerplate, links, encodings, refresh, quarantine."""
from culbot.pipeline_config.schema import CbnuConfig
from culbot.tasks import _store
from culbot.tasks.crawl_cbnu import run_crawl
from tests.conftest import fast_http
from tests.servers.base import serve
from tests.servers.cbnu_site import SiteApp, SiteHandler, page

LONG = "충북대학교 중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다. " * 4


def _site() -> SiteApp:
    links = ["/www/library.do", "/www/dorm.do", "/www/files/guide.pdf", "/private/admin.do", "/www/missing.do", "https://example.com/out"]
    return SiteApp(pages={
        "/www/index.do": (page("충북대학교", f"<p>{LONG}</p>", links), "text/html", "utf-8"),
        "/www/library.do": (page("도서관 안내", f"<p>{LONG}</p><p>열람실은 시험기간에 24시간 개방합니다.</p>", ["/www/index.do", "/www/deep.do"]), "text/html", "utf-8"),
        "/www/dorm.do": (page("생활관 안내", "<p>" + "생활관은 개성재, 양성재, 양진재로 구성되어 있습니다. " * 4 + "</p>", charset="euc-kr"), "text/html", "euc-kr"),
        "/www/deep.do": (page("깊은 페이지", f"<p>{LONG}</p>"), "text/html", "utf-8"),
        "/www/files/guide.pdf": ("%PDF-1.4", "application/pdf", "latin-1"),
        "/private/admin.do": (page("관리자", f"<p>{LONG}</p>"), "text/html", "utf-8"),
    })


def _cfg(base, out, **kw) -> CbnuConfig:
    return CbnuConfig(source="site", seeds=[base + "/www/index.do"], allowed_domains=["127.0.0.1"], out_dir=out,
                      max_depth=1, min_text_chars=50, http=fast_http(), **kw)


def test_site_crawl_extracts_main_text_and_follows_allowed_links(tmp_path):
    app = _site()
    with serve(SiteHandler, app) as base:
        m = run_crawl(_cfg(base, tmp_path / "c"))
    pages = {p["url"].replace(base, ""): p for p in _store.read_jsonl(tmp_path / "c" / "pages.jsonl")}
    assert sorted(pages) == ["/www/dorm.do", "/www/index.do", "/www/library.do"]      # depth 1, pdf excluded
    assert "/www/deep.do" not in app.hits and "/www/files/guide.pdf" not in app.hits   # depth / exclude pattern
    assert app.hits["/private/admin.do"] == 0                                          # robots.txt
    lib = pages["/www/library.do"]
    assert lib["title"] == "도서관 안내"
    assert lib["text"].startswith("도서관 안내\n충북대학교 중앙도서관은")
    for boiler in ("로그인", "Copyright", "tracking", "충대로"):
        assert boiler not in lib["text"]
    assert "개성재, 양성재, 양진재" in pages["/www/dorm.do"]["text"]                   # EUC-KR decoded
    reasons = sorted(q["reason"] for q in _store.read_jsonl(tmp_path / "c" / "quarantine.jsonl"))
    assert reasons == ["http_404", "http_404", "robots_disallowed"]   # / (header logo link) and /www/missing.do
    assert m.counts["new"] == 3 and m.counts["pages"] == 3
    assert len(list((tmp_path / "c" / "html").glob("*.html"))) == 3


def test_refresh_skips_unchanged_pages_and_detects_changes(tmp_path):
    app = _site()
    with serve(SiteHandler, app) as base:
        first = run_crawl(_cfg(base, tmp_path / "c"))
        again = run_crawl(_cfg(base, tmp_path / "c"))
        assert again.counts["unchanged"] == 3 and again.counts["not_modified"] == 3
        assert again.content_hash == first.content_hash
        html, ct, cs = app.pages["/www/library.do"]
        app.pages["/www/library.do"] = (html.replace("24시간", "새벽 2시까지"), ct, cs)
        third = run_crawl(_cfg(base, tmp_path / "c"))
    assert third.counts["changed"] == 1 and third.counts["unchanged"] == 2
    assert third.content_hash != first.content_hash


def test_max_pages_is_respected_and_reported(tmp_path):
    app = _site()
    with serve(SiteHandler, app) as base:
        m = run_crawl(_cfg(base, tmp_path / "c", max_pages=2))
    assert m.counts["fetched"] == 2 and m.counts["not_fetched_max_pages"] >= 1


def test_a_deterministic_parse_error_is_not_retried_by_prefect():
    from culbot.tasks._http import FetchError
    from culbot.tasks._prefect import network_failure

    assert network_failure(FetchError("https://x", "HTTP 503 after 5 attempts")) and network_failure(ConnectionError("reset"))
    assert not network_failure(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")) and not network_failure(ValueError("bad page"))


def test_a_crawl_stopped_by_a_malformed_page_is_not_retried_but_one_stopped_by_the_server_is():
    from culbot.tasks._http import FetchError
    from culbot.tasks._prefect import network_failure
    from culbot.tasks.crawl_univ100 import CrawlIncomplete

    assert not network_failure(CrawlIncomplete("u", "offset 40 malformed", network=False))
    try:
        try:
            raise FetchError("https://x/list", "HTTP 500 after 5 attempts")
        except FetchError as e:
            raise CrawlIncomplete("u", "offset 20 failed", network=True) from e
    except CrawlIncomplete as e:
        assert network_failure(e)
