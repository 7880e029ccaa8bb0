"""`culbot demo` in a real headless browser: Debian's chromium driven by Playwright asks a question, and the streamed
answer and its sources appear under it; the page shows the model's version. A screenshot goes to the test's tmp folder."""
from __future__ import annotations

import shutil
import socket

import pytest

from culbot.pipeline_config.train_schema import AnswerSpec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium fonts-noto-cjk; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_answers_in_a_browser_with_sources_and_the_model_version(trained_run, cbnu_index, tmp_path):
    from playwright.sync_api import sync_playwright

    from culbot.tasks.answer import Answerer
    from culbot.tasks.demo import build_demo

    answerer = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerSpec(max_new_tokens=12, no_answer_threshold=0.0))
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
