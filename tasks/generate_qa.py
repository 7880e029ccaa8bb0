"""Generate Korean instruction/input/output rows from CBNU pages with a chat model.

Run as: culbot generate-qa --pages raw/cbnu/ --out raw/cbnu_qa/ [--backend openai --base-url URL --model NAME]

Pages are chunked to fit the model's budget (chunking.py), each chunk is one Chat
Completions request with the versioned prompt (llm_client.py: pacing, retries, budget),
answers are parsed and validated here, and everything that fails goes to
quarantine.jsonl with the reason and the raw answer. Answers are cached per (chunk
hash, prompt version, model, temperature), so a rerun over unchanged pages makes zero
API calls. The ``replay`` backend answers from recorded responses keyed the same way.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from culbot.pipeline_config.schema import PACKAGE_DIR, ConfigError, QAGenConfig

from . import _store, _text, grounding
from ._http import Progress
from ._prefect import report, retry_on_network, stage_task, table
from .chunking import Chunk, chunk_budget, chunk_page, estimate_tokens, make_counter
from .contracts import Stage, StageOutput, StageRef, short_hash
from .llm_client import BudgetExceeded, Completion, Ledger, LLMClient, ReplayMiss, RequestFailed, RequestRejected, ResponseCache, make_backend

log = logging.getLogger("culbot.generate_qa")


class AnswerParseError(ValueError):
    """A model answer holds no JSON list of items."""


# ----- prompt --------------------------------------------------------------------

@dataclass(frozen=True)
class QAPrompt:
    name: str
    system: str
    user: str
    format: str
    examples: str
    version: str  # name@hash of the files: part of every cache key

    def messages(self, information: str, n_items: int) -> list[dict[str, str]]:
        user = (self.user.replace("{information}", information).replace("{format}", self.format)
                .replace("{example}", self.examples).replace("{n_items}", str(n_items)))
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def load_prompt(name_or_path: str) -> QAPrompt:
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = PACKAGE_DIR / "prompts" / "qa" / name_or_path
    if not folder.is_dir():
        raise ConfigError(f"qa.prompt: prompt {name_or_path!r} not found (looked in {folder})")
    parts = {}
    for fname in ("system.txt", "user.txt", "format.json", "examples.json"):
        p = folder / fname
        if not p.is_file():
            raise ConfigError(f"{folder}: prompt version is missing {fname}")
        parts[fname] = p.read_text(encoding="utf-8").strip()
    for fname in ("format.json", "examples.json"):
        try:
            json.loads(parts[fname])
        except json.JSONDecodeError as e:
            raise ConfigError(f"{folder / fname}: not valid JSON ({e})") from None
    missing = [ph for ph in ("{information}", "{format}", "{example}") if ph not in parts["user.txt"]]
    if missing:
        raise ConfigError(f"{folder / 'user.txt'}: missing placeholder(s) {', '.join(missing)}")
    version = f"{folder.name}@{short_hash(_store.hash_json(parts))}"
    return QAPrompt(folder.name, parts["system.txt"], parts["user.txt"], parts["format.json"], parts["examples.json"], version)


def response_key(chunk_hash: str, prompt_version: str, model: str, temperature: float) -> str:
    return _store.hash_json([chunk_hash, prompt_version, model, float(temperature)])


# ----- parsing and validation ----------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def _as_list(data: Any) -> list | None:
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else ([data] if "instruction" in data else None)
    return data if isinstance(data, list) else None


def parse_answer_repairing(content: str) -> tuple[list[Any], bool]:
    """(the JSON list in an answer, whether it had to be repaired). Code fences and prose around it are tolerated;
    JSON that is almost right (a trailing comma, single quotes, a raw newline in a string) is repaired by json-repair
    instead of paying for a new answer. An answer cut at the token limit never gets here (finish_reason=length)."""
    if not content or not content.strip():
        raise AnswerParseError("empty answer")
    candidates = [m.group(1).strip() for m in _FENCE.finditer(content)] + [content.strip()]
    texts = [t for c in candidates for t in (c, c[c.find("["): c.rfind("]") + 1] if "[" in c else "") if t]
    for text in texts:
        try:
            data = _as_list(json.loads(text))
        except json.JSONDecodeError:
            continue
        if data is not None:
            return data, False
    import json_repair

    for text in texts:
        data = _as_list(json_repair.loads(text))
        if data and all(isinstance(x, dict) for x in data) and any("instruction" in x for x in data):
            return data, True
    raise AnswerParseError("no JSON list found in the answer")


def parse_answer(content: str) -> list[Any]:
    """The JSON list in an answer (see :func:`parse_answer_repairing`)."""
    return parse_answer_repairing(content)[0]


def validate_item(item: Any, source_text: str, rules: QAGenConfig) -> tuple[dict | None, str | None]:
    """(clean item, None) or (None, reason)."""
    if not isinstance(item, dict):
        return None, "not_an_object"
    fields, reason = _text.instruction_fields(item)
    if fields is None:
        return None, reason
    letters_text = fields["instruction"] + " " + fields["output"]
    if _text.LETTER_RE.search(letters_text) and _text.hangul_ratio(letters_text) < rules.min_korean_ratio:
        return None, "not_korean"
    if len(fields["output"].split()) > rules.max_output_words:
        return None, "output_too_long"
    invented = _text.contacts(" ".join(fields.values())) - _text.contacts(source_text)
    if invented:
        return None, "contact_not_in_source"
    score, reason = grounding.check(f"{fields['input']}\n{fields['output']}".strip(), source_text, rules.min_grounding)
    if reason is not None:
        return None, reason
    fields["grounding"] = round(score, 3)
    return fields, None


async def ask(ch: Chunk, key: str, prompt: QAPrompt, client: LLMClient, qa: QAGenConfig, count: Callable[[str], int]) -> tuple[Completion, str]:
    """The model's answer for one chunk and its outcome (ok, truncated, unparsable); an unparsable answer from a live
    model is asked again up to ``qa.parse_retries`` times."""
    messages = prompt.messages(ch.information, qa.items_per_chunk)
    est = sum(count(m["content"]) for m in messages)
    for parse_try in range(qa.parse_retries + 1):
        comp: Completion = await client.complete(messages, key, est)
        if comp.finish_reason == "length":
            return comp, "truncated"
        try:
            parse_answer(comp.content)
            return comp, "ok"
        except AnswerParseError:
            if not (parse_try < qa.parse_retries and client.backend.live):
                return comp, "unparsable"
            log.info("answer for %s chunk %d is not a JSON list; asking again (%d/%d)", ch.url, ch.index, parse_try + 1, qa.parse_retries)
    raise AssertionError("unreachable")


def cache_entry(key: str, ch: Chunk, prompt: QAPrompt, qa: QAGenConfig, comp: Completion, outcome: str) -> dict:
    """What the response cache keeps of an answer (and a recorded replay holds)."""
    return {"key": key, "chunk_hash": ch.hash, "prompt_version": prompt.version, "model": qa.model,
            "temperature": qa.temperature, "content": comp.content, "finish_reason": comp.finish_reason,
            "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
            "outcome": outcome, "url": ch.url, "chunk_index": ch.index, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


REQUEST_FAULTS = {ReplayMiss: "no_recorded_answer", RequestFailed: "request_failed", RequestRejected: "request_rejected"}


async def answer_all(chunks: list[Chunk], prompt: QAPrompt, client: LLMClient, cache: ResponseCache, qa: QAGenConfig, *,
                     retry_failed: bool, count: Callable[[str], int], on_progress: Callable[[int, int], None] | None,
                     quarantine: list[dict]) -> tuple[dict[int, tuple[Chunk, dict]], list[dict]]:
    """Every chunk's cache entry, from the cache or the client, by chunk position, and the entries answered live now.
    A chunk whose request failed goes to ``quarantine``; a spent budget stops the client (the caller raises it)."""
    ledger, live = client.ledger, client.backend.live
    answers: dict[int, tuple[Chunk, dict]] = {}
    fresh: list[dict] = []
    progress = Progress("qa chunks", total=len(chunks), logger=log)
    done = 0

    async def answer(i: int, ch: Chunk) -> None:
        nonlocal done
        key = response_key(ch.hash, prompt.version, qa.model, qa.temperature)
        try:
            entry = cache.get(key)
            if entry and retry_failed and entry.get("outcome") != "ok":
                entry = None
            if entry:
                ledger.cache_hits += 1
            else:
                entry = cache_entry(key, ch, prompt, qa, *await ask(ch, key, prompt, client, qa, count))
                ledger.replayed += not live
                await asyncio.to_thread(cache.put, key, entry)   # its fsync off the event loop: the other requests go on
                if live:
                    fresh.append(entry)
            answers[i] = (ch, entry)
        except tuple(REQUEST_FAULTS) as e:
            quarantine.append({"stage": "generate-qa", "url": ch.url, "chunk_index": ch.index, "chunk_hash": ch.hash,
                               "reason": next(r for cls, r in REQUEST_FAULTS.items() if isinstance(e, cls)), "detail": str(e)})
        except (BudgetExceeded, ConfigError) as e:
            client.stop(e)
        finally:
            done += 1
            progress.advance()
            if on_progress:
                on_progress(done, len(chunks))

    # Tasks, so that a stop (budget spent) can cancel the ones still waiting for their turn.
    await asyncio.gather(*(asyncio.create_task(answer(i, ch)) for i, ch in enumerate(chunks)), return_exceptions=True)
    return answers, fresh


def record_replay(record_to: Path, entries: list[dict]) -> None:
    """Add live answers to a replay file, replacing older answers with the same key."""
    existing = _store.read_jsonl(record_to) if Path(record_to).exists() else []
    keys = {r["key"] for r in entries}
    _store.atomic_write_jsonl(record_to, [r for r in existing if r["key"] not in keys] + entries)


def candidate_rows(answers: dict[int, tuple[Chunk, dict]], qa: QAGenConfig, ledger: Ledger,
                   quarantine: list[dict]) -> list[tuple[dict, dict, Chunk]]:
    """(row, where it came from, chunk) for every item that parses and validates, in chunk order (so results and dedup
    are deterministic); the rest go to ``quarantine`` with their reason."""
    candidates: list[tuple[dict, dict, Chunk]] = []
    seen: set[str] = set()
    for i in sorted(answers):
        ch, entry = answers[i]
        base = {"stage": "generate-qa", "url": ch.url, "title": ch.title, "chunk_index": ch.index, "chunk_hash": ch.hash, "cache_key": entry["key"]}
        if entry["finish_reason"] == "length":
            ledger.answers_truncated += 1
            quarantine.append({**base, "reason": "finish_reason_length", "raw": entry["content"]})
            continue
        try:
            items, repaired = parse_answer_repairing(entry["content"])
            ledger.answers_repaired += repaired
        except AnswerParseError as e:
            ledger.answers_unparsable += 1
            quarantine.append({**base, "reason": f"unparsable: {e}", "raw": entry["content"]})
            continue
        ledger.answers_short += len(items) < qa.items_per_chunk
        for n, item in enumerate(items):
            clean, reason = validate_item(item, ch.information, qa)
            if clean is not None:
                dedup = _text.one_line(clean["instruction"] + " " + clean["input"]).lower()
                if dedup in seen:
                    clean, reason = None, "duplicate_instruction"
                seen.add(dedup)
            if clean is None:
                ledger.items_quarantined += 1
                quarantine.append({**base, "item_index": n, "reason": reason, "item": item})
                continue
            row = {"id": f"cbnu:{short_hash(entry['key'])}:{n}", "source": "cbnu", "instruction": clean["instruction"],
                   "input": clean["input"], "output": clean["output"], "url": ch.url, "title": ch.title,
                   "chunk_hash": ch.hash, "grounding": clean["grounding"]}
            candidates.append((row, {**base, "item_index": n, "item": item}, ch))
    return candidates


async def generate(
    chunks: list[Chunk],
    prompt: QAPrompt,
    client: LLMClient,
    cache: ResponseCache,
    qa: QAGenConfig,
    *,
    retry_failed: bool = False,
    count: Callable[[str], int] = estimate_tokens,
    record_to: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], list[dict], Ledger]:
    """Answer every chunk (cache, then the client), validate, judge if asked, and return (rows, quarantine, ledger)."""
    ledger = client.ledger
    ledger.chunks = len(chunks)
    quarantine: list[dict] = []
    answers, fresh = await answer_all(chunks, prompt, client, cache, qa, retry_failed=retry_failed, count=count,
                                      on_progress=on_progress, quarantine=quarantine)
    if fresh and record_to is not None:
        record_replay(record_to, fresh)
    if client.stopped is not None:
        ledger.errors["stopped"] = 1
        raise client.stopped
    candidates = candidate_rows(answers, qa, ledger, quarantine)
    verdicts = await judge_rows(candidates, client, cache, qa, count) if qa.judge else [(True, "")] * len(candidates)
    rows: list[dict] = []
    for (row, where, _), (supported, why) in zip(candidates, verdicts):
        if supported:
            ledger.items_ok += 1
            rows.append(row)
        else:
            ledger.items_quarantined += 1
            ledger.judge_unsupported += 1
            quarantine.append({**where, "reason": f"judge_unsupported: {why}"})
    ledger.rate_limit_headers = getattr(client.backend, "rate_limit_headers", {})
    return rows, quarantine, ledger


async def judge_rows(candidates: list[tuple[dict, dict, Chunk]], client: LLMClient, cache: ResponseCache, qa: QAGenConfig,
                     count: Callable[[str], int]) -> list[tuple[bool, str]]:
    """(supported, reason) per candidate row from the LLM judge: one cached, paced, budgeted request each."""
    model = qa.judge_model or qa.model

    async def one(row: dict, ch: Chunk) -> tuple[bool, str]:
        key = response_key(_store.hash_json([ch.hash, row["instruction"], row["input"], row["output"]]), grounding.JUDGE_VERSION, model, 0.0)
        entry = cache.get(key)
        if entry is None:
            messages = grounding.judge_messages(row["instruction"], f"{row['input']}\n{row['output']}".strip(), ch.information)
            comp = await client.complete(messages, key, sum(count(m["content"]) for m in messages), model=model, max_tokens=qa.judge_max_tokens)
            entry = {"key": key, "kind": "judge", "model": model, "content": comp.content, "finish_reason": comp.finish_reason,
                     "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens, "url": ch.url}
            await asyncio.to_thread(cache.put, key, entry)   # its fsync off the event loop: the other requests go on
        client.ledger.judged += 1
        return grounding.parse_verdict(entry["content"])

    results = await asyncio.gather(*(asyncio.create_task(one(row, ch)) for row, _, ch in candidates), return_exceptions=True)
    if client.stopped is not None:
        raise client.stopped
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def run_generate(qa: QAGenConfig, pages_dir: Path, out_dir: Path | None = None, *, retry_failed: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> StageOutput:
    """Read <pages_dir>/pages.jsonl, generate and validate, write rows/quarantine/ledger and the manifest."""
    pages_dir, out_dir = Path(pages_dir), Path(out_dir or qa.out_dir)
    pages_file = pages_dir / "pages.jsonl"
    if not pages_file.is_file():
        raise FileNotFoundError(f"{pages_file}: not found; run `culbot crawl cbnu --out {pages_dir}` first")
    t0 = time.monotonic()
    prompt = load_prompt(qa.prompt)
    count = make_counter(qa.token_counter, qa.model)
    budget = chunk_budget(qa, sum(count(m["content"]) + 4 for m in prompt.messages("", qa.items_per_chunk)) + 16)
    pages = _store.read_jsonl(pages_file)
    chunks: list[Chunk] = []
    hard = 0
    for page in pages:
        cs, h = chunk_page(page, budget, count)
        chunks += cs
        hard += h
    log.info("qa: %d pages -> %d chunks (budget %d tokens each, %d split mid-sentence); prompt %s, model %s, backend %s",
             len(pages), len(chunks), budget, hard, prompt.version, qa.model, qa.backend)
    _store.reopen(out_dir)
    backend = make_backend(qa)
    client = LLMClient(qa, backend, Ledger(qa.model, qa.price_input_per_million, qa.price_output_per_million))

    async def main():
        try:
            return await generate(chunks, prompt, client, ResponseCache(qa.cache_dir), qa, retry_failed=retry_failed,
                                  count=count, record_to=qa.record_replay, on_progress=on_progress)
        finally:
            await backend.close()

    try:
        rows, quarantine, ledger = asyncio.run(main())
    except BudgetExceeded as e:
        _store.atomic_write_json(out_dir / "ledger.json", client.ledger.as_dict())   # what the stopped run spent
        log.info("qa ledger (stopped)\n%s", client.ledger.table())
        raise BudgetExceeded(f"{e}. Answers so far are cached in {qa.cache_dir}; raise the budget and rerun to continue.") from None
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    _store.atomic_write_json(out_dir / "ledger.json", ledger.as_dict())
    log.info("qa ledger\n%s", ledger.table())
    reasons: dict[str, int] = {}
    for q in quarantine:
        r = q["reason"].split(":")[0]
        reasons[r] = reasons.get(r, 0) + 1
    if chunks and not rows:   # never a finished output of nothing: the stage fails, and nothing downstream trains on it
        common = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        raise NoUsableRows(f"generate-qa: none of {len(chunks)} chunks gave a usable row "
                           f"({', '.join(f'{r} ×{n}' for r, n in common) or 'no answer'}); every answer is in "
                           f"{out_dir / 'quarantine.jsonl'} with its reason. Answers are cached in {qa.cache_dir}: a rerun pays only "
                           f"for what a changed setting (qa.max_tokens, the model, the prompt) asks again")
    counts = {"pages": len(pages), "chunks": len(chunks), "hard_splits": hard, "rows": len(rows),
              "quarantined": len(quarantine), "quarantine_reasons": reasons, "requests": ledger.requests,
              "cache_hits": ledger.cache_hits, "cost_usd": round(ledger.cost_usd, 6)}
    pages_m = _store.read_manifest(pages_dir)
    m = _store.write_manifest(
        out_dir, stage="generate-qa", inputs={"pages": pages_m.content_hash if pages_m else "unversioned"},
        config={**qa.model_dump(mode="json"), "prompt_version": prompt.version, "chunk_budget": budget},
        counts=counts, timings={"generate": time.monotonic() - t0},
        content_hash=_store.sha256_file(out_dir / "rows.jsonl"),
    )
    return StageOutput.of(out_dir, m)


class NoUsableRows(ValueError):
    """Every chunk's answer was quarantined: the stage has nothing to hand on."""


