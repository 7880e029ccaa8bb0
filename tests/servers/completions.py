"""A vLLM-like OpenAI completions server on 127.0.0.1: /v1/completions (streamed as SSE or not) and /v1/models,
answering each prompt from a script. Stands in for a GPU inference server and for a scripted model."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from .base import Handler


@dataclass
class CompletionsApp:
    script: Callable[[str], str]          # prompt -> the completion text
    model: str = "scripted"
    prompts: list[str] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    piece_delay: float = 0.0              # seconds between streamed pieces (a slow GPU)
    max_model_len: int | None = None      # vLLM lists it in /v1/models
    disconnects: int = 0                  # streams the client closed before the end


class CompletionsHandler(Handler):
    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            extra = {"max_model_len": self.app.max_model_len} if self.app.max_model_len else {}
            self.send_json(200, {"object": "list", "data": [{"id": self.app.model, "object": "model", "owned_by": "test", **extra}]})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/completions":
            self.send_json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(self.read_body())
        self.app.requests.append(body)
        prompt = body["prompt"]
        self.app.prompts.append(prompt)
        text = self.app.script(prompt)
        for stop in body.get("stop") or []:   # as vLLM: the completion ends before a stop string
            text = text.split(stop, 1)[0]
        base = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            self.send_json(200, {**base, "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                                 "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": len(prompt) + len(text)}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)] or [""]
        for i, p in enumerate(pieces):
            chunk = {**base, "choices": [{"index": 0, "text": p, "finish_reason": "stop" if i == len(pieces) - 1 else None, "logprobs": None}]}
            try:
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):   # the client went away: stop generating, as vLLM does
                self.app.disconnects += 1
                self.close_connection = True
                return
            time.sleep(self.app.piece_delay)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True
