"""Stage 2b: generate Korean instruction/input/output rows from CBNU pages with a chat model.

Run as: culbot generate-qa --pages raw/cbnu/ --out raw/cbnu_qa/ [--backend openai --base-url URL --model NAME]

Pages are chunked to fit the model's budget (nothing is cut silently), each chunk is
one Chat Completions request with the versioned prompt, answers are parsed and
validated, and everything that fails goes to quarantine.jsonl with the reason and
the raw answer. Answers are cached per (chunk hash, prompt version, model,
temperature), so a rerun over unchanged pages makes zero API calls. The ``replay``
backend answers from recorded responses keyed the same way (offline).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from prefect import task

from culbot.pipeline_config.schema import PACKAGE_DIR, ConfigError, QAGenConfig

from . import _store, _text
from ._http import Progress, backoff_delay, parse_retry_after
from ._prefect import report, stage_cache

log = logging.getLogger("culbot.generate_qa")


class BudgetExceeded(RuntimeError):
    """The configured request or cost budget would be exceeded; the run stopped cleanly."""


class ReplayMiss(LookupError):
    """The replay backend has no recorded answer for a chunk."""


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
    version = f"{folder.name}@{_store.hash_json(parts)[:12]}"
    return QAPrompt(folder.name, parts["system.txt"], parts["user.txt"], parts["format.json"], parts["examples.json"], version)


# ----- token counting and chunking ---------------------------------------------------

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


def _pieces(text: str, budget: int, count: Callable[[str], int]) -> tuple[list[str], int]:
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
    pieces, hard = _pieces(page["text"], text_budget, count)
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


def chunk_budget(cfg: QAGenConfig, prompt: QAPrompt, count: Callable[[str], int]) -> int:
    overhead = sum(count(m["content"]) + 4 for m in prompt.messages("", cfg.items_per_chunk)) + 16
    room = cfg.context_tokens - cfg.max_tokens - overhead
    if cfg.chunk_tokens is None:
        if room < 100:
            raise ConfigError(f"qa: the prompt (~{overhead} tokens) plus max_tokens={cfg.max_tokens} leave only {room} of context_tokens={cfg.context_tokens} for page text; lower max_tokens or raise context_tokens")
        return room
    if cfg.chunk_tokens > room:
        raise ConfigError(f"qa.chunk_tokens={cfg.chunk_tokens} does not fit: context_tokens={cfg.context_tokens} - max_tokens={cfg.max_tokens} - prompt ~{overhead} leaves {room}")
    return cfg.chunk_tokens


def cache_key(chunk_hash: str, prompt_version: str, model: str, temperature: float) -> str:
    return _store.hash_json([chunk_hash, prompt_version, model, float(temperature)])


# ----- parsing and validation ----------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def parse_answer(content: str) -> list[Any]:
    """The JSON list in an answer, tolerating code fences and prose around it."""
    if not content or not content.strip():
        raise AnswerParseError("empty answer")
    candidates = [m.group(1) for m in _FENCE.finditer(content)] + [content]
    for cand in candidates:
        cand = cand.strip()
        for text in (cand, cand[cand.find("["): cand.rfind("]") + 1] if "[" in cand else ""):
            if not text:
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):  # {"data": [...]} and similar wrappers
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else ([data] if "instruction" in data else None)
            if isinstance(data, list):
                return data
    raise AnswerParseError("no JSON list found in the answer")


@dataclass
class ItemRules:
    min_korean_ratio: float = 0.5
    max_output_words: int = 100
    min_grounding: float = 0.35


def validate_item(item: Any, source_text: str, rules: ItemRules) -> tuple[dict | None, str | None]:
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
    score = _text.grounding_score(fields["output"], source_text)
    if score < rules.min_grounding:
        return None, "ungrounded"
    fields["grounding"] = round(score, 3)
    return fields, None


# ----- backends -------------------------------------------------------------------

@dataclass
class Completion:
    content: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RetryableError(RuntimeError):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class RequestRejected(RuntimeError):
    """The server refused this request for good (e.g. HTTP 400: prompt too long); not retried."""


class ChatBackend(Protocol):
    live: bool

    async def complete(self, messages: list[dict], key: str) -> Completion: ...


class OpenAIBackend:
    """Any OpenAI-compatible Chat Completions server, through the official client."""

    live = True

    def __init__(self, *, model: str, base_url: str | None, api_key_env: str, temperature: float, max_tokens: int, timeout_s: float,
                 secret_block: str | None = None):
        import openai

        key = os.environ.get(api_key_env) or (_secret_block(secret_block) if secret_block else None)
        if not key:
            if base_url is None and not os.environ.get("OPENAI_BASE_URL"):
                raise ConfigError(f"qa.api_key_env: environment variable {api_key_env} is not set (and no qa.api_key_secret_block). Export the key, or use qa.backend=replay for offline runs.")
            key = "not-needed"  # local servers (vLLM, Ollama) usually ignore the key
        self._openai = openai
        # max_retries=0: we retry ourselves, so every attempt is counted against the budget.
        self.client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.rate_limit_headers: dict[str, str] = {}

    async def complete(self, messages: list[dict], key: str) -> Completion:
        o = self._openai
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        except o.RateLimitError as e:
            raise RetryableError("HTTP 429 rate limited", _retry_after(e.response.headers)) from None
        except o.InternalServerError as e:
            raise RetryableError(f"HTTP {e.status_code} server error", _retry_after(e.response.headers)) from None
        except o.APITimeoutError:
            raise RetryableError("timed out") from None
        except o.APIConnectionError as e:
            raise RetryableError(f"connection error: {e}") from None
        except o.AuthenticationError:
            raise ConfigError("qa: the API rejected the key (HTTP 401). Check the key in the environment variable, not in config.") from None
        except o.APIStatusError as e:
            raise RequestRejected(f"HTTP {e.status_code}: {e.message}") from None
        self.rate_limit_headers = {k: v for k, v in raw.headers.items() if k.lower().startswith("x-ratelimit-")}
        resp = raw.parse()
        if not resp.choices:
            return Completion("", "no_choices")
        choice = resp.choices[0]
        usage = resp.usage
        return Completion(choice.message.content or "", choice.finish_reason or "",
                          usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    async def close(self) -> None:
        await self.client.close()


def _secret_block(name: str) -> str:
    """The key from a Prefect Secret block; never logged."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name, _sync=True).get()
    except ValueError as e:
        raise ConfigError(f"qa.api_key_secret_block: Prefect Secret block {name!r} not found ({e})") from None


