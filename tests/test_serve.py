"""`culbot serve` and `culbot chat`: the OpenAI-compatible API answered through the real `openai` client (a local model and a
vLLM-like upstream), errors, the bearer token, the queue bound, the vLLM command line; the terminal chat."""
from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from culbot.pipeline_config.train_schema import AnswerConfig
from culbot.tasks.templates import render_prompt

from .servers.base import free_port, wait_for_health
from .servers.base import serve as serve_scripted
from .servers.completions import CompletionsApp, CompletionsHandler

QUESTION = "기숙사 신청은 언제 해요?"


@contextmanager
def running(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def local_answerer(trained_run, cbnu_index):
    from culbot.tasks.answer import Answerer

    return Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=16, no_answer_threshold=0.0))


def test_the_api_answers_the_openai_client_streaming_and_not(local_answerer):
    from culbot.tasks.serve_api import create_app

    with running(create_app(local_answerer)) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == [local_answerer.info().id]
        r = c.chat.completions.create(model=local_answerer.info().id, messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
        sources = r.model_extra["sources"]
        # The tiny model does not stop by itself: it hits max_tokens, and says so (issue 24: it said "stop").
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
        assert sources and {"title", "url", "doc", "score"} <= set(sources[0]) and r.model_extra["culbot"]["refused"] is False
        assert r.usage.prompt_tokens > 50
        stream = c.chat.completions.create(model=local_answerer.info().id, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=8, stream=True)
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["sources"] == sources
        assert text == r.choices[0].message.content   # greedy: the same answer either way, to the character
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_as_a_proxy_it_sends_the_training_prompt_upstream(trained_run, cbnu_index):
    """The vLLM setup: this process retrieves and renders; the upstream completions server generates."""
    from culbot.tasks.answer import Answerer
    from culbot.tasks.run_folder import read_run_card
    from culbot.tasks.serve_api import create_app

    app = CompletionsApp(script=lambda p: "2월 3일부터 신청합니다.\n\n### 명령어:\n다른 질문")
    with serve_scripted(CompletionsHandler, app) as upstream:
        a = Answerer.load(trained_run / "adapter", cbnu_index, upstream=f"{upstream}/v1", served_name="culbot-test",
                          spec=AnswerConfig(no_answer_threshold=0.0))
        with running(create_app(a)) as url:
            c = client(url)
            history = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요"}]
            r = c.chat.completions.create(model="culbot-test", messages=[*history, {"role": "user", "content": QUESTION}])
            streamed = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(model="culbot-test", messages=[{"role": "user", "content": QUESTION}], stream=True)
                               if ch.choices)
    t = read_run_card(trained_run / "adapter").template_for("cbnu")
    assert r.choices[0].message.content == "2월 3일부터 신청합니다." == streamed
    prompt = app.prompts[0]
    ctx = prompt.split("### 입력:\n")[1].split("\n\n### 응답:")[0]
    assert prompt == render_prompt(t, QUESTION, ctx) and ctx.startswith("[참고 1] ")
    assert app.requests[0]["stop"] == ["### 명령어:", "### 입력:", "### 응답:"] and app.requests[0]["model"] == "culbot-test"
    assert "no conversation form" in " ".join(r.model_extra["culbot"]["notes"])


def scripted_answerer(trained_run, upstream: str, **spec):
    from culbot.tasks.answer import Answerer

    return Answerer.load(trained_run / "adapter", upstream=f"{upstream}/v1", served_name="m", spec=AnswerConfig(**spec))


def test_bad_requests_get_openai_shaped_errors(trained_run):
    from culbot.tasks.serve_api import create_app

    with serve_scripted(CompletionsHandler, CompletionsApp(script=lambda p: "네.")) as upstream, \
            running(create_app(scripted_answerer(trained_run, upstream))) as url:
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="messages"):
            c.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError, match="last message must be the user"):
            c.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="question is empty"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "  "}])
        with pytest.raises(openai.NotFoundError, match="not served here"):
            c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
        bad = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "네."


