"""The web demo: a gradio chat over the answering core, as upstream's demos were gradio apps.

Run as: culbot demo --model artifacts/models/<hash> [--index artifacts/indexes/<hash>] [--port 7860]

Answers stream; the passages each answer was given with are listed under it as links; a switch turns
retrieval off; the header says which model this is (run, dataset version, template, eval figures, index).
With a feedback store, every answer is kept under its id, each has 👍/👎, and "정답 알려주기" takes a correction
of the last answer: all of it waits in the store for a lab member's review (`culbot feedback`).

Page titles and URLs come from crawled sites and answers from a model that read them: both are shown as text.
Titles and answers are escaped for HTML and markdown; a source is a link only when its URL is a plain http(s) URL
(checked when the index was built, and again here).
"""
from __future__ import annotations

import html
import re
from collections import OrderedDict
from urllib.parse import quote

from . import _text
from .answer import Answerer, InputRejected, ModelInfo

EXAMPLES = ["기숙사 신청은 언제 해요?", "중앙도서관 평일 운영 시간이 어떻게 되나요?", "성적장학금 선발 기준이 뭐예요?", "총장님이 좋아하는 음식은 뭐예요?"]


def header(info: ModelInfo) -> str:
    figures = ", ".join(f"{k} {v}" for k, v in info.answer_metrics.items()) or "no answer-quality figures"
    loss = f"validation loss {info.eval_loss:.4f}" if info.eval_loss is not None else "not evaluated"
    return (f"모델 `{info.id}` ({info.kind}) · run `{info.run or '?'}` · dataset `{info.dataset or '?'}` · template `{info.template}` · "
            f"index `{info.index or 'none'}`  \nEval: {info.eval_status or '—'}, {loss}; {figures}")


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:])")


def as_text(text: str) -> str:
    """``text`` shown as itself in gradio's markdown: no tag, link, image or emphasis can come out of it."""
    return html.escape(_MARKDOWN.sub(r"\\\1", text), quote=True)


def plain(shown: str) -> str:
    """The text ``as_text`` was given (an earlier answer, read back from the chat as history)."""
    return re.sub(r"\\(.)", r"\1", html.unescape(shown))


def link_target(url: str) -> str | None:
    """A URL safe inside a markdown link's parentheses, or None (not a plain http(s) URL)."""
    ok = _text.http_url(url)
    return quote(ok, safe=":/?#[]@!$&*+,;=%-._~") if ok else None


def sources_markdown(sources) -> str:
    if not sources:
        return ""
    lines = []
    for n, s in enumerate(sources, 1):
        target = link_target(s.url)
        lines.append(f"{n}\\. [{as_text(s.title)}]({target})" if target else f"{n}\\. {as_text(s.title)} ({as_text(s.doc)})")
    return "\n\n---\n**출처**\n\n" + "  \n".join(lines)


def _content(message: dict) -> str:
    """A chat message's text, whether gradio hands it over as a string or as a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class ShownAnswers:
    """The ids of the answers this demo has shown, by (question, answer as shown): what 👍/👎 and a correction name."""

    def __init__(self, keep: int = 10_000):
        self.ids: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.keep = keep

    def add(self, question: str, shown: str, answer_id: str) -> None:
        self.ids[(question, shown)] = answer_id
        while len(self.ids) > self.keep:
            self.ids.popitem(last=False)

    def at(self, history: list[dict], index: int) -> str | None:
        """The id of the answer at ``index`` of the chat, found with the question asked before it."""
        if not history or not 0 <= index < len(history) or history[index].get("role") != "assistant":
            return None
        question = next((_content(m) for m in reversed(history[:index]) if m.get("role") == "user"), "")
        return self.ids.get((question, _content(history[index])))

    def last(self, history: list[dict]) -> str | None:
        index = max((i for i, m in enumerate(history or []) if m.get("role") == "assistant"), default=-1)
        return self.at(history, index)


def add_feedback(demo, feedback, shown: ShownAnswers, max_chars: int) -> None:
    """👍/👎 on each answer and "정답 알려주기" for the last one, stored under the answers' ids."""
    import gradio as gr

    def on_like(history: list[dict], data: gr.LikeData):
        answer_id = shown.at(history, data.index if isinstance(data.index, int) else data.index[0])
        if answer_id is None:
            return "이 답에는 평가를 남길 수 없어요 (no answer id)."
        feedback.add(answer_id, rating="up" if data.liked else "down")
        return "평가 고맙습니다. 검토 후 다음 모델 학습에 반영됩니다."
    on_like.__annotations__["data"] = gr.LikeData   # gradio passes the event by this type; the module's annotations are strings

    def on_fix(text: str, history: list[dict]):
        answer_id = shown.last(history)
        if answer_id is None:
            return "먼저 질문해 주세요: 정답은 마지막 답에 붙습니다.", text
        if not (text or "").strip():
            return "정답을 적어 주세요.", text
        feedback.add(answer_id, rating="down", correction=text)
        return "정답 고맙습니다. 검토 후 다음 모델 학습에 반영됩니다.", ""

    with demo:
        with gr.Row():
            fix = gr.Textbox(label="정답 알려주기", placeholder="마지막 답이 틀렸다면 맞는 답을 적어 주세요", scale=4,
                             max_length=max_chars)
            send = gr.Button("보내기", scale=1)
        status = gr.Markdown()
        demo.chatbot.like(on_like, [demo.chatbot], [status])
        send.click(on_fix, [fix, demo.chatbot], [status, fix])


def build_demo(answerer: Answerer, feedback=None):
    """The gradio app; with ``feedback`` (a feedback_store.FeedbackStore) answers are kept and students can rate and correct them."""
    import gradio as gr

    from .feedback_store import answer_fields

    info = answerer.info()
    shown = ShownAnswers()

    def respond(message: str, history: list[dict], use_retrieval: bool):
        turns, pending = [], None
        for m in history or []:
            content = _content(m)
            if m["role"] == "user":
                pending = content
            elif pending is not None:
                turns.append((pending, plain(content.split("\n\n---\n**출처**")[0])))
                pending = None
        try:
            r = answerer.reply(message, turns, retrieval=use_retrieval)
        except InputRejected as e:
            raise gr.Error(str(e)) from None
        for _ in r:
            yield as_text(r.text)
        final = as_text(r.text) + sources_markdown(r.sources)
        if feedback is not None:
            feedback.record_answer(**answer_fields(r, info, channel="demo"))
            shown.add(message, final, r.id)
        yield final

    demo = gr.ChatInterface(
        respond,
        title="컬봇 Culbot · 충북대학교 캠퍼스 챗봇",
        description=header(answerer.info()),
        additional_inputs=[gr.Checkbox(value=answerer.retriever is not None, label="문서 검색 사용 (retrieval)",
                                       interactive=answerer.retriever is not None)],
        additional_inputs_accordion=gr.Accordion("설정", open=True),
        examples=[[q, answerer.retriever is not None] for q in EXAMPLES],
        cache_examples=False,
        flagging_mode="never",
        save_history=False,
    )
    if feedback is not None:
        add_feedback(demo, feedback, shown, answerer.spec.limits.max_message_chars)
    return demo
