"""Documents into retrievable passages, by their structure: headings start a passage, table rows stay whole.

Each passage holds at most a token budget (the QA token estimate) of whole lines; a long paragraph
is cut at sentence ends. The last lines of a passage (up to the overlap) open the next one, so an
answer that straddles a cut is still found. Every passage keeps its document, title, URL and position.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Callable

from . import _text
from .chunking import estimate_tokens, split_text
from .contracts import Passage

_SITE_SUFFIX = re.compile(r"\s*[|\-–]\s*(충북대학교|CBNU).*$")
# "학사일정 | 학사공지 | 한빛대학교", "학생식당 - 한빛대학교 학생생활관": a page title, then the site's sections and name
_SECTIONS = re.compile(r"\s+[|｜>»:]+\s+|\s*\|\s*")
_SITE_TAIL = re.compile(r"\s+[-–—:]+\s+(?=[^-–—:]*(대학교|대학|University|College|CBNU|홈페이지))")
_TRAILING = re.compile(r"\s*(이용\s*)?(안내|소개)$")


def doc_name(url: str) -> str:
    """The document's file name without extension (a folder of documents), or its URL (a crawled site)."""
    return PurePosixPath(url[len("file:"):]).with_suffix("").as_posix() if url.startswith("file:") else url


def clean_title(title: str) -> str:
    """A page's own title, without the site's section and name that HTML titles carry: "휴학 안내 | 학사 | 한빛대학교" ->
    "휴학 안내", "학생식당 운영 - 충북대학교" -> "학생식당 운영". A title that is nothing but those is kept."""
    first = _SECTIONS.split(title.strip())[0].strip()
    first = _SITE_TAIL.split(first)[0].strip()
    return first or title.strip()


def subject(title: str) -> str:
    """What a document is about, for title questions: 김하늘 교수 소개 -> 김하늘 교수, 중앙도서관 이용 안내 -> 중앙도서관."""
    s = _SITE_SUFFIX.sub("", clean_title(title)).strip()
    return _TRAILING.sub("", s).strip() or s


def lines(page: dict) -> list[tuple[str, str]]:
    """(kind, line) with kind heading, row (a table row, cells joined by ' | ') or text."""
    headings = {*page.get("headings", []), page.get("title", "")}
    out = []
    for line in page["text"].split("\n"):
        line = line.strip()
        if not line:
            continue
        if line in headings or line.startswith("#"):
            out.append(("heading", line.lstrip("#").strip()))
        elif " | " in line:
            out.append(("row", line))
        else:
            out.append(("text", line))
    return out


def split_passages(page: dict, max_tokens: int, overlap_tokens: int, count: Callable[[str], int] = estimate_tokens,
                   pack_sections: bool = True) -> list[Passage]:
    doc, title = doc_name(page["url"]), clean_title(page.get("title") or "") or page["url"]
    # Only a well-formed http(s) URL becomes a link for students; a shipped file keeps its file: name (never a link).
    url = _text.http_url(page.get("source_url")) or _text.http_url(page["url"]) or (page["url"] if page["url"].startswith("file:") else "")
    passages: list[Passage] = []
    heading, cur, size = "", [], 0

    def flush() -> None:
        if cur:
            body = "\n".join(([heading] if heading and heading != title else []) + cur)
            passages.append(Passage(id=f"{doc}#{len(passages)}", doc=doc, title=title, url=url, position=len(passages), heading=heading, text=body))

    header = None   # the header row of the table being read, repeated when the table runs into the next passage
    previous_kind = ""
    for kind, line in lines(page):
        if kind == "heading":
            previous_kind = kind
            if pack_sections and cur and size + count(line) <= max_tokens and size < max_tokens // 2:
                # a short section runs on into the next one: three passages of two lines each would fill the
                # model's context slots with one fact apiece
                cur.append(line)
                size += count(line)
                continue
            flush()
            heading, cur, size = line, [], 0
            continue
        if kind == "row" and previous_kind != "row":
            header = line
        elif kind != "row":
            header = None
        previous_kind = kind
        pieces = [line] if kind == "row" else split_text(line, max_tokens, count)[0]   # a table row is never cut
        for piece in pieces:
            n = count(piece)
            if cur and size + n > max_tokens:
                flush()
                tail: list[str] = []
                for prev in reversed(cur):   # whole lines of the passage just closed, up to the overlap
                    if sum(map(count, tail)) + count(prev) > overlap_tokens:
                        break
                    tail.insert(0, prev)
                if header is not None and header not in tail and piece != header:
                    tail.insert(0, header)
                cur, size = tail, sum(map(count, tail))
            cur.append(piece)
            size += n
    flush()
    return passages
