"""Crawl univ100 (대학백과) Q&A through its JSON API, incrementally.

Run as: culbot crawl univ100 --base-url https://api.univ100.kr --campus 122 --out raw/univ100/

Raw responses are kept under <out>/raw/ so parsing can be re-run without fetching
(``culbot crawl univ100 --reparse --out DIR``). A second crawl fetches details only
for questions it does not have yet.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


from culbot.pipeline_config.schema import RetryPolicy, Univ100Config

from . import _store, _text
from ._http import FetchError, GaveUp, PoliteClient, Progress, RobotsDisallowed, Transient, with_retries
from ._prefect import report, retry_on_network, stage_task, time_window
from .contracts import Stage, Manifest, StageOutput

log = logging.getLogger("culbot.crawl.univ100")

LIST_PATH = "/find/qna/question/list"
DETAIL_PATH = "/find/qna/question"


class ParseError(ValueError):
    """A response is not in the shape the univ100 API documents."""


# ----- pure parsing ----------------------------------------------------------

def _json(body: bytes | str, what: str) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParseError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
        raise ParseError(f"{what}: expected an object with a 'result' object")
    return data["result"]


def _qid(obj: dict) -> str:
    for key in ("id", "questionId"):
        if obj.get(key) not in (None, ""):
            return str(obj[key])
    raise ParseError("question has no 'id' or 'questionId'")


def parse_list_page(body: bytes | str) -> list[str]:
    """Question ids on one list page, in page order. An empty list ends paging."""
    result = _json(body, "list page")
    questions = result.get("questions")
    if not isinstance(questions, list):
        raise ParseError("list page: 'result.questions' is missing or not a list")
    return [_qid(q) for q in questions if isinstance(q, dict)]


def parse_list_total(body: bytes | str) -> int | None:
    """How many questions the API says the list holds, when it says (result.total or result.totalCount)."""
    result = _json(body, "list page")
    for key in ("total", "totalCount", "total_count"):
        if isinstance(result.get(key), int):
            return result[key]
    return None


def parse_question(body: bytes | str, *, campus_id: int, question_url: str, fetched_at: str) -> dict[str, Any]:
    """A detail response -> one record with every answer, in the order the API gives."""
    result = _json(body, "question detail")
    q = result.get("question")
    if not isinstance(q, dict):
        raise ParseError("question detail: 'result.question' is missing")
    qid = _qid(q)
    title, text = q.get("title"), q.get("text")
    if not isinstance(title, str) or not isinstance(text, str):
        raise ParseError(f"question {qid}: 'title' and 'text' must be strings")
    answers_raw = result.get("answers") or []
    if not isinstance(answers_raw, list):
        raise ParseError(f"question {qid}: 'result.answers' is not a list")
    answers = [a.get("text") or "" for a in answers_raw if isinstance(a, dict)]
    record = {
        "id": qid,
        "campus": q.get("campusId", campus_id),
        "campus_name": q.get("campusName", ""),
        "category": q.get("categoryName", ""),
        "dept": q.get("deptName", ""),
        "title": title,
        "text": text,
        "answers": answers,
        "url": question_url.format(id=qid, campus=campus_id),
        "fetched_at": fetched_at,
    }
    record["content_hash"] = _store.hash_json([title, text, answers])
    return record


ROW_RULES = {"answer_choice", "min_output_chars", "drop_lone_jamo", "keep_url_domains"}  # the fields that shape rows


def record_to_row(record: dict, rules: Univ100Config) -> tuple[dict | None, str | None, dict[str, int]]:
    """(row, None, pii) or (None, drop reason, pii). Instruction = title + text; input is ''."""
    clean = lambda s: _text.clean_community_text(s, drop_lone_jamo=rules.drop_lone_jamo, keep_url_domains=list(rules.keep_url_domains))
    instruction, pii = clean(f"{record['title']}\n{record['text']}")
    answers = [clean(a) for a in record.get("answers", [])]
    for _, c in answers:
        for k, v in c.items():
            pii[k] += v
    texts = [a for a, _ in answers if a]
    if not instruction:
        return None, "empty_instruction", pii
    if not texts:
        return None, "empty_output", pii
    output = max(texts, key=len) if rules.answer_choice == "longest" else texts[0]
    if len(output) < rules.min_output_chars:
        return None, "short_output", pii
    row = {"id": f"univ100:{record['id']}", "source": "univ100", "instruction": instruction, "input": "", "output": output, "url": record["url"]}
    return row, None, pii


def build_rows(records: list[dict], rules: Univ100Config) -> tuple[list[dict], list[dict], dict[str, int], dict[str, int]]:
    rows, dropped = [], []
    reasons: dict[str, int] = {}
    pii_total = {"email": 0, "phone": 0, "url": 0}
    for rec in records:
        row, reason, pii = record_to_row(rec, rules)
        for k, v in pii.items():
            pii_total[k] += v
        if row is None:
            reasons[reason] = reasons.get(reason, 0) + 1
            dropped.append({"id": rec["id"], "reason": reason, "record": rec})
        else:
            rows.append(row)
    return rows, dropped, reasons, pii_total


# ----- sources: the live API and an offline snapshot -------------------------

class Univ100Source(Protocol):
    identity: str  # what the manifest records as the crawl's input
    retry: RetryPolicy  # how often a malformed list page is asked for again

    async def list_page(self, offset: int) -> tuple[str, bytes]: ...
    async def detail(self, qid: str) -> tuple[str, bytes]: ...


class Univ100Api:
    """The live JSON API over the polite client."""

    def __init__(self, client: PoliteClient, base_url: str, campus_id: int, page_size: int, dept_id: str = "", keyword: str = ""):
        self.c, self.base = client, base_url.rstrip("/")
        self.campus_id, self.page_size, self.dept_id, self.keyword = campus_id, page_size, dept_id, keyword
        self.identity = f"{self.base}{LIST_PATH}?campusId={campus_id}"
        self.retry = client.rule

    async def list_page(self, offset: int) -> tuple[str, bytes]:
        params = {"campusId": self.campus_id, "deptId": self.dept_id, "keyword": self.keyword, "limit": self.page_size, "offset": offset}
        url = self.base + LIST_PATH
        r = await self.c.get(url, params=params)
        if r.status_code != 200:
            raise FetchError(str(r.url), f"HTTP {r.status_code}", r.status_code)
        return str(r.url), r.content

    async def detail(self, qid: str) -> tuple[str, bytes]:
        r = await self.c.get(self.base + DETAIL_PATH, params={"questionId": qid})
        if r.status_code != 200:
            raise FetchError(str(r.url), f"HTTP {r.status_code}", r.status_code)
        return str(r.url), r.content


class Univ100Snapshot:
    """Recorded API responses on disk, same wire format: list/offset-<n>.json, detail/<id>.json."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not (self.folder / "list").is_dir():
            raise FileNotFoundError(f"{self.folder}: not a univ100 snapshot (no list/ folder)")
        self.identity = "snapshot " + _store.tree_hash(self.folder)
        self.retry = RetryPolicy(max_retries=0, backoff_base_s=0.0, backoff_max_s=0.0, retry_after_max_s=0.0)  # recorded files read the same every time

    async def list_page(self, offset: int) -> tuple[str, bytes]:
        p = self.folder / "list" / f"offset-{offset}.json"
        # A page past the last recorded one is the API's empty page.
        return f"snapshot:list/{p.name}", p.read_bytes() if p.exists() else b'{"result":{"questions":[]}}'

    async def detail(self, qid: str) -> tuple[str, bytes]:
        p = self.folder / "detail" / f"{qid}.json"
        if not p.exists():
            raise FetchError(f"snapshot:detail/{p.name}", "not in snapshot")
        return f"snapshot:detail/{p.name}", p.read_bytes()


