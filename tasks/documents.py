"""Documents as page records: HTML main text, a folder of .txt/.html files, and the checks every page passes.

Shared by the CBNU crawl (site pages) and the index stage (any folder of documents). Main text is
extracted with bs4 (script, style, nav, header, footer and menu-like blocks dropped); a table row is
one line, its cells joined by " | ". Files that are not text are set aside with the reason; UTF-8
and CP949/EUC-KR are read; a page over the size cap is cut or set aside, the reason recorded.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

from bs4 import BeautifulSoup

from . import _store, _text

BOILERPLATE_TAGS = ["script", "style", "noscript", "nav", "header", "footer", "aside", "form", "iframe", "template", "svg"]
# Korean university CMSs mark menus with these ids/classes rather than <nav>.
BOILERPLATE_HINT = re.compile(r"(^|[-_ ])(gnb|lnb|snb|tnb|nav|menu|footer|header|breadcrumb|skip|quick|sitemap|banner|util)([-_ ]|$)", re.I)
MAIN_SELECTORS = ["main", "article", "#content", "#contents", ".content", ".contents", "#container", "body"]


# ----- pure extraction -----------------------------------------------------------

def extract_page(html: str, url: str) -> dict[str, Any]:
    """Title, main text and outgoing links of one HTML page (decoded with _text.decode_text)."""
    soup = BeautifulSoup(html, "lxml")
    links = []
    for a in soup.find_all("a", href=True):
        href = a["href"].strip()
        if href.startswith(("javascript:", "mailto:", "tel:", "#")):
            continue
        links.append(urldefrag(urljoin(url, href))[0])
    title = ""
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)
    elif soup.find("h1"):
        title = soup.find("h1").get_text(" ", strip=True)
    for tag in soup(BOILERPLATE_TAGS):
        tag.decompose()
    for tag in soup.find_all(True):
        if tag.decomposed:
            continue
        hints = " ".join([tag.get("id") or "", *(tag.get("class") or []), tag.get("role") or ""])
        if hints.strip() and BOILERPLATE_HINT.search(hints) and tag.name not in ("html", "body", "main"):
            tag.decompose()
    main = next((soup.select_one(s) for s in MAIN_SELECTORS if soup.select_one(s) is not None), soup)
    for tr in main.find_all("tr"):   # a table row is one line, its cells joined, so it is never split apart
        cells = [c.get_text(" ", strip=True) for c in tr.find_all(["th", "td"])]
        tr.replace_with(soup.new_string("\n" + " | ".join(c for c in cells if c) + "\n"))
    headings = [_text.normalize_ws(_text.nfc(h.get_text(" ", strip=True))) for h in main.find_all(["h1", "h2", "h3", "h4", "h5", "h6"])]
    text = _text.normalize_ws(_text.nfc(main.get_text("\n")))
    canonical = soup.find("link", rel="canonical", href=True)
    return {"title": _text.nfc(title), "text": text, "links": sorted(set(links)), "headings": [h for h in headings if h],
            "canonical": canonical["href"].strip() if canonical and canonical["href"].strip().startswith(("http://", "https://")) else None}


def page_record(url: str, title: str, text: str, **extra) -> dict[str, Any]:
    return {"url": url, "title": title, "text": text, "content_hash": _store.sha256_text(title + "\n" + text), **extra}


def checked_page(rec: dict, *, min_text_chars: int, max_page_chars: int | None, oversize: str = "truncate") -> tuple[dict | None, list[dict]]:
    """(the page to keep or None, quarantine entries): too little text is set aside; too much is cut or set aside."""
    n = len(rec["text"])
    if n < min_text_chars:
        return None, [{"stage": "crawl-cbnu", "url": rec["url"], "reason": "too_little_text", "raw": rec["text"]}]
    if max_page_chars is None or n <= max_page_chars:
        return rec, []
    if oversize == "quarantine":
        return None, [{"stage": "crawl-cbnu", "url": rec["url"], "reason": f"oversize: {n:,} characters > cbnu.max_page_chars={max_page_chars:,}", "chars": n}]
    extra = {k: v for k, v in rec.items() if k not in ("url", "title", "text", "content_hash")}
    kept = page_record(rec["url"], rec["title"], rec["text"][:max_page_chars], **extra, truncated_from=n)
    return kept, [{"stage": "crawl-cbnu", "url": rec["url"], "chars": n,
                   "reason": f"oversize_truncated: {n:,} characters > cbnu.max_page_chars={max_page_chars:,}; the first {max_page_chars:,} kept"}]


def pages_hash(pages: list[dict]) -> str:
    """What QA generation consumes: URL, title and text of every page."""
    return _store.hash_json([[p["url"], p["title"], p["content_hash"], *([p["source_url"]] if p.get("source_url") else [])] for p in pages])


def read_directory(folder: Path, min_text_chars: int = 0, max_page_chars: int | None = None,
                   oversize: str = "truncate") -> tuple[list[dict], list[dict]]:
    """.txt/.md documents (file name = title) and .html pages from a folder; what is not text goes to quarantine."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: pages folder not found")
    pages, quarantine = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        url = f"file:{rel}"  # relative, so hashes do not depend on where the checkout lives
        if p.suffix not in (".txt", ".md", ".html", ".htm"):
            quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": f"unsupported file type {p.suffix!r}"})
            continue
        text, why = _text.decode_text(p.read_bytes())
        if text is None:
            quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": why, "bytes": p.stat().st_size})
            continue
        if p.suffix in (".txt", ".md"):
            rec = page_record(url, _text.nfc(p.stem), _text.normalize_ws(_text.nfc(text)))
        else:
            ex = extract_page(text, url)
            # A saved web page keeps its address in <link rel="canonical">: answers link there, not to a local file.
            rec = page_record(url, ex["title"] or _text.nfc(p.stem), ex["text"], headings=ex["headings"],
                              **({"source_url": ex["canonical"]} if ex["canonical"] else {}))
        rec, set_aside = checked_page(rec, min_text_chars=min_text_chars, max_page_chars=max_page_chars, oversize=oversize)
        quarantine += set_aside
        if rec is not None:
            pages.append(rec)
    return pages, quarantine
