"""An OpenAI-compatible HTTP API over the answering core (FastAPI + uvicorn).

Run as: culbot serve --model artifacts/models/<hash> [--index artifacts/indexes/<hash>] [--host 127.0.0.1] [--port 8000]

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /v1/models/{id}, GET /health. Every completion carries ``sources``: the passages the answer was given with
([{title, url, doc, score}]; on the last chunk when streaming), and ``culbot``: {refused, confidence, notes}. Extra
request fields: ``retrieval`` (false: answer without the index). Messages may be strings or lists of text parts;
``developer`` and ``system`` messages are read as the template's business (the persona is the training one);
``stream_options.include_usage`` adds the usage chunk; ``n`` other than 1 is refused.

One generation runs at a time; up to ``max_queue`` more wait, and past that a request gets 503 with Retry-After.
Requests are bounded by answer.limits (413 past max_body_bytes, 400 past the message limits). A client that goes
away stops its generation within a decoding step. With CULBOT_API_KEY set (the name is configurable), every path
but /health needs ``Authorization: Bearer <key>`` (/docs and /openapi.json included). Errors are OpenAI-shaped JSON:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .answer import Answerer, InputRejected, Reply, check_messages

log = logging.getLogger("culbot.serve")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]    # images and audio: not for this model (400)
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")   # OpenAI clients send fields we do not use (user, seed, ...)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="One answer per request.")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    retrieval: bool = True


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a student's judgement of one answer, by the id the completion returned."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=64, description="The completion's id (chatcmpl-...).")
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, description="The right answer, in the student's words.")
    comment: str | None = None


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
    """(the question, earlier (question, answer) turns); system and developer messages are the template's business
    (the persona the model was trained with), not the client's."""
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must be the user's question")
    if not turns[-1].text.strip():
        raise ValueError("the user's question is empty")
    history, pending = [], None
    for m in turns[:-1]:
        if m.role == "user":
            pending = m.text
        elif pending is not None:
            history.append((pending, m.text))
            pending = None
    return turns[-1].text, history


