"""The web demo: a gradio chat over the answering core, as upstream's demos were gradio apps.

Run as: culbot demo --model artifacts/models/<hash> [--index artifacts/indexes/<hash>] [--port 7860]

Answers stream; the passages each answer was given with are listed under it as links; a switch turns
retrieval off; the header says which model this is (run, dataset version, template, eval figures, index).

Page titles and URLs come from crawled sites and answers from a model that read them: both are shown as text.
Titles and answers are escaped for HTML and markdown; a source is a link only when its URL is a plain http(s) URL
(checked when the index was built, and again here).
"""
from __future__ import annotations

import html
import re
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


def build_demo(answerer: Answerer):
    import gradio as gr

    def respond(message: str, history: list[dict], use_retrieval: bool):
        turns, pending = [], None
        for m in history or []:
            content = m["content"] if isinstance(m.get("content"), str) else ""
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
        yield as_text(r.text) + sources_markdown(r.sources)

    return gr.ChatInterface(
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