# ----- the crawl -------------------------------------------------------------

class CrawlIncomplete(FetchError):
    """Some list pages could not be read; what was read is saved, and the next crawl pages to the end to find the rest.

    ``network`` says whether a server failure (worth a retry) or a malformed page (not) stopped it.
    """

    def __init__(self, where: str, reason: str, network: bool):
        super().__init__(where, reason)
        self.network = network


PENDING = "pending.json"   # what the last crawl could not read, so the next one retries it


async def read_list_page(source: Univ100Source, offset: int) -> tuple[str, bytes, list[str], int | None]:
    """(url, body, question ids, the total the API reports): a malformed page is retried like a failed request."""
    last: list[bytes] = [b""]

    async def attempt():
        url, body = await source.list_page(offset)
        last[0] = body
        try:
            return url, body, parse_list_page(body), parse_list_total(body)
        except ParseError as e:
            raise Transient(f"malformed list page: {e}") from None

    try:
        return await with_retries(attempt, source.retry, what=f"univ100 list page at offset {offset}", setting="univ100.http.retry_after_max_s")
    except GaveUp as e:
        raise ListPageUnreadable(e.reason, last[0]) from None


class ListPageUnreadable(ParseError):
    def __init__(self, reason: str, body: bytes):
        super().__init__(reason)
        self.body = body


