"""Issue 24: `culbot serve` as a campus exposes it. Bounded inputs (413/400, the prompt fitted to the model's context,
max_tokens capped), a stream nobody reads stops, text streams at token boundaries, SIGTERM ends within seconds, the
OpenAI API as the official client (sync and async) uses it, and vLLM's command line for each architecture."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from culbot.pipeline_config.train_schema import AnswerConfig, InputLimits

from .servers.base import free_port, wait_for_health
from .servers.base import serve as serve_scripted
from .servers.completions import CompletionsApp, CompletionsHandler
from .test_serve import QUESTION, client, running

SMALL = InputLimits(max_body_bytes=4096, max_messages=4, max_message_chars=300, max_total_chars=700)


def scripted(trained_run, upstream: str, **spec):
    from culbot.tasks.answer import Answerer

    return Answerer.load(trained_run / "adapter", upstream=f"{upstream}/v1", served_name="m", spec=AnswerConfig(**spec))


def test_requests_past_the_limits_get_413_or_400_naming_the_limit(trained_run):
    from culbot.tasks.serve_api import create_app

    with serve_scripted(CompletionsHandler, CompletionsApp(script=lambda p: "네.")) as upstream, \
            running(create_app(scripted(trained_run, upstream, limits=SMALL))) as url:
        ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        # A body padded in a field nobody reads was accepted whole (10.5 MB, 200).
        big = httpx.post(f"{url}/v1/chat/completions", json={**ask, "padding": "x" * 5000}, timeout=30)
        assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]

        def chunked():   # no Content-Length: counted as it arrives
            yield json.dumps(ask)[:-1].encode() + b', "padding": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'
        streamed_body = httpx.post(f"{url}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}, timeout=30)
        assert streamed_body.status_code == 413
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="max_message_chars") as e:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "가" * 301}])
        assert e.value.body["param"] == "messages[0].content"
        with pytest.raises(openai.BadRequestError, match="max_messages"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}] * 5)
        with pytest.raises(openai.BadRequestError, match="max_total_chars"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "가" * 250}] * 3)
        assert c.chat.completions.create(**ask).choices[0].message.content == "네."   # within the limits: answered


def test_chat_and_the_answering_core_apply_the_same_limits(trained_run, cbnu_index, capsys, monkeypatch):
    from culbot.flows.cli import main
    from culbot.tasks.answer import Answerer, InputRejected

    a = Answerer.load(trained_run / "adapter", spec=AnswerConfig(limits=SMALL, max_new_tokens=2))
    with pytest.raises(InputRejected, match="max_message_chars"):
        a.reply("가" * 301)
    lines = iter(["가" * 5000, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(trained_run / "adapter"), "--max-new-tokens", "2", "--limit", "max_message_chars=100"]) == 0
    assert "5000 characters; at most 100 (answer.limits.max_message_chars)" in capsys.readouterr().out
    assert main(["chat", "--model", str(trained_run / "adapter"), "--limit", "max_messages=0", "--once", "x"]) == 2
    assert "--limit max_messages" in capsys.readouterr().err


def test_the_prompt_is_fitted_to_the_context_keeping_the_end_of_the_question(trained_run, cbnu_index):
    """63,578 prompt tokens went to a model with 2,048 positions. Now the earliest turns go first, then the last passages,
    then the start of the question; max_new_tokens is capped to what is left."""
    from culbot.tasks.answer import Answerer

    a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=300, no_answer_threshold=0.0))
    window = a.generator.context_window()
    assert window == 2048
    ending = "그래서 기숙사 신청은 언제 해요?"
    question = "생활관 규정에 관해 길게 설명하자면 " * 250 + ending   # about 4,900 characters
    a.spec = a.spec.model_copy(update={"limits": InputLimits(max_message_chars=10_000, max_total_chars=20_000)})
    r = a.reply(question)
    prompt_tokens = a.prompt_length(r.question, None, [])
    bos = len(a.card.special_tokens.bos)
    total = bos + a.generator.count_tokens(r.prompt)
    assert total <= window - min(300, window // 4), total
    assert r.prompt.rstrip().endswith("### 응답:") and ending in r.prompt and r.question.startswith("…")
    assert any("passages left out" in n for n in r.notes) and any("question was cut" in n for n in r.notes)
    assert prompt_tokens <= total
    r.finish()
    assert r.meter["tokens"] <= window - total   # generation stays inside the model's positions
    short = a.reply(QUESTION)
    assert not any("cut" in n for n in short.notes) and len(short.sources) >= 1


def test_max_tokens_is_capped_to_what_the_context_leaves(trained_run):
    """Through an upstream that says its max_model_len (vLLM): the request's max_tokens never runs past the context."""
    from culbot.tasks.serve_api import create_app

    app = CompletionsApp(script=lambda p: "네.", max_model_len=256)
    with serve_scripted(CompletionsHandler, app) as upstream, running(create_app(scripted(trained_run, upstream))) as url:
        r = client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "도서관 운영 시간 " * 40}], max_tokens=4000)
    sent = app.requests[-1]
    assert r.usage.prompt_tokens + sent["max_tokens"] <= 256 and sent["max_tokens"] >= 1
    assert any("capped" in n for n in r.model_extra["culbot"]["notes"])


