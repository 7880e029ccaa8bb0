"""A CBNU-like website: pages with nav boilerplate and links, ETag/304, robots.txt, EUC-KR."""
from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field

from .base import Handler


@dataclass
class SiteApp:
    pages: dict[str, tuple[str, str, str]]   # path -> (html, content type, charset)
    robots: str = "User-agent: *\nDisallow: /private/\n"
    hits: Counter = field(default_factory=Counter)
    not_modified: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def page(title: str, body: str, links: list[str] = (), charset: str = "utf-8") -> str:
    nav = "".join(f'<li><a href="{l}">{l}</a></li>' for l in links)
    return (f"<!DOCTYPE html><html><head><meta charset=\"{charset}\"><title>{title}</title>"
            f"<script>var tracking = 1;</script><style>body{{}}</style></head><body>"
            f"<header><a href=\"/\">충북대학교</a> 로그인 | 사이트맵</header>"
            f"<nav id=\"gnb\"><ul>{nav}</ul></nav>"
            f"<div id=\"contents\"><h2>{title}</h2>{body}</div>"
            f"<footer>충청북도 청주시 서원구 충대로 1 충북대학교 Copyright</footer></body></html>")


class SiteHandler(Handler):
    def do_GET(self) -> None:
        app: SiteApp = self.app
        path = self.path.split("#")[0]
        with app.lock:
            app.hits[path] += 1
        if path == "/robots.txt":
            return self.send(200, app.robots, "text/plain")
        if path not in app.pages:
            return self.send(404, "<html><body>없는 페이지</body></html>", "text/html; charset=utf-8")
        html, ctype, charset = app.pages[path]
        body = html.encode(charset)
        etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == etag:
            with app.lock:
                app.not_modified[path] += 1
            return self.send(304, b"", headers={"ETag": etag})
        ct = f"{ctype}; charset={charset}" if ctype.startswith("text/") and charset != "euc-kr" else ctype
        self.send(200, body, ct, headers={"ETag": etag})
