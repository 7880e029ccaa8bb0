"""A Hugging Face Hub-shaped server: whoami, create repo, preupload, NDJSON commit, tags, model info, file resolve."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .base import Handler


@dataclass
class HubApp:
    token: str
    repos: dict[str, dict] = field(default_factory=dict)      # repo -> {"files": {path: bytes}, "commits": [...], "private": bool, "tags": {}}
    tokens_seen: set = field(default_factory=set)
    hits: Counter = field(default_factory=Counter)
    bodies: list = field(default_factory=list)                # every request body, to search for leaked secrets
    lock: threading.Lock = field(default_factory=threading.Lock)

    def head_sha(self, repo: str) -> str:
        commits = self.repos[repo]["commits"]
        return commits[-1]["oid"] if commits else "0" * 40


REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


class HubHandler(Handler):
    def _auth(self) -> bool:
        auth = self.headers.get("Authorization", "")
        with self.app.lock:
            self.app.tokens_seen.add(auth)
        if auth != f"Bearer {self.app.token}":
            self.send_json(401, {"error": "Invalid credentials"}, headers={"X-Error-Code": "Unauthorized"})
            return False
        return True

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        app: HubApp = self.app
        path = unquote(urlsplit(self.path).path)
        app.hits[f"{self.command} {path}"] += 1
        if path == "/api/whoami-v2":
            if not self._auth():
                return
            return self.send_json(200, {"type": "user", "name": "culbot-lab", "auth": {"accessToken": {"role": "write"}}})
        m = re.fullmatch(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if m and m["repo"] in app.repos:
            r = app.repos[m["repo"]]
            rev = m["rev"] or "main"
            sha = r["tags"].get(rev, app.head_sha(m["repo"]))
            return self.send_json(200, {"id": m["repo"], "modelId": m["repo"], "sha": sha, "private": r["private"],
                                        "siblings": [{"rfilename": p} for p in sorted(r["files"])], "tags": [], "downloads": 0})
        m = re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if m:
            r = app.repos.get(m["repo"])
            if r is None or m["file"] not in r["files"]:
                return self.send(404, b"", headers={"X-Error-Code": "EntryNotFound" if r else "RepositoryNotFound",
                                                    "X-Error-Message": "Entry not found"})
            data = r["files"][m["file"]]
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            headers = {"X-Repo-Commit": app.head_sha(m["repo"]), "ETag": etag}
            if head:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            return self.send(200, data, "application/octet-stream", headers=headers)
        self.send_json(404, {"error": f"not found: {path}"}, headers={"X-Error-Code": "RepositoryNotFound"})

    def do_POST(self) -> None:
        app: HubApp = self.app
        path = unquote(urlsplit(self.path).path)
        body = self.read_body()
        with app.lock:
            app.hits[f"POST {path}"] += 1
            app.bodies.append(body)
        if path == "/api/validate-yaml":
            return self.send_json(200, {})
        if not self._auth():
            return
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            with app.lock:
                if repo in app.repos:
                    return self.send_json(409, {"error": "You already created this model repo", "url": f"http://hub/{repo}"})
                app.repos[repo] = {"files": {}, "commits": [], "tags": {},
                                   "private": bool(req.get("private")) or req.get("visibility") == "private"}
            host = self.headers.get("Host")
            return self.send_json(200, {"url": f"http://{host}/{repo}", "name": repo})
        m = re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)
        if m:
            files = json.loads(body)["files"]
            return self.send_json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                                        "commitOid": app.head_sha(m["repo"])})
        m = re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path)
        if m:
            header, files = {}, {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    v = item["value"]
                    files[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
            oid = hashlib.sha1(body).hexdigest()
            with app.lock:
                r = app.repos[m["repo"]]
                r["files"].update(files)
                r["commits"].append({"oid": oid, "summary": header.get("summary", ""), "files": sorted(files)})
            host = self.headers.get("Host")
            return self.send_json(200, {"commitUrl": f"http://{host}/{m['repo']}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
        m = re.fullmatch(rf"/api/models/{REPO}/tag/(?P<rev>[^/]+)", path)
        if m:
            req = json.loads(body)
            app.repos[m["repo"]]["tags"][req["tag"]] = m["rev"] if len(m["rev"]) == 40 else app.head_sha(m["repo"])
            return self.send_json(200, {})
        self.send_json(404, {"error": f"not found: {path}"})