def cache_key(qa: QAGenConfig) -> str | None:
    """What the config does not show: the content of the replay folder (recorded answers) when replaying."""
    return _store.tree_hash(Path(qa.replay_dir)) if qa.backend == "replay" and qa.replay_dir and Path(qa.replay_dir).is_dir() else None


STAGE = Stage(name="generate-qa", module=__name__, profile="data", section="qa", key=cache_key)


@stage_task(STAGE, retries=1, retry_delay_seconds=30, retry_condition_fn=retry_on_network)
def generate_qa_task(qa: QAGenConfig, pages: StageRef) -> StageOutput:
    """Network stage (LLM API): retried once after a network failure, never after a spent budget; the response cache makes a retry cheap."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    art = create_progress_artifact(0.0, key="qa-generation-progress", description="QA generation: chunks answered")
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - last[0] >= 5 or done == total:
            last[0] = pct
            update_progress_artifact(art, pct, _sync=True)  # called from inside the asyncio loop

    out = run_generate(qa, pages.path, on_progress=on_progress)
    report("generate-qa", f"QA generation counts ({qa.model}, {qa.backend})", out.counts)
    ledger = Ledger.from_dict(json.loads((Path(qa.out_dir) / "ledger.json").read_text(encoding="utf-8")))
    table("qa-ledger", f"QA generation ledger ({qa.model}, {qa.backend})", [{"what": k, "value": v} for k, v in ledger.rows()])
    return out