def _retry_after(headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


class ReplayBackend:
    """Recorded answers (*.jsonl lines with key, content, finish_reason) keyed like the cache."""

    live = False

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"qa.replay_dir: {self.folder} not found")
        self.answers: dict[str, dict] = {}
        for p in sorted(self.folder.glob("*.jsonl")):
            for row in _store.read_jsonl(p):
                self.answers[row["key"]] = row

    async def complete(self, messages: list[dict], key: str) -> Completion:
        row = self.answers.get(key)
        if row is None:
            raise ReplayMiss(f"no recorded answer for key {key[:16]}… in {self.folder}; record one with qa.backend=openai and qa.record_replay=FILE")
        return Completion(row["content"], row.get("finish_reason", "stop"), row.get("prompt_tokens", 0), row.get("completion_tokens", 0))

    async def close(self) -> None:
        pass


# ----- ledger, limits and the run --------------------------------------------------

@dataclass
class Ledger:
    model: str
    price_in: float
    price_out: float
    requests: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    replayed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    answers_unparsable: int = 0
    answers_truncated: int = 0
    answers_short: int = 0
    items_ok: int = 0
    items_quarantined: int = 0
    rate_limit_headers: dict[str, str] = field(default_factory=dict)

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["cost_usd"] = round(self.cost_usd, 6)
        return d

    def table(self) -> str:
        rows = [("model", self.model), ("chunks", self.chunks), ("API requests", self.requests), ("retries", self.retries),
                ("cache hits", self.cache_hits), ("replayed", self.replayed), ("prompt tokens", self.prompt_tokens),
                ("completion tokens", self.completion_tokens), ("estimated cost (USD)", f"{self.cost_usd:.4f}"),
                ("items kept", self.items_ok), ("items quarantined", self.items_quarantined),
                ("unparsable answers", self.answers_unparsable), ("truncated answers", self.answers_truncated),
                ("short lists", self.answers_short)]
        if self.errors:
            rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items()))))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


