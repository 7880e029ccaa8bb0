"""A univ100-shaped JSON API: list/detail endpoints, paging, robots.txt and scripted faults."""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from .base import Handler


@dataclass
class Univ100App:
    questions: list[dict]                      # newest first, as the site lists them
    answers: dict[int, list[str]] = field(default_factory=dict)
    robots: str = "User-agent: *\nAllow: /\n"
    # Faults consumed in order per target: "list:<offset>" or "detail:<id>" -> ["429", "500", "slow", "malformed", "403"]
    faults: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    slow_s: float = 1.5
    require_browser_ua: bool = True
    report_total: bool = False                 # answer with result.total, as list APIs often do
    hits: Counter = field(default_factory=Counter)
    user_agents: set = field(default_factory=set)
    times: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault(self, target: str) -> str | None:
        with self.lock:
            lst = self.faults.get(target)
            return lst.pop(0) if lst else None


def make_questions(n: int, start: int = 1) -> tuple[list[dict], dict[int, list[str]]]:
    """n questions, ids start..start+n-1, newest (highest id) first, with Korean text."""
    qs, ans = [], {}
    for i in range(start + n - 1, start - 1, -1):
        qs.append({"id": i, "title": f"질문 제목 {i}", "text": f"충북대학교 생활에 대한 질문 본문 {i}입니다.", "categoryName": "학교 생활", "deptName": "소프트웨어학과"})
        ans[i] = [f"질문 {i}에 대한 첫 번째 답변입니다. 도움이 되길 바라요.", f"두 번째 답변 {i}"]
    return qs, ans


class Univ100Handler(Handler):
    def do_GET(self) -> None:
        app: Univ100App = self.app
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with app.lock:
            app.times.append(time.monotonic())
            app.user_agents.add(self.headers.get("User-Agent", ""))
        if url.path == "/robots.txt":
            app.hits["robots"] += 1
            return self.send(200, app.robots, "text/plain")
        if app.require_browser_ua and "Mozilla" not in self.headers.get("User-Agent", ""):
            return self.send_json(403, {"message": "forbidden"})
        if url.path == "/find/qna/question/list":
            offset, limit = int(q.get("offset", 0)), int(q.get("limit", 20))
            target = f"list:{offset}"
            app.hits[target] += 1
            if self._fault(target):
                return
            page = [dict(x, answer={"text": (app.answers.get(x["id"]) or [""])[0]}) for x in app.questions[offset: offset + limit]]
            result = {"questions": page, **({"total": len(app.questions)} if app.report_total else {})}
            return self.send_json(200, {"status": "ok", "result": result})
        if url.path == "/find/qna/question":
            qid = int(q["questionId"])
            target = f"detail:{qid}"
            app.hits[target] += 1
            if self._fault(target):
                return
            match = [x for x in app.questions if x["id"] == qid]
            if not match:
                return self.send_json(404, {"message": "no such question"})
            body = {"status": "ok", "result": {"question": dict(match[0], campusName="충북대학교"),
                                               "answers": [{"text": a} for a in app.answers.get(qid, [])]}}
            return self.send_json(200, body)
        self.send_json(404, {"message": "not found"})

    def _fault(self, target: str) -> bool:
        f = self.app.fault(target)
        if f is None:
            return False
        if f == "429":
            self.send_json(429, {"message": "slow down"}, headers={"Retry-After": "1"})
        elif f == "500":
            self.send_json(500, {"message": "boom"})
        elif f == "403":
            self.send_json(403, {"message": "forbidden"})
        elif f == "malformed":
            self.send(200, '{"status": "ok", "result": {"questions": [ {"id": 1, "title": ', "application/json")
        elif f == "cut":   # a page cut mid-character: invalid UTF-8 and invalid JSON
            self.send(200, '{"status": "ok", "result": {"questions": [{"id": 1, "title": "질문'.encode("utf-8")[:-1], "application/json")
        elif f == "slow":
            time.sleep(self.app.slow_s)
            return False  # answers, but after the client gave up
        return True
