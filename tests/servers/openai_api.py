"""An OpenAI-compatible Chat Completions server with scripted answers per page.

The script maps a marker (text that appears in the user message, e.g. a page title)
to a list of responses consumed in order; the last one repeats.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .base import Handler


@dataclass
class Reply:
    status: int = 200
    content: str = "[]"
    finish_reason: str = "stop"
    headers: dict = field(default_factory=dict)


@dataclass
class OpenAIApp:
    script: dict[str, list[Reply]]
    latency_s: float = 0.0
    usage_from_text: bool = False   # count tokens from the text (about cl100k's rate), not a fixed 500/200
    usage: list = field(default_factory=list)   # (prompt tokens, completion tokens) of every answer sent
    requests: int = 0
    by_marker: Counter = field(default_factory=Counter)
    bodies: list = field(default_factory=list)
    auth: set = field(default_factory=set)
    embedding_errors: list = field(default_factory=list)   # HTTP statuses the embeddings endpoint answers first, in order
    embedding_inputs: list = field(default_factory=list)   # the batch sizes it was sent
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list = field(default_factory=list)   # time.perf_counter() when each chat request arrived (benchmarks' timeline)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_reply(self, text: str) -> tuple[str, Reply]:
        with self.lock:
            for marker, replies in self.script.items():
                if marker in text:
                    self.by_marker[marker] += 1
                    return marker, (replies.pop(0) if len(replies) > 1 else replies[0])
        return "", Reply(content="[]")


def items_json(items: list[tuple[str, str, str]]) -> str:
    return json.dumps([{"instruction": a, "input": b, "output": c} for a, b, c in items], ensure_ascii=False)


def count_tokens(text: str) -> int:
    """About what cl100k counts: a token per Hangul syllable, four other characters a token."""
    hangul = sum(1 for c in text if "가" <= c <= "힣")
    other = sum(1 for c in text if not c.isspace()) - hangul
    return hangul + (other + 3) // 4


def bigram_vector(text: str, dim: int = 64) -> list[float]:
    """A deterministic embedding for tests: character bigrams hashed into ``dim`` buckets, so similar texts are close."""
    import hashlib

    v = [0.0] * dim
    t = "".join(text.split())
    for a, b in zip(t, t[1:]):
        v[int(hashlib.md5((a + b).encode()).hexdigest(), 16) % dim] += 1.0
    return v


class OpenAIHandler(Handler):
    def _embeddings(self, body: dict) -> None:
        app: OpenAIApp = self.app
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        with app.lock:
            app.requests += 1
            app.bodies.append(body)
            app.auth.add(self.headers.get("Authorization", ""))
            status = app.embedding_errors.pop(0) if app.embedding_errors else 200
            if status == 200:
                app.embedding_inputs.append(len(texts))
        if status != 200:
            return self.send_json(status, {"error": {"message": f"scripted {status}", "type": "server_error"}}, headers={"retry-after": "0"})
        data = [{"object": "embedding", "index": i, "embedding": bigram_vector(t)} for i, t in enumerate(texts)]
        self.send_json(200, {"object": "list", "data": data, "model": body.get("model", ""),
                             "usage": {"prompt_tokens": sum(map(len, texts)), "total_tokens": sum(map(len, texts))}})

    def _usage(self, prompt: str, answer: str, max_tokens: int | None) -> dict:
        if not self.app.usage_from_text:
            return {"prompt_tokens": 500, "completion_tokens": 200, "total_tokens": 700}
        p, c = count_tokens(prompt), min(count_tokens(answer), max_tokens or 10**9)
        with self.app.lock:
            self.app.usage.append((p, c))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def do_POST(self) -> None:
        app: OpenAIApp = self.app
        if self.path.rstrip("/") == "/v1/embeddings":
            return self._embeddings(json.loads(self.read_body() or b"{}"))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": "unknown path", "type": "invalid_request_error"}})
        body = json.loads(self.read_body() or b"{}")
        with app.lock:
            app.requests += 1
            app.bodies.append(body)
            app.auth.add(self.headers.get("Authorization", ""))
            app.in_flight += 1
            app.max_in_flight = max(app.max_in_flight, app.in_flight)
            app.arrivals.append(time.perf_counter())
        try:
            if app.latency_s:
                time.sleep(app.latency_s)
            text = "\n".join(m.get("content", "") for m in body.get("messages", []))
            _, reply = app.next_reply(text)
            if reply.status != 200:
                err = {"error": {"message": f"scripted {reply.status}", "type": "rate_limit_error" if reply.status == 429 else "server_error"}}
                return self.send_json(reply.status, err, headers=reply.headers)
            resp = {
                "id": f"chatcmpl-{app.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content}, "finish_reason": reply.finish_reason}],
                "usage": self._usage(text, reply.content, body.get("max_tokens")),
            }
            headers = {"x-ratelimit-remaining-requests": "99", "x-ratelimit-limit-requests": "100", **reply.headers}
            self.send_json(200, resp, headers=headers)
        finally:
            with app.lock:
                app.in_flight -= 1
