"""Issue 26 (capture and review): every answer of serve and chat is kept under the id the client got, with the exact
prompt, sources and versions; students' ratings and corrections come in through POST /v1/feedback (the `openai` client's
id, `httpx` for the post) and chat's /good, /bad and /fix; a lab member reviews them with `culbot feedback`. The store is
a real SQLite file made by its alembic migrations; a server killed during a burst of posts loses none it answered 2xx."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from culbot.pipeline_config.train_schema import AnswerConfig
from culbot.tasks.feedback_store import Base, FeedbackStore, UnknownAnswer

from .servers.base import free_port, wait_for_health
from .servers.base import serve as serve_scripted
from .servers.completions import CompletionsApp, CompletionsHandler
from .test_serve import QUESTION, client, running


def _answer(store: FeedbackStore, id: str = "chatcmpl-a1", question: str = QUESTION) -> None:
    store.record_answer(id=id, channel="serve", question=question, prompt="### 질문:\n" + question, answer="3월에 신청합니다.",
                        sources=[{"title": "생활관 입사 안내", "url": "https://dorm.cbnu.ac.kr/a", "doc": "dorm", "score": 1.0}],
                        confidence=0.7, refused=False, model="culbot-tiny", dataset="abc123", index="idx456")


# The same tests on PostgreSQL, given a server: CULBOT_TEST_POSTGRES_URL=postgresql+psycopg://user@/db?host=/run/postgresql
# (with the `postgres` extra installed). Each run starts from an empty schema there.
POSTGRES = os.environ.get("CULBOT_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/feedback/fb.db"
    if not POSTGRES:
        pytest.skip("set CULBOT_TEST_POSTGRES_URL to run the store on PostgreSQL")
    from sqlalchemy import create_engine, text

    with create_engine(POSTGRES).begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS feedback, answers, alembic_version"))
    return POSTGRES


def test_the_store_is_what_its_migrations_make_and_keeps_every_row_across_opens(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = store_url
    store = FeedbackStore(url)
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0002"
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []   # the models are the migrated schema
        if url.startswith("sqlite"):
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    _answer(store, question="기숙사 신청은 언제 해요? 제 번호는 010-1234-5678, 메일 kim@example.com 입니다")
    fid = store.add("chatcmpl-a1", rating="down", correction="신청은 2월 20일부터입니다. 문의 010-9999-8888", comment="틀렸어요")
    with pytest.raises(UnknownAnswer):
        store.add("chatcmpl-nope", rating="up")

    again = FeedbackStore(url)   # a second open migrates nothing and loses nothing
    [item] = again.items()
    assert item["id"] == fid and item["status"] == "pending" and item["rating"] == "down" and item["dataset"] == "abc123"
    assert "010" not in item["question"] + item["correction"] and "@" not in item["question"]   # scrubbed as the crawler does
    assert item["correction"].startswith("신청은 2월 20일부터입니다") and item["sources"][0]["doc"] == "dorm"

    with pytest.raises(ValueError, match="reviewer"):
        again.review([fid], approve=True, reviewer=" ")
    assert again.review([fid], approve=True, reviewer="kim") == 1
    [item] = again.items(status="approved")
    assert item["reviewer"] == "kim" and item["reviewed_at"]
    assert again.counts() == {"answers": 1, "pending": 0, "approved": 1, "rejected": 0}
    assert again.purge(older_than_days=1) == 0 and again.purge(older_than_days=-1) == 1   # retention: old answers go with their feedback
    assert again.counts()["answers"] == 0 and again.items() == []


def test_a_store_made_by_an_older_culbot_is_migrated_with_every_row_kept(tmp_path):
    """The schema changes by migrations: a store at revision 0001 (no context column) with answers and feedback opens
    at the newest revision, its rows intact."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from culbot.tasks.feedback_store import MIGRATIONS

    url = f"sqlite:///{tmp_path}/old.db"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with create_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO answers (id, created_at, channel, question, prompt, answer, sources, confidence, refused, model) "
                          "VALUES ('chatcmpl-old', '2026-11-30 10:00:00', 'serve', '학식 가격은?', 'P', '4,500원', '[]', 0.5, 0, 'm')"))
        conn.execute(text("INSERT INTO feedback (answer_id, created_at, rating, status) VALUES ('chatcmpl-old', '2026-11-30 10:01:00', 'up', 'pending')"))
    store = FeedbackStore(url)
    [item] = store.items()
    assert (item["answer_id"], item["rating"], item["question"], item["context"]) == ("chatcmpl-old", "up", "학식 가격은?", "")


