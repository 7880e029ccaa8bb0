"""The chat-model client of QA generation: backends, the response cache, pacing, retries, the budget and the ledger.

Backends answer a list of messages: any OpenAI-compatible Chat Completions server through the
official ``openai`` client, or recorded answers (``replay``, offline). :class:`LLMClient` paces
live requests (requests per minute, requests in flight) and retries transient failures with the
shared helpers in ``_http``, checks the request and cost budget before each request, and keeps
the token and cost ledger. The API key comes only from the environment or a Prefect Secret block.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from culbot.pipeline_config.schema import ConfigError, QAGenConfig

from . import _store
from ._http import GaveUp, Pacer, Transient, parse_retry_after, with_retries
from .contracts import short_hash

log = logging.getLogger("culbot.llm")


class BudgetExceeded(RuntimeError):
    """The configured request or cost budget would be exceeded; the run stopped cleanly."""


class ReplayMiss(LookupError):
    """The replay backend has no recorded answer for a chunk."""


class RequestFailed(RuntimeError):
    """A request still failed after the allowed retries."""


@dataclass
class Completion:
    content: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestRejected(RuntimeError):
    """The server refused this request for good (e.g. HTTP 400: prompt too long); not retried."""


class ChatBackend(Protocol):
    live: bool

    async def complete(self, messages: list[dict], key: str, model: str | None = None, max_tokens: int | None = None) -> Completion: ...


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

    async def complete(self, messages: list[dict], key: str, model: str | None = None, max_tokens: int | None = None) -> Completion:
        o = self._openai
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=model or self.model, messages=messages, temperature=self.temperature, max_tokens=max_tokens or self.max_tokens)
        except o.RateLimitError as e:
            raise Transient("HTTP 429 rate limited", _retry_after(e.response.headers)) from None
        except o.InternalServerError as e:
            raise Transient(f"HTTP {e.status_code} server error", _retry_after(e.response.headers)) from None
        except o.APITimeoutError:
            raise Transient("timed out") from None
        except o.APIConnectionError as e:
            raise Transient(f"connection error: {e}") from None
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

    async def complete(self, messages: list[dict], key: str, model: str | None = None, max_tokens: int | None = None) -> Completion:
        row = self.answers.get(key)
        if row is None:
            raise ReplayMiss(f"no recorded answer for key {short_hash(key)}… in {self.folder}; record one with qa.backend=openai and qa.record_replay=FILE")
        return Completion(row["content"], row.get("finish_reason", "stop"), row.get("prompt_tokens", 0), row.get("completion_tokens", 0))

    async def close(self) -> None:
        pass



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
    answers_repaired: int = 0       # almost-JSON answers repaired by json-repair instead of asked again
    answers_truncated: int = 0
    answers_short: int = 0
    items_ok: int = 0
    items_quarantined: int = 0
    judged: int = 0
    judge_unsupported: int = 0
    rate_limit_headers: dict[str, str] = field(default_factory=dict)

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    @property
    def quarantined(self) -> int:
        """Records in quarantine.jsonl: whole answers (unparsable, truncated) plus single items (invalid, duplicate, unsupported)."""
        return self.answers_unparsable + self.answers_truncated + self.items_quarantined

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        """A ledger read back from ledger.json (its derived figures are recomputed)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["cost_usd"] = round(self.cost_usd, 6)
        d["quarantined"] = self.quarantined
        return d

    def rows(self) -> list[tuple[str, object]]:
        """(what, value) in reading order: the console table and the ledger's table artifact."""
        rows = [("model", self.model), ("chunks", self.chunks), ("API requests", self.requests), ("retries", self.retries),
                ("cache hits", self.cache_hits), ("replayed", self.replayed), ("prompt tokens", self.prompt_tokens),
                ("completion tokens", self.completion_tokens), ("estimated cost (USD)", f"{self.cost_usd:.4f}"),
                ("items kept", self.items_ok), ("quarantined (quarantine.jsonl)", self.quarantined),
                ("- unparsable answers", self.answers_unparsable), ("- truncated answers", self.answers_truncated),
                ("- items", self.items_quarantined), ("items judged", self.judged), ("judged unsupported", self.judge_unsupported),
                ("repaired answers", self.answers_repaired), ("short lists", self.answers_short)]
        if self.errors:
            rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items()))))
        return rows

    def table(self) -> str:
        rows = self.rows()
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


class ResponseCache:
    """One JSON file per request key; a damaged entry is a miss, never trusted."""

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
            return None

    def put(self, key: str, entry: dict) -> None:
        _store.atomic_write_json(self._path(key), entry)


def make_backend(qa: QAGenConfig) -> "ChatBackend":
    if qa.backend == "replay":
        return ReplayBackend(qa.replay_dir)
    return OpenAIBackend(model=qa.model, base_url=qa.base_url, api_key_env=qa.api_key_env,
                         temperature=qa.temperature, max_tokens=qa.max_tokens, timeout_s=qa.timeout_s,
                         secret_block=qa.api_key_secret_block)


