"""An OpenAI-compatible HTTP API over the answering core (FastAPI + uvicorn).

Run as: culbot serve --model artifacts/models/<hash> [--index artifacts/indexes/<hash>] [--host 127.0.0.1] [--port 8000]

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models, GET /health.
Every completion carries ``sources``: the passages the answer was given with ([{title, url, doc, score}]; on the
last chunk when streaming), and ``culbot``: {refused, confidence, notes}. Extra request fields: ``retrieval``
(false: answer without the index).

One generation runs at a time; up to ``max_queue`` more wait, and past that a request gets 503 with Retry-After.
With CULBOT_API_KEY set (the name is configurable), requests need ``Authorization: Bearer <key>``. Errors are
OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .answer import Answerer, Reply

log = logging.getLogger("culbot.serve")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")   # OpenAI clients send fields we do not use (n, user, ...)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    retrieval: bool = True


class Busy(Exception):
    pass


class Gate:
    """At most ``workers + max_queue`` requests inside; one more is refused (the caller answers 503)."""

    def __init__(self, max_queue: int, workers: int = 1):
        self.limit, self.inside, self.lock = workers + max_queue, 0, threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.inside >= self.limit:
                raise Busy(f"{self.inside} requests are being answered or queued (limit {self.limit}); retry later")
            self.inside += 1

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status, headers=headers)


def split_messages(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """(the question, earlier (question, answer) turns); system messages are the template's business, not the client's."""
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must be the user's question")
    if not turns[-1].content.strip():
        raise ValueError("the user's question is empty")
    history, pending = [], None
    for m in turns[:-1]:
        if m.role == "user":
            pending = m.content
        elif pending is not None:
            history.append((pending, m.content))
            pending = None
    return turns[-1].content, history


def create_app(answerer: Answerer, *, max_queue: int = 8, api_key_env: str = "CULBOT_API_KEY"):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    info = answerer.info()
    gate = Gate(max_queue)
    app = FastAPI(title="Culbot", description="Answers about Chungbuk National University, OpenAI-compatible.", version=info.run or "dev")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", where)

    @app.exception_handler(HTTPException)
    async def http_error(_req, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def crash(_req, exc: Exception):
        log.exception("request failed")
        return error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        key = os.environ.get(api_key_env)
        if key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": info.id, "requests_inside": gate.inside, "limit": gate.limit}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": info.id, "object": "model", "created": 0, "owned_by": "culbot",
                                            "culbot": info.model_dump(exclude={"folder"})}]}   # no path of the server

    def settings(req: ChatRequest):
        spec = answerer.spec
        upd = {}
        if req.max_tokens or req.max_completion_tokens:
            upd["max_new_tokens"] = req.max_completion_tokens or req.max_tokens
        if req.temperature is not None:
            upd.update(do_sample=req.temperature > 0, **({"temperature": req.temperature} if req.temperature > 0 else {}))
        if req.top_p is not None:
            upd["top_p"] = req.top_p
        return spec.model_copy(update=upd) if upd else spec

    def extra(r: Reply) -> dict:
        return {"sources": [s.model_dump() for s in r.sources],
                "culbot": {"refused": r.refused, "confidence": r.confidence, "notes": r.notes, "template": r.template}}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.model not in (None, "", info.id):
            return error(404, f"model {req.model!r} is not served here; this server serves {info.id!r}", "invalid_request_error",
                         "model", "model_not_found")
        try:
            question, history = split_messages(req.messages)
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", "messages")
        try:
            gate.enter()
        except Busy as e:
            return error(503, str(e), "server_busy", headers={"Retry-After": "5"})
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        spec = settings(req)
        if not req.stream:
            try:
                r = await run_in_threadpool(lambda: answerer.answer(question, history, retrieval=req.retrieval, spec=spec))
            finally:
                gate.leave()
            prompt_tokens = answerer.prompt_tokens(r)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": info.id,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": r.tokens, "total_tokens": prompt_tokens + r.tokens},
                                 **extra(r)})
        try:
            r = await run_in_threadpool(lambda: answerer.reply(question, history, retrieval=req.retrieval, spec=spec))
        except BaseException:
            gate.leave()
            raise

        def events() -> Iterator[str]:
            def chunk(delta: dict, finish: str | None = None, **more) -> str:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": info.id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            try:
                yield chunk({"role": "assistant", "content": ""})
                for d in r:
                    yield chunk({"content": d})
                answerer.counted(r)
                yield chunk({}, "stop", **extra(r))
                yield "data: [DONE]\n\n"
            except Exception as e:   # headers are gone: say it in the stream, as OpenAI does
                log.exception("streaming failed")
                yield f"data: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}', 'type': 'server_error'}})}\n\n"
            finally:
                r.cancel()   # a client that went away stops its generation, freeing the model for the queue
                gate.leave()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def vllm_command(folder, card, *, host: str, port: int, served_name: str, extra: list[str] = ()) -> list[str]:
    """The `vllm serve` command for a merged model or an adapter (as a LoRA module on its base), with the training
    prompt as its chat template (the tokenizer's chat_template.jinja) and the model's generation config."""
    from pathlib import Path

    from .answer import is_adapter

    folder = Path(folder).resolve()
    template = folder / "chat_template.jinja"
    if is_adapter(folder):
        cmd = ["vllm", "serve", card.base.location(folder), *(["--revision", card.base.revision] if card.base.revision else []),
               "--enable-lora", "--lora-modules", f"{served_name}={folder}", "--max-lora-rank", str(card.hyperparameters.lora.r)]
    else:
        cmd = ["vllm", "serve", str(folder), "--served-model-name", served_name, "--generation-config", "auto"]
    if template.is_file():
        cmd += ["--chat-template", str(template)]
    return cmd + ["--host", host, "--port", str(port), *extra]