def test_the_api_keeps_each_answer_under_its_id_and_takes_feedback_on_it(trained_run, cbnu_index, tmp_path, monkeypatch):
    from culbot.tasks.answer import Answerer
    from culbot.tasks.serve_api import create_app

    answerer = Answerer.load(trained_run / "adapter", cbnu_index, spec=AnswerConfig(max_new_tokens=8, no_answer_threshold=0.0))
    store = FeedbackStore(f"sqlite:///{tmp_path}/fb.db")
    with running(create_app(answerer, feedback=store)) as url:
        c = client(url)
        whole = c.chat.completions.create(model=answerer.info().id, messages=[{"role": "user", "content": QUESTION}])
        streamed = [ch.id for ch in c.chat.completions.create(model=answerer.info().id, stream=True,
                                                               messages=[{"role": "user", "content": "도서관은 몇 시에 열어요?"}])]
        assert whole.id.startswith("chatcmpl-") and len(set(streamed)) == 1 and streamed[0] != whole.id

        post = lambda body: httpx.post(f"{url}/v1/feedback", json=body, timeout=30)   # noqa: E731
        r = post({"id": whole.id, "rating": "down", "correction": "생활관 홈페이지에서 2월에 신청합니다."})
        assert r.status_code == 200 and r.json()["status"] == "pending", r.text
        assert post({"id": streamed[0], "rating": "up"}).status_code == 200   # the stream's answer was kept before [DONE]
        unknown = post({"id": "chatcmpl-000", "rating": "up"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "answer_not_found"
        assert post({"id": whole.id}).json()["error"]["param"] == "rating"                       # says nothing
        assert post({"id": whole.id, "rating": "meh"}).status_code == 400
        long = post({"id": whole.id, "comment": "가" * 5000})
        assert long.status_code == 400 and "max_message_chars" in long.json()["error"]["message"]
        assert post({"id": whole.id, "rating": "up", "client_ip": "1.2.3.4"}).status_code == 400   # nothing else is stored

        monkeypatch.setenv("CULBOT_API_KEY", "s3cret")
        assert post({"id": whole.id, "rating": "up"}).status_code == 401   # the API's bearer key guards feedback too
        assert httpx.post(f"{url}/v1/feedback", json={"id": whole.id, "rating": "up"}, timeout=30,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
    items = {i["answer_id"]: i for i in store.items(rating="down")}
    kept = items[whole.id]
    assert kept["answer"] == whole.choices[0].message.content and kept["model"] == answerer.info().id
    assert kept["prompt"] == answerer.reply(QUESTION).prompt and kept["index"] == cbnu_index.name   # the exact prompt, retrieval included
    assert [s["doc"] for s in kept["sources"]] == [s["doc"] for s in whole.model_extra["sources"]]
    assert kept["correction"] == "생활관 홈페이지에서 2월에 신청합니다." and kept["channel"] == "serve"


def test_the_review_commands_list_show_approve_and_reject(tmp_path, capsys):
    from culbot.flows.cli import main

    url = f"sqlite:///{tmp_path}/fb.db"
    store = FeedbackStore(url)
    for n in range(3):
        _answer(store, id=f"chatcmpl-{n}", question=f"질문 {n}: 장학금 신청 기간은?")
    down = store.add("chatcmpl-0", rating="down", correction="3월 1일부터 15일까지입니다.")
    up = store.add("chatcmpl-1", rating="up")
    other = store.add("chatcmpl-2", rating="down", comment="모르겠어요")
    db = ["--feedback-db", url]
    assert main(["feedback", "list", *db, "--status", "pending"]) == 0
    out = capsys.readouterr().out
    assert all(f"{i:>5}  " in out for i in (down, up, other)) and "→ 3월 1일부터 15일까지입니다." in out
    assert main(["feedback", "show", *db, str(down)]) == 0
    out = capsys.readouterr().out
    assert "----- prompt -----\n### 질문:" in out and "[1] 생활관 입사 안내 https://dorm.cbnu.ac.kr/a" in out and "dataset: abc123" in out
    assert main(["feedback", "approve", *db, "--all-pending", "--corrections", "--reviewer", "lee"]) == 0
    assert main(["feedback", "reject", *db, str(other), "--reviewer", "lee"]) == 0
    assert main(["feedback", "approve", *db, "999", "--reviewer", "lee"]) == 2
    assert "no feedback item(s) [999]" in capsys.readouterr().err
    assert {i["id"]: i["status"] for i in store.items()} == {down: "approved", up: "pending", other: "rejected"}
    assert main(["feedback", "list", *db, "--status", "approved", "--json"]) == 0
    assert '"reviewer": "lee"' in capsys.readouterr().out.splitlines()[-1]


def test_chat_takes_good_bad_and_fix_on_the_last_answer(trained_run, cbnu_index, tmp_path, capsys, monkeypatch):
    from culbot.flows.cli import main

    url = f"sqlite:///{tmp_path}/fb.db"
    lines = iter(["/good", QUESTION, "/bad", "/fix", "/fix 생활관 홈페이지에서 신청합니다.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(trained_run / "adapter"), "--index", str(cbnu_index), "--max-new-tokens", "4",
                 "--feedback-db", url]) == 0
    out = capsys.readouterr().out
    assert "(no answer yet to give feedback on)" in out and "(write the right answer after /fix" in out
    assert out.count("kept for review)") == 2
    items = FeedbackStore(url).items()
    assert [(i["rating"], i["correction"]) for i in reversed(items)] == [("down", None), (None, "생활관 홈페이지에서 신청합니다.")]
    assert items[0]["channel"] == "chat" and items[0]["question"] == QUESTION and items[0]["answer_id"] == items[1]["answer_id"]


@pytest.mark.slow
def test_a_server_killed_during_a_burst_of_feedback_loses_none_it_acknowledged(trained_run, tmp_path):
    """200 posts from 8 clients; `kill -9` once about half are acknowledged. Every post that got a 2xx is in the
    store (SQLite WAL, synchronous=FULL, committed before the response)."""
    url = f"sqlite:///{tmp_path}/fb.db"
    fast = CompletionsApp(script=lambda p: "생활관 홈페이지에서 신청합니다.")
    with serve_scripted(CompletionsHandler, fast) as upstream:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "culbot.flows.cli", "serve", "--model", str(trained_run / "adapter"), "--upstream",
                                 f"{upstream}/v1", "--served-name", "m", "--port", str(port), "--feedback-db", url],
                                stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_for_health(base, 60), (tmp_path / "serve.log").read_text()[-2000:]
            answer_id = client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}]).id
            acknowledged: list[int] = []
            lock = threading.Lock()

            def post(n: int) -> None:
                try:
                    r = httpx.post(f"{base}/v1/feedback", json={"id": answer_id, "rating": "down", "comment": f"burst {n}"}, timeout=10)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    with lock:
                        acknowledged.append(r.json()["id"])
                        if len(acknowledged) == 100:
                            proc.send_signal(signal.SIGKILL)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(post, range(200)))
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    stored = {i["id"] for i in FeedbackStore(url).items()}
    print(f"{len(acknowledged)} of 200 posts acknowledged before the kill; {len(stored)} stored")
    assert 100 <= len(acknowledged) < 200 and proc.returncode == -signal.SIGKILL
    assert set(acknowledged) <= stored