class LLMClient:
    """Paced, retried, budgeted requests to one backend; every attempt is counted in the ledger.

    Budget: before a request is sent, its worst-case cost (the prompt estimate plus max_tokens) is held; when
    its answer is in, the hold is swapped for what the server billed. Spent plus held never passes
    qa.max_cost_usd, so requests in flight cannot overspend it. When the budget is spent (or the key is refused),
    :meth:`stop` cancels every request that is not yet in flight: a queue of thousands ends in moments.
    """

    def __init__(self, qa: QAGenConfig, backend: "ChatBackend", ledger: Ledger):
        import asyncio

        self.qa, self.backend, self.ledger = qa, backend, ledger
        rate = qa.requests_per_minute / 60.0   # a burst of up to one second's worth: per-second limits allow it
        self.pacer = Pacer(rate, qa.max_in_flight, burst=min(qa.max_in_flight, max(1, int(rate))))
        self.rule = qa   # QAGenConfig is a RetryPolicy
        self.stopped: BaseException | None = None
        self.held_usd = 0.0
        self._budget = asyncio.Condition()
        self._waiting: set = set()   # tasks not in flight: cancelled by stop()

    def stop(self, reason: BaseException) -> None:
        """No new request starts after this; requests waiting for their turn are cancelled, those in flight finish."""
        import asyncio

        if self.stopped is None:
            self.stopped = reason
            me = asyncio.current_task()
            for t in list(self._waiting):
                if t is not me:
                    t.cancel()

    def worst_cost(self, prompt_tokens_est: int, max_tokens: int | None = None) -> float:
        return (prompt_tokens_est * self.ledger.price_in + (max_tokens or self.qa.max_tokens) * self.ledger.price_out) / 1e6

    async def _hold(self, worst: float) -> None:
        """Hold the worst-case cost of one request, waiting for requests in flight when they may leave room."""
        qa, ledger = self.qa, self.ledger
        async with self._budget:
            while True:
                if self.stopped is not None:
                    raise self.stopped
                if qa.max_requests is not None and ledger.requests >= qa.max_requests:
                    raise BudgetExceeded(f"request budget reached: {ledger.requests} of qa.max_requests={qa.max_requests}")
                if qa.max_cost_usd is None or ledger.cost_usd + self.held_usd + worst <= qa.max_cost_usd:
                    self.held_usd += worst
                    ledger.requests += 1
                    return
                if ledger.cost_usd + worst > qa.max_cost_usd:
                    raise BudgetExceeded(f"cost budget reached: ${ledger.cost_usd:.4f} spent; the next request could cost up to "
                                         f"${worst:.4f}, over qa.max_cost_usd=${qa.max_cost_usd:.4f}")
                await self._budget.wait()   # requests in flight hold the rest; their answers free what they did not use

    async def _settle(self, worst: float, comp: Completion | None) -> None:
        async with self._budget:
            self.held_usd -= worst
            if comp is not None:
                self.ledger.prompt_tokens += comp.prompt_tokens
                self.ledger.completion_tokens += comp.completion_tokens
                billed = (comp.prompt_tokens * self.ledger.price_in + comp.completion_tokens * self.ledger.price_out) / 1e6
                if billed > worst:
                    log.warning("the server billed $%.5f for a request held at $%.5f: its prompt counted more tokens than our estimate", billed, worst)
            self._budget.notify_all()

    async def complete(self, messages: list[dict], key: str, prompt_tokens_est: int, *, model: str | None = None,
                       max_tokens: int | None = None) -> Completion:
        """One answer; raises RequestFailed after the retries, BudgetExceeded when the budget is spent."""
        import asyncio

        ledger, me = self.ledger, asyncio.current_task()
        worst = self.worst_cost(prompt_tokens_est, max_tokens)

        async def attempt() -> Completion:
            if self.stopped is not None:
                raise self.stopped
            if not self.backend.live:  # recorded answers cost nothing and need no pacing
                return await self.backend.complete(messages, key, model, max_tokens)
            async with self.pacer.slot():
                await self._hold(worst)
                self._waiting.discard(me)   # in flight now: a stop lets it finish, so its answer is kept
                comp = None
                try:
                    comp = await self.backend.complete(messages, key, model, max_tokens)
                except Transient as e:
                    ledger.errors[e.reason] = ledger.errors.get(e.reason, 0) + 1
                    raise
                finally:
                    self._waiting.add(me)
                    await self._settle(worst, comp)
            return comp

        def counted(*_) -> None:
            ledger.retries += 1

        self._waiting.add(me)
        try:
            return await with_retries(attempt, self.rule, what=f"LLM request {short_hash(key)}…", setting="qa.retry_after_max_s",
                                      on_retry=counted)
        except GaveUp as e:
            raise RequestFailed(e.reason) from None
        finally:
            self._waiting.discard(me)