class BodyLimit:
    """ASGI middleware: a request body past ``max_bytes`` gets 413 before the app parses it (by Content-Length, or
    counted as it arrives when the client sends none)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.refuse(scope, receive, send)
        body, more, messages = 0, True, []
        while more:   # read it all here (it is small by then), so a body that grows past the limit is refused whole
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += len(message.get("body", b""))
            if body > self.max_bytes:
                return await self.refuse(scope, receive, send)
            more = message.get("more_body", False)

        async def replay():
            return messages.pop(0) if messages else await receive()
        return await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        response = error(413, f"the request body is larger than {self.max_bytes} bytes (answer.limits.max_body_bytes)",
                         "invalid_request_error", code="request_too_large")
        await response(scope, receive, send)


async def _next_piece(pieces):
    """The next piece of a reply from a worker thread; a cancelled request (client gone, shutdown) stops waiting at
    once, and the finally below stops the generation (which ends the thread within a decoding step)."""
    import anyio

    return await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)


def install_errors(app) -> None:
    """OpenAI-shaped JSON for every error: validation (400, bad JSON with its position), HTTP errors, crashes (500)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":   # loc is ("body", <character offset>), not a field
            at = first.get("loc", (None, None))[-1]
            return error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')} at character {at})",
                         "invalid_request_error", code="invalid_json")
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", where)

    @app.exception_handler(HTTPException)
    async def http_error(_req, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def crash(_req, exc: Exception):
        log.exception("request failed")
        return error(500, f"{type(exc).__name__}: {exc}", "server_error")


def install_auth(app, api_key_env: str) -> None:
    """With the key set, every path but /health needs it (/docs and /openapi.json describe the API: closed with it)."""
    from fastapi import Request

    @app.middleware("http")
    async def auth(request: Request, call_next):
        key = os.environ.get(api_key_env)
        if key and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error", code="invalid_api_key")
        return await call_next(request)


class Completions:
    """The chat completions of one served answerer: the queue gate, the replies in progress, the OpenAI shapes."""

    def __init__(self, answerer: Answerer, max_queue: int, feedback=None):
        self.answerer, self.info, self.gate = answerer, answerer.info(), Gate(max_queue)
        self.active: dict[int, Reply] = {}   # id -> the replies being generated
        self.feedback = feedback             # a feedback_store.FeedbackStore: every finished answer is kept under its id

    async def record(self, r: Reply, cid: str) -> None:
        """Keep a finished answer with its context, before the client can see its end (and post feedback on it)."""
        if self.feedback is None:
            return
        from starlette.concurrency import run_in_threadpool

        from .feedback_store import answer_fields

        try:
            await run_in_threadpool(self.feedback.record_answer, **answer_fields(r, self.info, channel="serve"))
        except Exception:   # the answer still goes out; its feedback will be refused as unknown
            log.exception("could not record answer %s in the feedback store", cid)

    def stop_all(self) -> None:
        for r in list(self.active.values()):
            r.cancel()

    def settings(self, req: ChatRequest):
        """The model's answer settings with this request's max_tokens, temperature and top_p."""
        upd = {}
        if req.max_tokens or req.max_completion_tokens:
            upd["max_new_tokens"] = req.max_completion_tokens or req.max_tokens
        if req.temperature is not None:
            upd.update(do_sample=req.temperature > 0, **({"temperature": req.temperature} if req.temperature > 0 else {}))
        if req.top_p is not None:
            upd["top_p"] = req.top_p
        return self.answerer.spec.model_copy(update=upd) if upd else self.answerer.spec

    def extra(self, r: Reply) -> dict:
        return {"sources": [s.model_dump() for s in r.sources],
                "culbot": {"refused": r.refused, "confidence": r.confidence, "notes": r.notes, "template": r.template}}

    def usage(self, r: Reply) -> dict:
        prompt_tokens = self.answerer.prompt_tokens(r)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": r.tokens, "total_tokens": prompt_tokens + r.tokens}

    def parse(self, req: ChatRequest):
        """(the question, earlier turns), or an OpenAI-shaped 4xx for a request this server will not answer."""
        if req.model not in (None, "", self.info.id):
            return error(404, f"model {req.model!r} is not served here; this server serves {self.info.id!r}", "invalid_request_error",
                         "model", "model_not_found")
        try:
            check_messages([m.text for m in req.messages], self.answerer.spec.limits)
            return split_messages(req.messages)
        except InputRejected as e:
            return error(e.status, str(e), "invalid_request_error", e.param, "input_too_long")
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", "messages")

    async def start(self, req: ChatRequest, question: str, history: list[tuple[str, str]]) -> Reply:
        """Retrieve and start generating (inside the gate: the caller has entered it)."""
        from starlette.concurrency import run_in_threadpool

        spec = self.settings(req)
        r = await run_in_threadpool(lambda: self.answerer.reply(question, history, retrieval=req.retrieval, spec=spec))
        self.active[id(r)] = r
        return r

    def done(self, r: Reply) -> None:
        r.cancel()   # a client that went away (or a shutdown) stops the generation, freeing the model for the queue
        self.active.pop(id(r), None)
        self.gate.leave()

    async def whole(self, r: Reply, cid: str, created: int) -> dict:
        pieces = iter(r)
        try:
            while await _next_piece(pieces) is not None:
                pass
        finally:
            self.done(r)
        self.answerer.counted(r)
        await self.record(r, cid)
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.info.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}],
                "usage": self.usage(r), **self.extra(r)}

    async def events(self, r: Reply, req: ChatRequest, cid: str, created: int):
        """Server-sent events: the role, a chunk per piece, the finish with sources, the usage if asked, [DONE]."""
        def chunk(delta: dict | None, finish: str | None = None, **more) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.info.id,
                    "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        pieces = iter(r)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (d := await _next_piece(pieces)) is not None:
                yield chunk({"content": d})
            self.answerer.counted(r)
            await self.record(r, cid)
            yield chunk({}, r.finish_reason, **self.extra(r))
            if req.stream_options and req.stream_options.include_usage:
                yield chunk(None, usage=self.usage(r))
            yield "data: [DONE]\n\n"
        except Exception as e:   # headers are gone: say it in the stream, as OpenAI does
            log.exception("streaming failed")
            yield f"data: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}', 'type': 'server_error'}})}\n\n"
        finally:
            self.done(r)


def install_feedback(app, feedback, limits) -> None:
    """POST /v1/feedback: a rating, correction or comment on an answer this server kept (404 without a store)."""
    from starlette.concurrency import run_in_threadpool

    @app.post("/v1/feedback")
    async def post_feedback(req: FeedbackRequest):
        from .feedback_store import UnknownAnswer

        if feedback is None:
            return error(404, "feedback is not collected by this server (culbot serve --no-feedback)", "invalid_request_error",
                         code="feedback_off")
        if req.rating is None and not (req.correction or "").strip() and not (req.comment or "").strip():
            return error(400, "feedback needs a rating ('up' or 'down'), a correction or a comment", "invalid_request_error", "rating")
        for name in ("correction", "comment"):
            text = getattr(req, name)
            if text is not None and len(text) > limits.max_message_chars:
                return error(400, f"{name} has {len(text)} characters; at most {limits.max_message_chars} "
                                  f"(answer.limits.max_message_chars)", "invalid_request_error", name, "input_too_long")
        try:
            fid = await run_in_threadpool(lambda: feedback.add(req.id, rating=req.rating, correction=req.correction, comment=req.comment))
        except UnknownAnswer:
            return error(404, f"no answer {req.id!r} was given by this server (or it is past the retention period)",
                         "invalid_request_error", "id", "answer_not_found")
        return {"object": "feedback", "id": fid, "answer_id": req.id, "status": "pending"}


