"""Crawl CBNU web pages (or read a folder of documents) into page records.

Run as: culbot crawl cbnu --seed https://www.chungbuk.ac.kr/www/index.do --allow-domain chungbuk.ac.kr --out raw/cbnu/
    or: culbot crawl cbnu --pages-dir raw/samples/cbnu_pages --out raw/cbnu/

Main text is extracted with bs4 (script, style, nav, header, footer dropped).
A refresh sends If-None-Match / If-Modified-Since and keeps unchanged pages as
they were, so QA generation sees the same content hash and makes no new calls.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

from bs4 import BeautifulSoup
from prefect import task

from culbot.pipeline_config.schema import CbnuConfig

from . import _store, _text
from ._http import FetchError, PoliteClient, Progress, RobotsDisallowed
from ._prefect import report, retry_on_network, stage_cache
from .contracts import StageOutput

log = logging.getLogger("culbot.crawl.cbnu")

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
    text = _text.normalize_ws(_text.nfc(main.get_text("\n")))
    return {"title": _text.nfc(title), "text": text, "links": sorted(set(links))}


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
    return _store.hash_json([[p["url"], p["title"], p["content_hash"]] for p in pages])


# ----- sources ---------------------------------------------------------------------

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
            rec = page_record(url, ex["title"] or _text.nfc(p.stem), ex["text"])
        rec, set_aside = checked_page(rec, min_text_chars=min_text_chars, max_page_chars=max_page_chars, oversize=oversize)
        quarantine += set_aside
        if rec is not None:
            pages.append(rec)
    return pages, quarantine


async def crawl_site(
    client: PoliteClient,
    *,
    seeds: list[str],
    allowed_domains: list[str],
    previous: dict[str, dict],
    max_pages: int,
    max_depth: int,
    include: list[str],
    exclude: list[str],
    min_text_chars: int,
    raw_dir: Path,
    max_page_chars: int | None = None,
    oversize: str = "truncate",
    workers: int = 4,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Breadth-first crawl within allowed domains; returns (pages, quarantine, counts)."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    seeds = [urldefrag(s)[0] for s in seeds]

    def wanted(url: str) -> bool:
        if urlsplit(url).scheme not in ("http", "https") or not _text.domain_allowed(url, allowed_domains):
            return False
        if any(p.search(url) for p in exc):
            return False
        return url in seeds or not inc or any(p.search(url) for p in inc)

    queue: asyncio.Queue = asyncio.Queue()
    enqueued: set[str] = set()
    for s in seeds:
        if wanted(s):
            enqueued.add(s)
            queue.put_nowait((s, 0))
    pages: dict[str, dict] = {}
    quarantine: list[dict] = []
    counts = {"fetched": 0, "new": 0, "changed": 0, "unchanged": 0, "not_modified": 0, "skipped_not_html": 0}
    progress = Progress("cbnu pages", total=None, logger=log)
    budget = [max_pages]

    async def handle(url: str, depth: int) -> None:
        old = previous.get(url)
        headers = {}
        if old and old.get("etag"):
            headers["If-None-Match"] = old["etag"]
        if old and old.get("last_modified"):
            headers["If-Modified-Since"] = old["last_modified"]
        try:
            r = await client.get(url, headers=headers or None)
        except RobotsDisallowed:
            quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": "robots_disallowed"})
            return
        except FetchError as e:
            quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": f"fetch_failed: {e.reason}"})
            if old:  # keep the last good copy rather than losing the page
                pages[url] = old
            return
        counts["fetched"] += 1
        progress.advance()
        if r.status_code == 304 and old:
            counts["not_modified"] += 1
            counts["unchanged"] += 1
            rec = old
        elif r.status_code != 200:
            quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": f"http_{r.status_code}"})
            return
        elif "html" not in r.headers.get("content-type", "text/html"):
            counts["skipped_not_html"] += 1
            return
        else:
            _store.atomic_write_bytes(raw_dir / f"{_store.sha256_text(url)[:24]}.html", r.content)
            html, why = _text.decode_text(r.content, r.charset_encoding)
            if html is None:
                quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": why, "bytes": len(r.content)})
                return
            ex = extract_page(html, str(r.url))
            rec = page_record(url, ex["title"], ex["text"], links=ex["links"], etag=r.headers.get("etag"), last_modified=r.headers.get("last-modified"))
            if old and old["content_hash"] == rec["content_hash"]:
                counts["unchanged"] += 1
                rec["fetched_at"] = old.get("fetched_at")
            else:
                counts["changed" if old else "new"] += 1
                rec["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        kept, set_aside = checked_page(rec, min_text_chars=min_text_chars, max_page_chars=max_page_chars, oversize=oversize)
        quarantine.extend(set_aside)
        if kept is not None:
            pages[url] = kept
        if depth < max_depth:
            for link in rec.get("links", []):
                if link not in enqueued and wanted(link):
                    enqueued.add(link)
                    queue.put_nowait((link, depth + 1))

    async def worker() -> None:
        while True:
            url, depth = await queue.get()
            try:
                if budget[0] > 0:
                    budget[0] -= 1
                    await handle(url, depth)
            finally:
                queue.task_done()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await queue.join()
    for t in tasks:
        t.cancel()
    if counts["fetched"]:
        log.info(progress.line())
    counts["removed"] = len(set(previous) - set(pages) - {q["url"] for q in quarantine})
    if budget[0] <= 0 and len(enqueued) > max_pages:
        counts["not_fetched_max_pages"] = len(enqueued) - max_pages
        log.warning("max_pages=%d reached; %d more URLs were found but not fetched", max_pages, counts["not_fetched_max_pages"])
    return sorted(pages.values(), key=lambda p: p["url"]), quarantine, counts


def run_crawl(cbnu: CbnuConfig, out_dir: Path | None = None) -> StageOutput:
    """Crawl the configured site, or read the pages folder; write pages.jsonl and the manifest."""
    out_dir = Path(out_dir or cbnu.out_dir)
    t0 = time.monotonic()
    (out_dir / _store.MANIFEST).unlink(missing_ok=True)
    if cbnu.source == "directory":
        pages, quarantine = read_directory(cbnu.pages_dir, cbnu.min_text_chars, cbnu.max_page_chars, cbnu.oversize)
        counts = {"documents": len(pages)}
        inputs = {"pages_dir": _store.tree_hash(cbnu.pages_dir)}
    else:
        previous = {p["url"]: p for p in _store.read_jsonl(out_dir / "pages.jsonl")}

        async def main():
            async with PoliteClient(cbnu.http) as client:
                res = await crawl_site(
                    client, seeds=cbnu.seeds, allowed_domains=cbnu.allowed_domains, previous=previous,
                    max_pages=cbnu.max_pages, max_depth=cbnu.max_depth, include=cbnu.include_patterns,
                    exclude=cbnu.exclude_patterns, min_text_chars=cbnu.min_text_chars, raw_dir=out_dir / "html",
                    max_page_chars=cbnu.max_page_chars, oversize=cbnu.oversize,
                    workers=max(1, cbnu.http.max_concurrency_per_host),
                )
                log.info("cbnu http: %s", dict(client.stats))
                return res

        pages, quarantine, counts = asyncio.run(main())
        inputs = {"seeds": " ".join(cbnu.seeds)}
    _store.atomic_write_jsonl(out_dir / "pages.jsonl", pages)
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    counts = {**counts, "pages": len(pages), "quarantined": len(quarantine)}
    log.info("cbnu: %s", counts)
    m = _store.write_manifest(out_dir, stage="crawl-cbnu", inputs=inputs, config=cbnu.model_dump(mode="json"), counts=counts,
                              timings={"crawl": time.monotonic() - t0}, content_hash=pages_hash(pages))
    return StageOutput.of(out_dir, m)


@task(name="crawl-cbnu", cache_policy=stage_cache(__name__), persist_result=True, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_on_network)
def crawl_cbnu_task(cbnu: CbnuConfig, window: str) -> StageOutput:
    """Network stage: a network failure is retried, a bad page never (it is quarantined). ``window`` (a time bucket, or the folder's hash) bounds cache reuse."""
    out = run_crawl(cbnu)
    report("crawl-cbnu", f"CBNU pages ({cbnu.source})", out.counts)
    return out
