"""The answering core: the training prompt exactly (also as the tokenizer's chat template), retrieval and sources,
refusal below the threshold, stop strings, history, streaming."""
from __future__ import annotations

import pytest

from culbot.pipeline_config.train_schema import AnswerConfig
from culbot.tasks.contracts import ContextFormat, TemplateSet
from culbot.tasks.templates import available_templates, chat_template_jinja, chat_templates, load_template, render_context, render_prompt

from .test_templates import tiny_chat_tokenizer

DOCS = [{"title": "생활관 {text} 안내", "text": "입사 신청은 2월 {n} 3일부터"}, {"title": "장학금", "text": "성적 \"장학\"\n\\n 끝 | 표"}]
CASES = [("기숙사 {input} 신청은 언제 해요?", "", None), ("요약하세요", "입력 {instruction} 문장", None), ("질문", "", DOCS), ("질문", "입력", DOCS)]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_tokenizer(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.mark.parametrize("name", available_templates())
def test_the_chat_template_renders_the_training_prompt_byte_for_byte(name, chat_tok):
    """Every shipped template, with and without input and retrieved context (documents, the HF/vLLM convention)."""
    t, fmt = load_template(name), ContextFormat()
    jinja = chat_template_jinja(t, fmt, chat_tok.chat_template if t.kind == "chat" else None)
    for instruction, input_, docs in CASES:
        context = render_context([(d["title"], d["text"]) for d in docs], fmt) if docs else ""
        want = render_prompt(t, instruction, f"{context}\n\n{input_}" if context and input_ else context or input_, chat_tok)
        message = {"role": "user", "content": instruction, **({"input": input_} if input_ else {})}
        got = chat_tok.apply_chat_template([message], chat_template=jinja, documents=docs, tokenize=False, add_generation_prompt=True)
        assert got == want, (name, instruction, input_, bool(docs))


def test_alpaca_templates_render_only_the_last_turn_and_chat_keeps_the_conversation(chat_tok):
    history = [{"role": "user", "content": "도서관은?"}, {"role": "assistant", "content": "9시에 엽니다."}, {"role": "user", "content": "주말은요?"}]
    cbnu = chat_template_jinja(load_template("cbnu"))
    assert chat_tok.apply_chat_template(history, chat_template=cbnu, tokenize=False) == render_prompt(load_template("cbnu"), "주말은요?")
    chat = load_template("persona")
    got = chat_tok.apply_chat_template(history, chat_template=chat_template_jinja(chat, None, chat_tok.chat_template), tokenize=False,
                                       add_generation_prompt=True)
    assert got == render_prompt(chat, "주말은요?", "", chat_tok, history=[("도서관은?", "9시에 엽니다.")])
    assert got == f"<|system|>\n{chat.system}\n<|user|>\n도서관은?\n<|assistant|>\n9시에 엽니다.\n<|user|>\n주말은요?\n<|assistant|>\n"


def test_chat_templates_default_to_the_serving_source():
    ts = TemplateSet(map={"cbnu": "cbnu", "kullm": "kullm"}, default="kullm",
                     templates={"cbnu": load_template("cbnu"), "kullm": load_template("kullm")})
    out = chat_templates(ts, "cbnu")
    assert sorted(out) == ["cbnu", "default", "kullm"] and out["default"] == out["cbnu"]


def test_cut_at_stops_holds_back_a_split_stop_string():
    from culbot.tasks.answer import cut_at_stops, stop_strings

    stops = stop_strings(load_template("kullm"))
    assert stops == ["### 명령어:", "### 입력:", "### 응답:"]
    chunks = ["9시에 ", "엽니다.\n\n#", "## 명", "령어:\n다음"]
    out = list(cut_at_stops(iter(chunks), stops))
    assert "".join(out) == "9시에 엽니다.\n\n" and out[0] == "9시에 "   # streamed, not buffered to the end
    assert "".join(cut_at_stops(iter(["끝까지 ", "#", "갑니다"]), stops)) == "끝까지 #갑니다"


def test_refusal_names_the_office_of_the_topic():
    from culbot.tasks.answer import refusal_text

    spec = AnswerConfig()
    assert "생활관 행정실" in refusal_text("기숙사 통금은 몇 시예요?", spec)
    assert "043-261-2114" in refusal_text("총장님 생일은?", spec)


def test_an_adapter_tokenizer_carries_the_training_prompt_as_its_chat_template(trained_run):
    from transformers import AutoTokenizer

    from culbot.tasks.run_folder import read_run_card

    adapter = trained_run / "adapter"
    tok, card = AutoTokenizer.from_pretrained(str(adapter)), read_run_card(adapter)
    t = card.template_for("cbnu")
    assert (adapter / "chat_template.jinja").is_file()
    q = "생활관 입사 신청은 언제 하나요?"
    assert tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) == render_prompt(t, q)
    docs = [{"title": "생활관 입사 안내", "text": "입사 신청은 2월에 합니다."}]
    ctx = render_context([("생활관 입사 안내", "입사 신청은 2월에 합니다.")], card.templates.context or ContextFormat())
    assert tok.apply_chat_template([{"role": "user", "content": q}], documents=docs, tokenize=False) == render_prompt(t, q, ctx)