class _Limiter:
    """Cap on requests in flight plus a minimum spacing from requests_per_minute."""

    def __init__(self, in_flight: int, rpm: float):
        self.sem = asyncio.Semaphore(in_flight)
        self.interval = 60.0 / rpm
        self.lock = asyncio.Lock()
        self.next_at = 0.0

    async def turn(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class _Cache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return _store.read_json(p)
        except (json.JSONDecodeError, OSError):
            return None  # a damaged entry is a miss, never trusted

    def put(self, key: str, entry: dict) -> None:
        _store.atomic_write_json(self._path(key), entry)


@dataclass
class Settings:
    model: str
    temperature: float
    items_per_chunk: int
    max_in_flight: int
    requests_per_minute: float
    max_retries: int
    parse_retries: int
    backoff_base_s: float
    retry_after_max_s: float
    max_requests: int | None
    max_cost_usd: float | None
    max_tokens: int
    price_in: float
    price_out: float
    rules: ItemRules
    retry_failed: bool = False

    @classmethod
    def from_config(cls, cfg: QAGenConfig, retry_failed: bool = False) -> "Settings":
        return cls(cfg.model, cfg.temperature, cfg.items_per_chunk, cfg.max_in_flight, cfg.requests_per_minute,
                   cfg.max_retries, cfg.parse_retries, cfg.backoff_base_s, cfg.retry_after_max_s, cfg.max_requests,
                   cfg.max_cost_usd, cfg.max_tokens, cfg.price_input_per_million, cfg.price_output_per_million,
                   ItemRules(cfg.min_korean_ratio, cfg.max_output_words, cfg.min_grounding), retry_failed)


async def generate(
    chunks: list[Chunk],
    prompt: QAPrompt,
    backend: ChatBackend,
    cache: _Cache,
    s: Settings,
    *,
    count: Callable[[str], int] = estimate_tokens,
    record_to: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], list[dict], Ledger]:
    """Answer every chunk (cache, then backend), validate, and return (rows, quarantine, ledger)."""
    ledger = Ledger(s.model, s.price_in, s.price_out, chunks=len(chunks))
    limiter = _Limiter(s.max_in_flight, s.requests_per_minute)
    quarantine: list[dict] = []
    answers: dict[int, tuple[Chunk, dict]] = {}
    progress = Progress("qa chunks", total=len(chunks), logger=log)
    done = [0]
    stop: list[BaseException] = []
    recorded: list[dict] = []

    def charge_check(prompt_tokens_est: int) -> None:
        if s.max_requests is not None and ledger.requests >= s.max_requests:
            raise BudgetExceeded(f"request budget reached: {ledger.requests} of qa.max_requests={s.max_requests}")
        if s.max_cost_usd is not None:
            worst = ledger.cost_usd + (prompt_tokens_est * s.price_in + s.max_tokens * s.price_out) / 1e6
            if worst > s.max_cost_usd:
                raise BudgetExceeded(f"cost budget reached: ${ledger.cost_usd:.4f} spent, the next request could pass qa.max_cost_usd=${s.max_cost_usd:.2f}")

    async def call(messages: list[dict], key: str, prompt_est: int) -> Completion:
        for attempt in range(s.max_retries + 1):
            if stop:
                raise stop[0]
            async with limiter.sem:
                if backend.live:  # recorded answers cost nothing and need no pacing
                    await limiter.turn()
                    charge_check(prompt_est)
                    ledger.requests += 1
                try:
                    comp = await backend.complete(messages, key)
                except RetryableError as e:
                    ledger.errors[e.reason] = ledger.errors.get(e.reason, 0) + 1
                    err = e
                else:
                    ledger.prompt_tokens += comp.prompt_tokens if backend.live else 0
                    ledger.completion_tokens += comp.completion_tokens if backend.live else 0
                    return comp
            if attempt == s.max_retries:
                break
            delay = backoff_delay(attempt, s.backoff_base_s, 60.0)
            if err.retry_after is not None:
                if err.retry_after > s.retry_after_max_s:
                    raise RetryableError(f"{err.reason}; server asks to wait {err.retry_after:.0f}s, over qa.retry_after_max_s")
                delay = max(delay, err.retry_after)
            ledger.retries += 1
            log.info("LLM request %s…: %s; retrying in %.1fs (%d/%d)", key[:10], err.reason, delay, attempt + 1, s.max_retries)
            await asyncio.sleep(delay)
        raise RetryableError(f"{err.reason} after {s.max_retries + 1} attempts")

    async def answer(i: int, ch: Chunk) -> None:
        key = cache_key(ch.hash, prompt.version, s.model, s.temperature)
        try:
            entry = cache.get(key)
            if entry and s.retry_failed and entry.get("outcome") != "ok":
                entry = None
            if entry:
                ledger.cache_hits += 1
            else:
                messages = prompt.messages(ch.information, s.items_per_chunk)
                est = sum(count(m["content"]) for m in messages)
                for parse_try in range(s.parse_retries + 1):
                    comp = await call(messages, key, est)
                    outcome = "ok"
                    if comp.finish_reason == "length":
                        outcome = "truncated"
                        break
                    try:
                        parse_answer(comp.content)
                        break
                    except AnswerParseError:
                        outcome = "unparsable"
                        if parse_try < s.parse_retries and backend.live:
                            log.info("answer for %s chunk %d is not a JSON list; asking again (%d/%d)", ch.url, ch.index, parse_try + 1, s.parse_retries)
                            continue
                        break
                if not backend.live:
                    ledger.replayed += 1
                entry = {"key": key, "chunk_hash": ch.hash, "prompt_version": prompt.version, "model": s.model,
                         "temperature": s.temperature, "content": comp.content, "finish_reason": comp.finish_reason,
                         "prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
                         "outcome": outcome, "url": ch.url, "chunk_index": ch.index, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                cache.put(key, entry)
                if backend.live and record_to is not None:
                    recorded.append(entry)
            answers[i] = (ch, entry)
        except ReplayMiss as e:
            quarantine.append({"stage": "generate_qa", "url": ch.url, "chunk_index": ch.index, "chunk_hash": ch.hash, "reason": "no_recorded_answer", "detail": str(e)})
        except RetryableError as e:
            quarantine.append({"stage": "generate_qa", "url": ch.url, "chunk_index": ch.index, "chunk_hash": ch.hash, "reason": "request_failed", "detail": e.reason})
        except RequestRejected as e:
            quarantine.append({"stage": "generate_qa", "url": ch.url, "chunk_index": ch.index, "chunk_hash": ch.hash, "reason": "request_rejected", "detail": str(e)})
        except (BudgetExceeded, ConfigError) as e:
            if not stop:
                stop.append(e)
        finally:
            done[0] += 1
            progress.advance()
            if on_progress:
                on_progress(done[0], len(chunks))

    await asyncio.gather(*(answer(i, ch) for i, ch in enumerate(chunks)))
    if recorded:
        existing = _store.read_jsonl(record_to) if Path(record_to).exists() else []
        keys = {r["key"] for r in recorded}
        _store.atomic_write_jsonl(record_to, [r for r in existing if r["key"] not in keys] + recorded)
    if stop:
        ledger.errors["stopped"] = 1
        raise stop[0]

    # Validate in chunk order so results and dedup are deterministic.
    rows: list[dict] = []
    seen: set[str] = set()
    for i in sorted(answers):
        ch, entry = answers[i]
        base = {"stage": "generate_qa", "url": ch.url, "title": ch.title, "chunk_index": ch.index, "chunk_hash": ch.hash, "cache_key": entry["key"]}
        if entry["finish_reason"] == "length":
            ledger.answers_truncated += 1
            quarantine.append({**base, "reason": "finish_reason_length", "raw": entry["content"]})
            continue
        try:
            items = parse_answer(entry["content"])
        except AnswerParseError as e:
            ledger.answers_unparsable += 1
            quarantine.append({**base, "reason": f"unparsable: {e}", "raw": entry["content"]})
            continue
        if len(items) < s.items_per_chunk:
            ledger.answers_short += 1
        for n, item in enumerate(items):
            clean, reason = validate_item(item, ch.information, s.rules)
            if clean is not None:
                dedup = _text.one_line(clean["instruction"] + " " + clean["input"]).lower()
                if dedup in seen:
                    clean, reason = None, "duplicate_instruction"
                else:
                    seen.add(dedup)
            if clean is None:
                ledger.items_quarantined += 1
                quarantine.append({**base, "item_index": n, "reason": reason, "item": item})
                continue
            ledger.items_ok += 1
            rows.append({"id": f"cbnu:{entry['key'][:12]}:{n}", "source": "cbnu", "instruction": clean["instruction"],
                         "input": clean["input"], "output": clean["output"], "url": ch.url, "title": ch.title,
                         "chunk_hash": ch.hash, "grounding": clean["grounding"]})
    if isinstance(backend, OpenAIBackend):
        ledger.rate_limit_headers = backend.rate_limit_headers
    return rows, quarantine, ledger


def make_backend(cfg: QAGenConfig) -> ChatBackend:
    if cfg.backend == "replay":
        return ReplayBackend(cfg.replay_dir)
    return OpenAIBackend(model=cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                         temperature=cfg.temperature, max_tokens=cfg.max_tokens, timeout_s=cfg.timeout_s,
                         secret_block=cfg.api_key_secret_block)


def run_generate(cfg: QAGenConfig, pages_dir: Path, out_dir: Path | None = None, *, retry_failed: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Read <pages_dir>/pages.jsonl, generate and validate, write rows/quarantine/ledger and the manifest."""
    pages_dir, out_dir = Path(pages_dir), Path(out_dir or cfg.out_dir)
    pages_file = pages_dir / "pages.jsonl"
    if not pages_file.is_file():
        raise FileNotFoundError(f"{pages_file}: not found; run `culbot crawl cbnu --out {pages_dir}` first")
    t0 = time.monotonic()
    prompt = load_prompt(cfg.prompt)
    count = make_counter(cfg.token_counter, cfg.model)
    budget = chunk_budget(cfg, prompt, count)
    pages = _store.read_jsonl(pages_file)
    chunks: list[Chunk] = []
    hard = 0
    for page in pages:
        cs, h = chunk_page(page, budget, count)
        chunks += cs
        hard += h
    log.info("qa: %d pages -> %d chunks (budget %d tokens each, %d split mid-sentence); prompt %s, model %s, backend %s",
             len(pages), len(chunks), budget, hard, prompt.version, cfg.model, cfg.backend)
    (out_dir / _store.MANIFEST).unlink(missing_ok=True)
    backend = make_backend(cfg)

    async def main():
        try:
            return await generate(chunks, prompt, backend, _Cache(cfg.cache_dir), Settings.from_config(cfg, retry_failed),
                                  count=count, record_to=cfg.record_replay, on_progress=on_progress)
        finally:
            await backend.close()

    try:
        rows, quarantine, ledger = asyncio.run(main())
    except BudgetExceeded as e:
        raise BudgetExceeded(f"{e}. Answers so far are cached in {cfg.cache_dir}; raise the budget and rerun to continue.") from None
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    _store.atomic_write_json(out_dir / "ledger.json", ledger.as_dict())
    log.info("qa ledger\n%s", ledger.table())
    reasons: dict[str, int] = {}
    for q in quarantine:
        r = q["reason"].split(":")[0]
        reasons[r] = reasons.get(r, 0) + 1
    counts = {"pages": len(pages), "chunks": len(chunks), "hard_splits": hard, "rows": len(rows),
              "quarantined": len(quarantine), "quarantine_reasons": reasons, "requests": ledger.requests,
              "cache_hits": ledger.cache_hits, "cost_usd": round(ledger.cost_usd, 6)}
    return _store.write_manifest(
        out_dir, stage="generate_qa",
        inputs={"pages": str(pages_dir), "pages_hash": (_store.read_manifest(pages_dir) or {}).get("content_hash")},
        config={**cfg.model_dump(mode="json"), "prompt_version": prompt.version, "chunk_budget": budget},
        counts=counts, timings={"generate": time.monotonic() - t0},
        content_hash=_store.sha256_file(out_dir / "rows.jsonl"),
    )


@task(name="generate-qa", cache_policy=stage_cache(__name__), persist_result=True, retries=1, retry_delay_seconds=30)
def generate_qa_task(config: dict, pages: dict) -> dict:
    """Network stage (LLM API), so retried once; the response cache makes a retry cheap."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    cfg = QAGenConfig.model_validate(config)
    art = create_progress_artifact(0.0, key="qa-generation-progress", description="QA generation: chunks answered")
    last = [0.0]

    def on_progress(done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - last[0] >= 5 or done == total:
            last[0] = pct
            update_progress_artifact(art, pct, _sync=True)  # called from inside the asyncio loop

    m = run_generate(cfg, Path(pages["path"]), on_progress=on_progress)
    ledger = (Path(cfg.out_dir) / "ledger.json").read_text(encoding="utf-8")
    report("qa-ledger", f"QA generation ledger ({cfg.model}, {cfg.backend})", m["counts"], f"\n```json\n{ledger}```\n")
    return {"path": str(Path(cfg.out_dir).resolve()), "content_hash": m["content_hash"], "counts": m["counts"]}
