"""Token counting and chunking of page text for the LLM: every chunk fits the request budget, and nothing is cut silently.

A page is split by lines, then sentences, then (for one very long "sentence") characters,
and the pieces are packed into chunks of at most the budget, each carrying the page title.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from culbot.pipeline_config.schema import ConfigError, QAGenConfig

from . import _store, _text


def estimate_tokens(text: str) -> int:
    """Conservative token estimate for OpenAI BPEs on Korean text (over-counts, so chunks fit).

    A Hangul syllable costs about 1 token in cl100k, sometimes 2; we charge 1.5.
    Other characters: about 4 per token; we charge 1 per 2.5.
    """
    hangul = len(_text.HANGUL_RE.findall(text))
    other = sum(1 for c in text if not c.isspace()) - hangul
    return math.ceil(1.5 * hangul + other / 2.5 + text.count("\n") * 0.5) + 4


def make_counter(kind: str, model: str) -> Callable[[str], int]:
    if kind == "estimate":
        return estimate_tokens
    try:
        import tiktoken
    except ImportError:
        raise ConfigError("qa.token_counter: 'tiktoken' needs the tiktoken package (pip install tiktoken)") from None
    try:
        enc = tiktoken.encoding_for_model(model)
    except KeyError:
        enc = tiktoken.get_encoding("cl100k_base")
    return lambda s: len(enc.encode(s))


@dataclass
class Chunk:
    url: str
    title: str
    index: int
    text: str
    tokens: int
    hash: str = ""
    n_chunks: int = 1

    @property
    def information(self) -> str:
        return f"[{self.title}]\n{self.text}"


_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|(?<=다\.)\s*|(?<=요\.)\s*")


def split_text(text: str, budget: int, count: Callable[[str], int]) -> tuple[list[str], int]:
    """Split text into pieces each within budget: lines, then sentences, then characters."""
    out, hard = [], 0
    for line in text.split("\n"):
        if count(line) <= budget:
            out.append(line)
            continue
        for sent in (s for s in _SENTENCE_END.split(line) if s):
            if count(sent) <= budget:
                out.append(sent)
                continue
            hard += 1  # one very long "sentence": cut by characters, keeping every character
            step = max(1, len(sent) * budget // max(count(sent), 1))
            while sent:
                cut = step
                while cut > 1 and count(sent[:cut]) > budget:
                    cut = max(1, cut * 3 // 4)
                out.append(sent[:cut])
                sent = sent[cut:]
    return out, hard


def chunk_page(page: dict, budget: int, count: Callable[[str], int]) -> tuple[list[Chunk], int]:
    """Pack a page's lines into chunks of at most ``budget`` tokens (title included)."""
    title = page.get("title") or page["url"]
    text_budget = budget - count(f"[{title}]\n")
    if text_budget < 20:
        raise ConfigError(f"qa.chunk_tokens: budget {budget} is too small for the page title of {page['url']}")
    pieces, hard = split_text(page["text"], text_budget, count)
    chunks, cur = [], []
    for piece in pieces:
        if cur and count("\n".join(cur + [piece])) > text_budget:
            chunks.append("\n".join(cur))
            cur = []
        cur.append(piece)
    if cur and "\n".join(cur).strip():
        chunks.append("\n".join(cur))
    out = [Chunk(page["url"], title, i, t, 0) for i, t in enumerate(chunks)]
    for c in out:
        c.n_chunks = len(out)
        c.tokens = count(c.information)
        c.hash = _store.sha256_text(c.information)
    return out, hard


def chunk_budget(qa: QAGenConfig, prompt_tokens: int) -> int:
    """Page-text tokens per request: what the context leaves after the prompt (``prompt_tokens``) and max_tokens."""
    room = qa.context_tokens - qa.max_tokens - prompt_tokens
    if qa.chunk_tokens is None:
        if room < 100:
            raise ConfigError(f"qa: the prompt (~{prompt_tokens} tokens) plus max_tokens={qa.max_tokens} leave only {room} of context_tokens={qa.context_tokens} for page text; lower max_tokens or raise context_tokens")
        return room
    if qa.chunk_tokens > room:
        raise ConfigError(f"qa.chunk_tokens={qa.chunk_tokens} does not fit: context_tokens={qa.context_tokens} - max_tokens={qa.max_tokens} - prompt ~{prompt_tokens} leaves {room}")
    return qa.chunk_tokens
