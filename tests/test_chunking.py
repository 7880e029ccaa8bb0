"""Chunking page text for the LLM: every character kept, every chunk within the budget."""
from culbot.tasks.chunking import chunk_page, estimate_tokens


def test_chunking_keeps_every_character_and_respects_the_budget():
    text = "\n".join(f"{i}번째 문단입니다. 충북대학교의 학사 제도에 관한 설명이 이어집니다." for i in range(60))
    text += "\n" + "".join(chr(0xAC00 + i * 7 % 11000) for i in range(3000))  # one line with no break points at all
    page = {"url": "u", "title": "긴 문서", "text": text}
    chunks, hard = chunk_page(page, 300, estimate_tokens)
    assert hard == 1 and len(chunks) > 5
    assert all(c.tokens <= 300 for c in chunks)
    assert "".join(c.text.replace("\n", "") for c in chunks) == text.replace("\n", "")
    assert len({c.hash for c in chunks}) == len(chunks)