def create_app(answerer: Answerer, *, max_queue: int = 8, api_key_env: str = "CULBOT_API_KEY", feedback=None):
    """The OpenAI-compatible app; with ``feedback`` (a feedback_store.FeedbackStore) answers are kept and POST /v1/feedback
    takes students' ratings and corrections."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    completions = Completions(answerer, max_queue, feedback)
    info, gate = completions.info, completions.gate

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # Kiwi's model and the tokenizer load on first use (about 2 s): before the first request, not during it, so
        # /health answers at once from the start.
        await run_in_threadpool(answerer.warm_up)
        yield
        completions.stop_all()   # uvicorn's graceful shutdown is over: whatever still generates stops now

    app = FastAPI(title="Culbot", description="Answers about Chungbuk National University, OpenAI-compatible.", version=info.run or "dev",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=answerer.spec.limits.max_body_bytes)
    install_errors(app)
    install_auth(app, api_key_env)

    @app.get("/health")
    async def health():   # on the event loop: answers even when every worker thread waits on a generation
        return {"status": "ok", "model": info.id, "requests_inside": gate.inside, "limit": gate.limit,
                "generations_running": sum(t.name == "culbot-generate" for t in threading.enumerate()),
                "threads": threading.active_count()}

    def model_card() -> dict:
        return {"id": info.id, "object": "model", "created": 0, "owned_by": "culbot",
                "culbot": info.model_dump(exclude={"folder"})}   # no path of the server

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        if model_id != info.id:
            return error(404, f"model {model_id!r} is not served here; this server serves {info.id!r}", "invalid_request_error",
                         "model", "model_not_found")
        return model_card()

    install_feedback(app, feedback, answerer.spec.limits)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        parsed = completions.parse(req)
        if not isinstance(parsed, tuple):
            return parsed
        try:
            gate.enter()
        except Busy as e:
            return error(503, str(e), "server_busy", headers={"Retry-After": "5"})
        created = int(time.time())
        try:
            r = await completions.start(req, *parsed)
        except BaseException:
            gate.leave()
            raise
        cid = r.id
        if not req.stream:
            return JSONResponse(await completions.whole(r, cid, created))
        return StreamingResponse(completions.events(r, req, cid, created), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# vLLM's supported-models table (docs/models/supported_models.md) has no LoRA for these architectures: an adapter on them
# is served as its merged model.
VLLM_WITHOUT_LORA = {"gpt_neox": "GPTNeoXForCausalLM"}


def merged_model_of(adapter) -> Path | None:
    """The newest merged model made from this adapter's run (artifacts/models/<hash>, its card naming the run), if any."""
    from .run_folder import read_run_card

    adapter = Path(adapter).resolve()
    run, models = adapter.parent.name, adapter.parent.parent.parent / "models"
    made = [m.parent for m in models.glob("*/culbot.json") if (c := read_run_card(m.parent)).merge and c.merge.run == run]
    return max(made, key=lambda m: m.stat().st_mtime) if made else None


def vllm_model(folder, card):
    """The folder vLLM should serve: the adapter itself, or its merged model where vLLM has no LoRA for the base."""
    from .answer import is_adapter

    folder = Path(folder).resolve()
    arch = VLLM_WITHOUT_LORA.get(card.model_type or "")
    if not is_adapter(folder) or arch is None:
        return folder
    merged = merged_model_of(folder)
    if merged is None:
        raise ValueError(f"vLLM has no LoRA support for {arch} ({card.base.name}; its supported-models table), so this adapter "
                         f"cannot be served as one: merge it first (culbot merge-adapter --run {folder.parent}) and serve "
                         f"the merged model (--model artifacts/models/<hash>)")
    return merged


def vllm_command(folder, card, *, host: str, port: int, served_name: str, extra: list[str] = ()) -> list[str]:
    """The `vllm serve` command for a merged model or an adapter (as a LoRA module on its base), with the training
    prompt as its chat template (the tokenizer's chat_template.jinja) and the run's generation config: training wrote
    generation_config.json with every end token as eos_token_id (Llama-3's <|eot_id|> too), which vLLM adds to each
    request's stop ids, where the base's own config may lack them."""
    from .answer import is_adapter

    folder = Path(folder).resolve()
    template = folder / "chat_template.jinja"
    generation = str(folder) if (folder / "generation_config.json").is_file() else "auto"
    if is_adapter(folder):
        cmd = ["vllm", "serve", card.base.location(folder), *(["--revision", card.base.revision] if card.base.revision else []),
               "--enable-lora", "--lora-modules", f"{served_name}={folder}", "--max-lora-rank", str(card.hyperparameters.lora.r),
               "--generation-config", generation]
    else:
        cmd = ["vllm", "serve", str(folder), "--served-model-name", served_name, "--generation-config", generation]
    if template.is_file():
        cmd += ["--chat-template", str(template)]
    return cmd + ["--host", host, "--port", str(port), *extra]