def test_the_openai_client_sync_and_async_as_common_clients_call_it(trained_run, monkeypatch):
    from culbot.tasks.serve_api import create_app

    monkeypatch.setenv("CULBOT_TEST_KEY", "k3y")
    canned = "생활관 신청은 2월 3일부터입니다."
    with serve_scripted(CompletionsHandler, CompletionsApp(script=lambda p: "  " + canned)) as upstream, \
            running(create_app(scripted(trained_run, upstream), api_key_env="CULBOT_TEST_KEY")) as url:
        c = client(url, "k3y")
        assert c.models.retrieve("m").id == "m"                      # GET /v1/models/{id}
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4")
        # content as a list of parts, and the developer role (Open WebUI, LangChain)
        parts = c.chat.completions.create(model="m", messages=[{"role": "developer", "content": "짧게 답해"},
                                                                 {"role": "user", "content": [{"type": "text", "text": "기숙사 "},
                                                                                              {"type": "text", "text": "신청은?"}]}])
        assert parts.choices[0].message.content == canned              # not stripped differently from the stream
        assert parts.usage.completion_tokens > 1 and parts.usage.prompt_tokens > 1
        with pytest.raises(openai.BadRequestError, match="n"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == parts.usage.completion_tokens
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == canned
        # the lowercase scheme some clients send; /docs and /openapi.json are closed with the key, /health is not
        assert httpx.get(f"{url}/v1/models", headers={"authorization": "bearer k3y"}).status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 401 and httpx.get(f"{url}/openapi.json").status_code == 401
        assert httpx.get(f"{url}/openapi.json", headers={"authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        bad = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "m", "messages": [}', headers={
            "authorization": "Bearer k3y", "content-type": "application/json"}).json()["error"]
        assert bad["param"] is None and bad["message"].startswith("the request body is not valid JSON") and "character" in bad["message"]

        async def both() -> tuple[str, str]:
            ac = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
            whole = await ac.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            pieces = [ch.choices[0].delta.content or "" async for ch in
                      await ac.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True) if ch.choices]
            await ac.close()
            return whole.choices[0].message.content, "".join(pieces)
        assert asyncio.run(both()) == (canned, canned)


def test_a_refusal_reports_its_usage(trained_run, cbnu_index):
    from culbot.tasks.answer import Answerer
    from culbot.tasks.serve_api import create_app

    a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(no_answer_threshold=1e9))
    with running(create_app(a)) as url:
        r = client(url).chat.completions.create(model=a.info().id, messages=[{"role": "user", "content": QUESTION}])
    assert r.model_extra["culbot"]["refused"] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == a.generator.count_tokens(r.choices[0].message.content) and r.usage.prompt_tokens > 0


def test_a_stream_nobody_reads_stops_within_a_decoding_step(trained_run, cbnu_index):
    """A client that goes away frees the model and its queue slot at once (it kept generating until the streamer's next
    piece: 26 s on a real model)."""
    from culbot.tasks.answer import Answerer
    from culbot.tasks.serve_api import create_app

    a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=1500, no_answer_threshold=0.0))
    lock = a.generator.lock
    with running(create_app(a)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                                       "stream": True}, timeout=60) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any('"content"' in x for x in got) and lock.locked()
        gone = time.monotonic()
        while (lock.locked() or httpx.get(f"{url}/health").json()["requests_inside"]) and time.monotonic() - gone < 10:
            time.sleep(0.02)
        stopped = time.monotonic() - gone
    print(f"generation stopped {stopped:.2f} s after the client left")
    assert not lock.locked() and stopped < 2.0