def test_the_answerer_retrieves_renders_the_training_prompt_and_streams(trained_run, cbnu_index):
    from culbot.tasks.answer import Answerer
    from culbot.tasks.run_folder import read_run_card

    a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=12, no_answer_threshold=0.0))
    card = read_run_card(trained_run / "adapter")
    r = a.reply("기숙사 신청은 언제 해요?")
    deltas = list(r)
    assert r.sources and r.sources[0].title and not r.refused
    assert r.prompt == render_prompt(card.template_for("cbnu"), "기숙사 신청은 언제 해요?", r.context)
    assert r.context.startswith("[참고 1] ") and r.sources[0].title in r.context
    assert "".join(deltas).strip() == r.text and r.first_token_s is not None
    assert a.info().template == card.template_for("cbnu").name and a.info().kind == "adapter"


def test_below_the_threshold_it_refuses_without_generating(trained_run, cbnu_index):
    from culbot.tasks.answer import Answerer

    a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(no_answer_threshold=1e9))
    r = a.answer("기숙사 통금은 몇 시예요?")
    assert r.refused and r.prompt == "" and r.sources == [] and "생활관 행정실" in r.text and r.tokens == a.generator.count_tokens(r.text) > 0   # usage counts the refusal given
    assert "< no-answer threshold" in r.notes[0]


def test_history_with_an_alpaca_template_is_dropped_and_said(trained_run):
    from culbot.tasks.answer import Answerer

    a = Answerer.load(trained_run / "adapter", spec=AnswerConfig(max_new_tokens=4))
    r = a.answer("주말에도 여나요?", history=[("도서관은 몇 시에 여나요?", "9시에 엽니다.")])
    assert "no conversation form" in " ".join(r.notes) and "no index" in " ".join(r.notes)
    assert "도서관은 몇 시에" not in r.prompt and r.prompt.endswith("### 명령어:\n주말에도 여나요?\n\n### 응답:\n")


def test_a_model_that_says_nothing_gets_the_empty_answer_notice_not_a_blank(trained_run, cbnu_index):
    from culbot.tasks.answer import Answerer

    from .servers.base import serve
    from .servers.completions import CompletionsApp, CompletionsHandler

    with serve(CompletionsHandler, CompletionsApp(script=lambda p: "  \n### 명령어:\n다음")) as url:
        a = Answerer.load(trained_run / "adapter", cbnu_index, upstream=f"{url}/v1", spec=AnswerConfig(no_answer_threshold=0.0))
        r = a.answer("기숙사 신청은 언제 해요?")
    assert r.empty and not r.refused and r.text == AnswerConfig().empty_answer and r.sources
    assert "generated no text" in " ".join(r.notes) and r.as_dict()["empty"] is True


def test_a_cancelled_reply_stops_generating(trained_run):
    """What the API does when a streaming client goes away: the model is freed for the next request."""
    from culbot.tasks.answer import Answerer

    base = Answerer.load(trained_run / "adapter", spec=AnswerConfig(max_new_tokens=400, repetition_penalty=1.0)).base_model()
    r = base.reply("도서관은 몇 시에 여나요?")   # the base tiny model never ends early: 400 tokens unless stopped
    it = iter(r)
    next(it)
    r.cancel()
    rest = list(it)
    assert r.meter["tokens"] < 400 and len(rest) < 400


def test_serving_refuses_at_the_index_s_own_threshold_and_says_which_it_uses(trained_run, cbnu_index, caplog):
    """Issue 23: chat, serve and demo applied the threshold eval measured on the sample index to any --index, silently."""
    import logging

    from culbot.tasks.answer import Answerer
    from culbot.tasks.retrieval import Retriever

    own = Retriever(cbnu_index).threshold
    with caplog.at_level(logging.INFO, logger="culbot.answer"):
        a = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=4))
    assert a.threshold == own and a.info().no_answer_threshold == own and "calibrated for index" in a.info().threshold_source
    assert f"no-answer threshold {own}: calibrated for index" in caplog.text
    assert a.reply("학교 앞 맛집 추천해 주세요").refused and not a.reply("중앙도서관 평일 운영 시간이 어떻게 되나요?").refused
    fixed = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=4, no_answer_threshold=0.0))
    assert fixed.threshold == 0.0 and f"not the index's own {own}" in fixed.threshold_source