@dataclass
class ListScan:
    """What paging the question list found."""

    pages: int = 0
    seen: set[str] = field(default_factory=set)       # every question id listed
    new_ids: list[str] = field(default_factory=list)  # ids to fetch: unknown ones, and those that failed last time
    expected: int | None = None                       # the total the API reports
    unread: list[int] = field(default_factory=list)   # list offsets that could not be read
    network_error: FetchError | None = None

    def listed(self) -> str:
        return f"listed {len(self.seen)}" + (f" of {self.expected} questions the API reports" if self.expected is not None else " questions")


async def scan_list(source: Univ100Source, raw: Path, scan: ListScan, known: set[str], quarantine: list[dict], *, page_size: int,
                    max_pages: int | None, stop_after_known_pages: int, full_scan: bool) -> ListScan:
    """Page the list from offset 0 until an empty page, ``stop_after_known_pages`` pages of known questions in a row
    (unless ``full_scan``), ``max_pages``, or a network failure. An unreadable page is quarantined and paged past."""
    offset = known_streak = 0
    while True:
        try:
            url, body, ids, total = await read_list_page(source, offset)
        except RobotsDisallowed as e:
            raise FetchError(e.url, "the list API is disallowed by robots.txt; nothing can be crawled") from None
        except FetchError as e:  # the server keeps failing: stop paging here
            scan.unread.append(offset)
            scan.network_error = e
            quarantine.append({"stage": "crawl-univ100", "offset": offset, "url": e.url, "reason": f"fetch_failed: {e.reason}"})
            return scan
        except ListPageUnreadable as e:  # malformed after every retry: name it and read on
            scan.unread.append(offset)
            _store.atomic_write_bytes(raw / "list" / f"offset-{offset}.json", e.body)
            quarantine.append({"stage": "crawl-univ100", "offset": offset, "reason": f"malformed: {e}", "raw": e.body.decode("utf-8", "replace")[:20000]})
            scan.pages += 1
            offset += page_size
            continue
        _store.atomic_write_bytes(raw / "list" / f"offset-{offset}.json", body)
        scan.pages += 1
        scan.expected = total if total is not None else scan.expected
        if not ids:
            return scan
        scan.seen.update(ids)
        fresh = [i for i in ids if i not in known and i not in scan.new_ids]
        scan.new_ids.extend(fresh)
        known_streak = 0 if fresh else known_streak + 1
        if stop_after_known_pages and not full_scan and known_streak >= stop_after_known_pages:
            log.info("page at offset %d holds only known questions; stopping (incremental)", offset)
            return scan
        if max_pages and scan.pages >= max_pages:
            return scan
        offset += page_size