def test_text_streams_at_token_boundaries_and_holds_back_only_a_possible_stop(trained_run):
    """Korean without spaces came in a few large pieces (TextIteratorStreamer waits for a space)."""
    import torch
    from transformers import AutoTokenizer

    from culbot.tasks.answer import TokenStreamer, cut_at_stops

    tok = AutoTokenizer.from_pretrained(str(trained_run / "adapter"))   # byte-level BPE: a rare syllable is several tokens
    text = "기숙사신청은이월삼일부터입니다뷁🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TokenStreamer(tok, timeout=5)
    s.put(torch.tensor([[1, 2, 3]]))   # the prompt, skipped
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    pieces = list(s)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert len(pieces) >= 8 and not any("\ufffd" in p for p in pieces)
    out = list(cut_at_stops(iter(["답은 ", "네", "입니다", "\n\n#", "## 명령어:", " 더"]), ["### 명령어:"]))
    assert out == ["답은 ", "네", "입니다", "\n\n"]   # held back only "#", then cut at the stop
    assert list(cut_at_stops(iter(["a#", "b"]), ["### 명령어:"])) == ["a", "#b"]


def test_sigterm_stops_the_server_within_seconds_while_a_stream_is_open(trained_run, tmp_path):
    """SIGTERM hung on "Waiting for background tasks" behind a 9-minute request; now answers in progress get
    --drain-seconds, and then they are cancelled."""
    slow = CompletionsApp(script=lambda p: "천천히 " * 400, piece_delay=0.2)   # about 80 s of streaming
    with serve_scripted(CompletionsHandler, slow) as upstream:
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "culbot.flows.cli", "serve", "--model", str(trained_run / "adapter"), "--upstream",
                                 f"{upstream}/v1", "--served-name", "m", "--port", str(port), "--drain-seconds", "1"],
                                stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, env=env)
        try:
            assert wait_for_health(f"http://127.0.0.1:{port}", 60), (tmp_path / "serve.log").read_text()[-2000:]
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
                lines = resp.iter_lines()
                assert any('"content"' in next(lines) for _ in range(4))
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
                took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.5)
    print(f"exited {took:.2f} s after SIGTERM")
    assert took < 6, (tmp_path / "serve.log").read_text()[-2000:]
    assert slow.disconnects == 1   # the upstream generation was closed too


def test_vllm_serves_a_gpt_neox_adapter_as_its_merged_model(trained_run, cbnu_index, tmp_path, capsys):
    """vLLM's supported-models table has no LoRA for GPTNeoXForCausalLM (polyglot-ko): --enable-lora on one fails to start."""
    import shutil

    from culbot.flows.cli import main
    from culbot.pipeline_config.train_schema import MergeAdapterConfig
    from culbot.tasks.merge_adapter import run_merge_adapter

    run = shutil.copytree(trained_run, tmp_path / "runs" / trained_run.name)
    adapter = run / "adapter"
    assert main(["serve", "--engine", "vllm", "--model", str(adapter), "--port", "9000", "--dry-run"]) == 2
    assert "no LoRA support for GPTNeoXForCausalLM" in capsys.readouterr().err
    merged = run_merge_adapter(run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], run / "eval").path
    assert main(["serve", "--engine", "vllm", "--model", str(adapter), "--index", str(cbnu_index), "--port", "9000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    vllm = next(line for line in out.splitlines() if line.startswith("vllm: "))
    assert f"vllm serve {merged.resolve()} " in vllm and "--enable-lora" not in vllm and "serving its merged model" in out
    assert f"--generation-config {merged.resolve()}" in vllm   # the run's stop ids, as training wrote them
    assert f"--chat-template {merged.resolve() / 'chat_template.jinja'}" in vllm and "--port 9001" in vllm
    assert (f"retrieval proxy: culbot serve --model {merged.resolve()} --index {cbnu_index} --upstream http://127.0.0.1:9001/v1 "
            f"--served-name culbot-{merged.name} --host 127.0.0.1 --port 9000") in out


def test_vllm_lora_on_a_llama_adapter_passes_the_runs_stop_ids(trained_run):
    """An adapter on an architecture vLLM has LoRA for stays a LoRA module; the generation_config.json training wrote
    (every end token as eos_token_id: Llama-3's <|eot_id|> where the base's config lacks it) goes to vLLM."""
    from culbot.tasks.run_folder import read_run_card
    from culbot.tasks.serve_api import vllm_command, vllm_model

    adapter = (trained_run / "adapter").resolve()
    card = read_run_card(adapter).model_copy(update={"model_type": "llama"})
    assert vllm_model(adapter, card) == adapter
    cmd = vllm_command(adapter, card, host="127.0.0.1", port=9001, served_name="llama-run")
    assert "--enable-lora" in cmd and cmd[cmd.index("--generation-config") + 1] == str(adapter)
    eos = json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    assert set(card.special_tokens.stop_ids) <= set([eos] if isinstance(eos, int) else eos)
