"""A real HTTP server on 127.0.0.1 in a background thread, for tests."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class Handler(BaseHTTPRequestHandler):
    """Subclasses implement do_GET/do_POST; ``self.server.app`` holds the test's state."""

    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: with Nagle's algorithm the body waited for the client's delayed ACK
    # (40 ms on Linux) on every response; real servers (uvicorn, nginx) set TCP_NODELAY
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    @property
    def app(self):
        return self.server.app

    def send(self, status: int, body: bytes | str = b"", content_type: str = "application/json", headers: dict | None = None) -> None:
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(status)
        if body or status not in (204, 304):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        self.send(status, json.dumps(obj, ensure_ascii=False), "application/json; charset=utf-8", headers)

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, seconds: float, poll: float = 0.2) -> bool:
    """Poll ``url``/health until it answers 200 (a server started in another process); False if it never did."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False


class Server(ThreadingHTTPServer):
    # socketserver's listen backlog is 5: a sixth simultaneous connection waited for a SYN retry (1 s on Linux), so 8
    # requests in flight against a stand-in API ran 6 + 2 a second late. Real servers (nginx: 511) queue them.
    request_queue_size = 128


@contextmanager
def serve(handler: type[Handler], app) -> Iterator[str]:
    """Run ``handler`` with ``app`` as state; yields the base URL."""
    server = Server(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.app = app
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