async def fetch_details(source: Univ100Source, ids: list[str], raw: Path, records: dict[str, dict], quarantine: list[dict], *,
                        campus_id: int, question_url: str) -> list[str]:
    """Fetch and parse each question into ``records``; returns the ids that failed (quarantined, retried next crawl)."""
    progress = Progress("univ100 details", total=len(ids), logger=log)
    missing: list[str] = []

    async def fetch_one(qid: str) -> None:
        try:
            url, body = await source.detail(qid)
        except FetchError as e:
            missing.append(qid)
            quarantine.append({"stage": "crawl-univ100", "id": qid, "url": e.url, "reason": f"fetch_failed: {e.reason}"})
            return
        finally:
            progress.advance()
        _store.atomic_write_bytes(raw / "detail" / f"{qid}.json", body)
        try:
            rec = parse_question(body, campus_id=campus_id, question_url=question_url, fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except ParseError as e:
            missing.append(qid)
            quarantine.append({"stage": "crawl-univ100", "id": qid, "url": url, "reason": f"malformed: {e}", "raw": body.decode("utf-8", "replace")[:20000]})
            return
        records[rec["id"]] = rec

    await asyncio.gather(*(fetch_one(q) for q in ids))
    if ids:
        log.info(progress.line())
    return sorted(missing, key=lambda x: (len(x), x))


async def crawl(
    source: Univ100Source,
    out_dir: Path,
    *,
    campus_id: int,
    page_size: int,
    question_url: str,
    rules: Univ100Config,
    max_pages: int | None = None,
    stop_after_known_pages: int = 1,
) -> Manifest:
    """Page the list, fetch details of unknown questions, write records/rows; returns the manifest.

    A list page that cannot be read (after retries) is never skipped silently: it is quarantined, named, and
    the crawl raises CrawlIncomplete after saving what it read; the next crawl pages to the end. Questions whose
    detail failed are retried by the next crawl.
    """
    out_dir = Path(out_dir)
    t0 = time.monotonic()
    _store.reopen(out_dir)
    raw = out_dir / "raw"
    records = {r["id"]: r for r in _store.read_jsonl(out_dir / "records.jsonl")}
    known = set(records)
    pending = _store.read_json(out_dir / PENDING) if (out_dir / PENDING).is_file() else {"list_offsets": [], "question_ids": []}
    full_scan = bool(pending["list_offsets"])  # pages were missed last time: their questions may now be anywhere
    if full_scan:
        log.warning("univ100: the last crawl could not read list offset(s) %s; paging to the end this time", pending["list_offsets"])
    quarantine: list[dict] = []
    scan = await scan_list(source, raw, ListScan(new_ids=[q for q in pending["question_ids"] if q not in known]), known, quarantine,
                           page_size=page_size, max_pages=max_pages, stop_after_known_pages=stop_after_known_pages, full_scan=full_scan)
    new_ids, unread = scan.new_ids, scan.unread
    log.info("univ100: %d list pages, %s; %d new question(s) to fetch, %d already known", scan.pages, scan.listed(), len(new_ids), len(known))
    missing = await fetch_details(source, new_ids, raw, records, quarantine, campus_id=campus_id, question_url=question_url)
    if missing:
        log.warning("univ100: %d question(s) could not be fetched (ids %s); the next crawl retries them; see quarantine.jsonl",
                    len(missing), ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
    _store.atomic_write_json(out_dir / PENDING, {"list_offsets": unread, "question_ids": missing})
    counts = {"list_pages": scan.pages, "questions_listed": len(scan.seen), **({"expected": scan.expected} if scan.expected is not None else {}),
              "new": len(new_ids) - len(missing), "already_known": len(known), "failed": len(missing),
              "unread_list_offsets": unread, "missing_questions": missing}
    manifest = _write_outputs(out_dir, records, quarantine, rules, counts=counts, timings={"crawl": time.monotonic() - t0},
                              inputs={"source": source.identity, "campus_id": str(campus_id)}, finished=not unread)
    if unread:
        raise CrawlIncomplete(str(out_dir), f"crawl incomplete: the list page(s) at offset {', '.join(map(str, unread))} could not be read "
                              f"({quarantine[0]['reason'] if quarantine else 'see quarantine.jsonl'}); {scan.listed()}; the {len(records)} "
                              f"questions read are saved, and the next crawl pages to the end to find the rest",
                              network=scan.network_error is not None) from scan.network_error
    return manifest


def _write_outputs(out_dir, records, quarantine, rules: Univ100Config, *, counts, inputs, timings, finished: bool = True) -> Manifest | None:
    """records, rows, dropped and the quarantine (appended: earlier runs' entries are kept); the manifest when finished."""
    ordered = [records[k] for k in sorted(records, key=lambda x: (len(x), x))]
    rows, dropped, reasons, pii = build_rows(ordered, rules)
    _store.atomic_write_jsonl(out_dir / "records.jsonl", ordered)
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    _store.atomic_write_jsonl(out_dir / "dropped.jsonl", dropped)
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", _store.read_jsonl(out_dir / "quarantine.jsonl") + [{**q, "at": at} for q in quarantine])
    counts = {**counts, "records": len(ordered), "rows": len(rows), "dropped": reasons, "quarantined": len(quarantine), "pii_removed": pii}
    if not finished:
        return None
    return _store.write_manifest(
        out_dir, stage="crawl-univ100", inputs=inputs,
        config={"rules": rules.model_dump(mode="json", include=ROW_RULES)}, counts=counts, timings=timings,
        content_hash=_store.sha256_file(out_dir / "rows.jsonl"),
    )


def reparse(univ100: Univ100Config, out_dir: Path | None = None) -> StageOutput:
    """Rebuild records and rows from the raw detail responses, with no network. With no raw response to read it refuses
    (and leaves the folder as it was) instead of writing an empty crawl."""
    out_dir = Path(out_dir or univ100.out_dir)
    raw = sorted((out_dir / "raw" / "detail").glob("*.json"))
    if not raw:
        raise FileNotFoundError(f"nothing to reparse: {out_dir / 'raw' / 'detail'} holds no raw question responses (a crawl keeps "
                                f"them there); crawl first (`culbot crawl univ100 --out {out_dir}`) or name the crawl's folder with --out")
    _store.reopen(out_dir)
    old = {r["id"]: r for r in _store.read_jsonl(out_dir / "records.jsonl")}
    records, quarantine = {}, []
    for p in raw:
        fetched = old.get(p.stem, {}).get("fetched_at", "")
        try:
            rec = parse_question(p.read_bytes(), campus_id=univ100.campus_id, question_url=univ100.question_url, fetched_at=fetched)
        except ParseError as e:
            quarantine.append({"stage": "crawl-univ100", "id": p.stem, "url": f"raw:detail/{p.name}", "reason": f"malformed: {e}", "raw": p.read_text("utf-8", "replace")[:20000]})
            continue
        records[rec["id"]] = rec
    m = _write_outputs(out_dir, records, quarantine, univ100, counts={"reparsed": len(records)},
                       inputs={"source": "raw responses", "campus_id": str(univ100.campus_id)}, timings={})
    return StageOutput.of(out_dir, m)


def run_crawl(univ100: Univ100Config, out_dir: Path | None = None) -> StageOutput:
    """Crawl the live API or a snapshot, per ``univ100.source``."""
    out_dir = Path(out_dir or univ100.out_dir)

    async def main() -> Manifest:
        kwargs = dict(campus_id=univ100.campus_id, page_size=univ100.page_size, question_url=univ100.question_url, rules=univ100,
                      max_pages=univ100.max_pages, stop_after_known_pages=univ100.stop_after_known_pages)
        if univ100.source == "snapshot":
            return await crawl(Univ100Snapshot(univ100.snapshot_dir), out_dir, **kwargs)
        async with PoliteClient(univ100.http) as client:
            api = Univ100Api(client, univ100.base_url, univ100.campus_id, univ100.page_size, univ100.dept_id, univ100.keyword)
            m = await crawl(api, out_dir, **kwargs)
            log.info("univ100 http: %s", dict(client.stats))
            return m

    return StageOutput.of(out_dir, asyncio.run(main()))


# ----- Prefect task -----------------------------------------------------------

def cache_key(univ100: Univ100Config) -> str:
    """What the config does not show: the snapshot's content, or the live site's time bucket (cache reuse window)."""
    return "snapshot-" + _store.tree_hash(univ100.snapshot_dir) if univ100.source == "snapshot" else time_window(univ100.refresh_every_hours)


STAGE = Stage(name="crawl-univ100", module=__name__, profile="data", section="univ100", key=cache_key)


@stage_task(STAGE, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_on_network)
def crawl_univ100_task(univ100: Univ100Config) -> StageOutput:
    """Network stage: a network failure is retried, a bad page never (it is quarantined)."""
    out = run_crawl(univ100)
    report("crawl-univ100", f"univ100 crawl (campus {univ100.campus_id})", out.counts)
    return out