def test_a_bearer_token_from_the_environment_is_required_when_set(trained_run, monkeypatch):
    from culbot.tasks.serve_api import create_app

    monkeypatch.setenv("CULBOT_TEST_KEY", "s3cret-token")
    with serve_scripted(CompletionsHandler, CompletionsApp(script=lambda p: "네.")) as upstream, \
            running(create_app(scripted_answerer(trained_run, upstream), api_key_env="CULBOT_TEST_KEY")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        ok = client(url, "s3cret-token").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message.content == "네."
        assert httpx.get(f"{url}/health").status_code == 200   # health stays open for load balancers


def test_past_the_queue_bound_a_request_gets_503_with_retry_after(trained_run):
    from culbot.tasks.serve_api import create_app

    def slow(prompt: str) -> str:
        time.sleep(1.5)
        return "늦은 답"

    with serve_scripted(CompletionsHandler, CompletionsApp(script=slow)) as upstream, \
            running(create_app(scripted_answerer(trained_run, upstream), max_queue=0)) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
            time.sleep(0.5)
            second = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert first.result().status_code == 200
        assert second.status_code == 503 and second.headers["retry-after"] == "5"
        assert second.json()["error"]["type"] == "server_busy"
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200   # the slot is free again


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("vllm") is None or not _cuda(), reason="needs vllm and a CUDA GPU")
def test_vllm_renders_the_training_prompt_live(trained_run, tmp_path):   # pragma: no cover - GPU hosts only
    """On a GPU host: vLLM, started by `culbot serve --engine vllm`, tokenizes a chat request exactly as training rendered it."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from culbot.pipeline_config.train_schema import MergeAdapterConfig
    from culbot.tasks.merge_adapter import run_merge_adapter
    from culbot.tasks.run_folder import read_run_card

    merged = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval").path
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "culbot.flows.cli", "serve", "--engine", "vllm", "--model", str(merged), "--port", str(port)])
    try:
        wait_for_health(f"http://127.0.0.1:{port}", 600, poll=3)
        docs = [{"title": "생활관 입사 안내", "text": "입사 신청은 2월에 합니다."}]
        got = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"model": f"culbot-{merged.name}", "add_generation_prompt": True,
                         "messages": [{"role": "user", "content": QUESTION}], "chat_template_kwargs": {"documents": docs}},
                         timeout=30).json()["tokens"]
        card, tok = read_run_card(merged), AutoTokenizer.from_pretrained(str(merged))
        from culbot.tasks.contracts import ContextFormat
        from culbot.tasks.templates import render_context

        ctx = render_context([(d["title"], d["text"]) for d in docs], card.templates.context or ContextFormat())
        want = tok(render_prompt(card.template_for("cbnu"), QUESTION, ctx), add_special_tokens=False)["input_ids"]
        assert got == want
    finally:
        proc.terminate()
        proc.wait(60)


def test_chat_once_answers_with_sources_as_json_and_shows_the_prompt(trained_run, cbnu_index, capsys):
    from culbot.flows.cli import main

    adapter = str(trained_run / "adapter")
    assert main(["chat", "--model", adapter, "--index", str(cbnu_index), "--once", QUESTION, "--json", "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == QUESTION and out["sources"] and out["prompt"].endswith("### 응답:\n")
    assert out["refused"] or out["tokens"] > 0
    assert main(["chat", "--model", adapter, "--index", str(cbnu_index), "--once", QUESTION, "--show-prompt", "--max-new-tokens", "6"]) == 0
    shown = capsys.readouterr().out
    assert "----- prompt (" in shown and f"### 명령어:\n{QUESTION}" in shown and "  [1] " in shown


def test_interactive_chat_keeps_the_conversation_until_reset(trained_run, cbnu_index, capsys, monkeypatch):
    from culbot.flows.cli import main

    lines = iter(["기숙사 신청은 언제 해요?", "그럼 주말에는요?", "/reset", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(trained_run / "adapter"), "--index", str(cbnu_index), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Culbot: {trained_run.name} (run ") and "/reset clears the conversation" in out
    assert out.count("  [1] ") == 2   # sources under each answer
    assert "no conversation form" in out   # the second question came with history, which this template cannot render
