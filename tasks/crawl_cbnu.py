"""Crawl CBNU web pages (or read a folder of documents) into page records.

Run as: culbot crawl cbnu --seed https://www.chungbuk.ac.kr/www/index.do --allow-domain chungbuk.ac.kr --out raw/cbnu/
    or: culbot crawl cbnu --pages-dir raw/samples/cbnu_pages --out raw/cbnu/

Main text is extracted with bs4 (tasks/documents.py: chrome dropped, table rows kept whole).
A refresh sends If-None-Match / If-Modified-Since and keeps unchanged pages as
they were, so QA generation sees the same content hash and makes no new calls.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

from prefect import task

from culbot.pipeline_config.schema import CbnuConfig

from . import _store, _text
from ._http import FetchError, PoliteClient, Progress, RobotsDisallowed
from ._prefect import report, retry_on_network, stage_cache, time_window
from .contracts import StageOutput
from .documents import checked_page, extract_page, page_record, pages_hash, read_directory

log = logging.getLogger("culbot.crawl.cbnu")

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
            rec = page_record(url, ex["title"], ex["text"], links=ex["links"], headings=ex["headings"], etag=r.headers.get("etag"),
                              last_modified=r.headers.get("last-modified"))
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


def cache_key(cbnu: CbnuConfig) -> str:
    """What the config does not show: the pages folder's content, or the live site's time bucket (cache reuse window)."""
    return "dir-" + _store.tree_hash(cbnu.pages_dir) if cbnu.source == "directory" else time_window(cbnu.refresh_every_hours)


@task(name="crawl-cbnu", cache_policy=stage_cache(__name__, key=cache_key), persist_result=True, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_on_network)
def crawl_cbnu_task(cbnu: CbnuConfig) -> StageOutput:
    """Network stage: a network failure is retried, a bad page never (it is quarantined)."""
    out = run_crawl(cbnu)
    report("crawl-cbnu", f"CBNU pages ({cbnu.source})", out.counts)
    return out
