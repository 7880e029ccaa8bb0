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


from culbot.pipeline_config.schema import CbnuConfig

from . import _store, _text
from ._http import FetchError, PoliteClient, Progress, RobotsDisallowed
from ._prefect import report, retry_on_network, stage_task, time_window
from .contracts import Stage, StageOutput
from .documents import checked_page, extract_page, page_record, pages_hash, read_directory

log = logging.getLogger("culbot.crawl.cbnu")

class SiteCrawl:
    """One breadth-first crawl of the site within ``cbnu``'s domains, patterns, depth and page budget. Pages seen in
    ``previous`` are asked for conditionally (ETag, Last-Modified) and kept when a fetch fails."""

    def __init__(self, client: PoliteClient, cbnu: CbnuConfig, previous: dict[str, dict], raw_dir: Path):
        self.client, self.cbnu, self.previous, self.raw_dir = client, cbnu, previous, raw_dir
        self.seeds = [urldefrag(s)[0] for s in cbnu.seeds]
        self.include = [re.compile(p) for p in cbnu.include_patterns]
        self.exclude = [re.compile(p) for p in cbnu.exclude_patterns]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.enqueued: set[str] = set()
        self.pages: dict[str, dict] = {}
        self.quarantine: list[dict] = []
        self.counts = {"fetched": 0, "new": 0, "changed": 0, "unchanged": 0, "not_modified": 0, "skipped_not_html": 0}
        self.budget = cbnu.max_pages
        self.progress = Progress("cbnu pages", total=None, logger=log)

    def wanted(self, url: str) -> bool:
        if urlsplit(url).scheme not in ("http", "https") or not _text.domain_allowed(url, self.cbnu.allowed_domains):
            return False
        if any(p.search(url) for p in self.exclude):
            return False
        return url in self.seeds or not self.include or any(p.search(url) for p in self.include)

    def enqueue(self, url: str, depth: int) -> None:
        if url not in self.enqueued and self.wanted(url):
            self.enqueued.add(url)
            self.queue.put_nowait((url, depth))

    def set_aside(self, url: str, reason: str, **extra) -> None:
        self.quarantine.append({"stage": "crawl-cbnu", "url": url, "reason": reason, **extra})

    async def fetch(self, url: str, old: dict | None):
        """The response to a (conditional) GET, or None when the page was set aside (the last good copy kept)."""
        headers = {}
        if old and old.get("etag"):
            headers["If-None-Match"] = old["etag"]
        if old and old.get("last_modified"):
            headers["If-Modified-Since"] = old["last_modified"]
        try:
            return await self.client.get(url, headers=headers or None)
        except RobotsDisallowed:
            self.set_aside(url, "robots_disallowed")
        except FetchError as e:
            self.set_aside(url, f"fetch_failed: {e.reason}")
            if old:  # keep the last good copy rather than losing the page
                self.pages[url] = old
        return None

    def record(self, url: str, r, old: dict | None) -> dict | None:
        """The page record of a response: the old one when not modified, a new one parsed from its HTML, or None when
        the response holds no page (an error status, not HTML, an unreadable encoding)."""
        if r.status_code == 304 and old:
            self.counts["not_modified"] += 1
            self.counts["unchanged"] += 1
            return old
        if r.status_code != 200:
            self.set_aside(url, f"http_{r.status_code}")
            return None
        if "html" not in r.headers.get("content-type", "text/html"):
            self.counts["skipped_not_html"] += 1
            return None
        _store.atomic_write_bytes(self.raw_dir / f"{_store.sha256_text(url)[:24]}.html", r.content)
        html, why = _text.decode_text(r.content, r.charset_encoding)
        if html is None:
            self.set_aside(url, why, bytes=len(r.content))
            return None
        ex = extract_page(html, str(r.url))
        rec = page_record(url, ex["title"], ex["text"], links=ex["links"], headings=ex["headings"], etag=r.headers.get("etag"),
                          last_modified=r.headers.get("last-modified"))
        if old and old["content_hash"] == rec["content_hash"]:
            self.counts["unchanged"] += 1
            rec["fetched_at"] = old.get("fetched_at")
        else:
            self.counts["changed" if old else "new"] += 1
            rec["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return rec

    async def handle(self, url: str, depth: int) -> None:
        old = self.previous.get(url)
        r = await self.fetch(url, old)
        if r is None:
            return
        self.counts["fetched"] += 1
        self.progress.advance()
        rec = self.record(url, r, old)
        if rec is None:
            return
        kept, set_aside = checked_page(rec, min_text_chars=self.cbnu.min_text_chars, max_page_chars=self.cbnu.max_page_chars,
                                       oversize=self.cbnu.oversize)
        self.quarantine.extend(set_aside)
        if kept is not None:
            self.pages[url] = kept
        if depth < self.cbnu.max_depth:
            for link in rec.get("links", []):
                self.enqueue(link, depth + 1)

    async def worker(self) -> None:
        while True:
            url, depth = await self.queue.get()
            try:
                if self.budget > 0:
                    self.budget -= 1
                    await self.handle(url, depth)
            finally:
                self.queue.task_done()

    async def run(self) -> tuple[list[dict], list[dict], dict[str, int]]:
        """(pages, quarantine, counts)."""
        for s in self.seeds:
            self.enqueue(s, 0)
        workers = [asyncio.create_task(self.worker()) for _ in range(max(1, self.cbnu.http.max_concurrency_per_host))]
        await self.queue.join()
        for w in workers:
            w.cancel()
        if self.counts["fetched"]:
            log.info(self.progress.line())
        self.counts["removed"] = len(set(self.previous) - set(self.pages) - {q["url"] for q in self.quarantine})
        max_pages = self.cbnu.max_pages
        if self.budget <= 0 and len(self.enqueued) > max_pages:
            self.counts["not_fetched_max_pages"] = len(self.enqueued) - max_pages
            log.warning("max_pages=%d reached; %d more URLs were found but not fetched", max_pages, self.counts["not_fetched_max_pages"])
        return sorted(self.pages.values(), key=lambda p: p["url"]), self.quarantine, self.counts


def run_crawl(cbnu: CbnuConfig, out_dir: Path | None = None) -> StageOutput:
    """Crawl the configured site, or read the pages folder; write pages.jsonl and the manifest."""
    out_dir = Path(out_dir or cbnu.out_dir)
    t0 = time.monotonic()
    _store.reopen(out_dir)
    if cbnu.source == "directory":
        pages, quarantine = read_directory(cbnu.pages_dir, cbnu.min_text_chars, cbnu.max_page_chars, cbnu.oversize)
        counts = {"documents": len(pages)}
        inputs = {"pages_dir": _store.tree_hash(cbnu.pages_dir)}
    else:
        previous = {p["url"]: p for p in _store.read_jsonl(out_dir / "pages.jsonl")}

        async def main():
            async with PoliteClient(cbnu.http) as client:
                res = await SiteCrawl(client, cbnu, previous, raw_dir=out_dir / "html").run()
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


STAGE = Stage(name="crawl-cbnu", module=__name__, profile="data", section="cbnu", key=cache_key)


@stage_task(STAGE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_on_network)
def crawl_cbnu_task(cbnu: CbnuConfig) -> StageOutput:
    """Network stage: a network failure is retried, a bad page never (it is quarantined)."""
    out = run_crawl(cbnu)
    report("crawl-cbnu", f"CBNU pages ({cbnu.source})", out.counts)
    return out
