"""univ100 crawl against a real local API server: paging, faults, quarantine, incremental, cleaning."""
import json

import pytest

from culbot.pipeline_config.schema import Univ100Config
from culbot.tasks import _store
from culbot.tasks.crawl_univ100 import parse_list_page, parse_question, record_to_row, reparse, run_crawl
from culbot.tasks._http import FetchError
from tests.conftest import fast_http
from tests.servers.base import serve
from tests.servers.univ100 import Univ100App, Univ100Handler, make_questions


def _cfg(base, out, **kw) -> Univ100Config:
    return Univ100Config(source="api", base_url=base, out_dir=out, http=fast_http(), **kw)


def test_full_crawl_with_faults_counts_and_quarantine(tmp_path):
    qs, ans = make_questions(45)                         # 3 pages of 20, then an empty page
    ans[10] = []                                          # no answer -> dropped as empty_output
    ans[11] = ["네"]                                      # too short -> dropped
    app = Univ100App(questions=qs, answers=ans)
    app.faults["list:20"] = ["429"]                       # retried after Retry-After
    app.faults["detail:7"] = ["500", "500"]               # retried, then fine
    app.faults["detail:8"] = ["malformed"]                # quarantined with the raw body
    app.faults["detail:9"] = ["slow"]                     # times out once, then fine
    with serve(Univ100Handler, app) as base:
        m = run_crawl(_cfg(base, tmp_path / "u"))
    c = m.counts
    assert c["list_pages"] == 4 and c["questions_listed"] == 45
    assert c["new"] == 44 and c["failed"] == 1 and c["records"] == 44
    assert c["rows"] == 42 and c["dropped"] == {"empty_output": 1, "short_output": 1}
    q = _store.read_jsonl(tmp_path / "u" / "quarantine.jsonl")
    assert len(q) == 1 and q[0]["id"] == "8" and q[0]["reason"].startswith("malformed: question detail: not valid JSON")
    assert q[0]["raw"].startswith('{"status": "ok"')
    assert app.hits["detail:7"] == 3 and app.hits["list:20"] == 2
    rec = [r for r in _store.read_jsonl(tmp_path / "u" / "records.jsonl") if r["id"] == "12"][0]
    assert rec["answers"] == ["질문 12에 대한 첫 번째 답변입니다. 도움이 되길 바라요.", "두 번째 답변 12"]
    assert rec["url"] == "https://www.univ100.kr/qna/question/12" and rec["campus"] == 122 and rec["fetched_at"]
    assert set(rec) >= {"id", "campus", "category", "dept", "title", "text", "answers", "url", "fetched_at", "content_hash"}
    assert _store.is_complete(tmp_path / "u")
    assert len(list((tmp_path / "u" / "raw" / "detail").glob("*.json"))) == 45  # malformed raw kept too


def test_incremental_crawl_fetches_only_new_questions(tmp_path):
    qs, ans = make_questions(30)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        first = run_crawl(_cfg(base, tmp_path / "u"))
        assert first.counts["new"] == 30
        new_qs, new_ans = make_questions(5, start=31)
        app.questions[:0] = new_qs                         # newest first, as the site lists them
        app.answers.update(new_ans)
        app.hits.clear()
        second = run_crawl(_cfg(base, tmp_path / "u"))
    c = second.counts
    assert c["new"] == 5 and c["already_known"] == 30 and c["records"] == 35
    assert sorted(k for k in app.hits if k.startswith("detail:")) == [f"detail:{i}" for i in range(31, 36)]
    assert app.hits["list:20"] == 1 and "list:40" not in app.hits  # stopped after a page of known questions


def test_second_crawl_with_nothing_new_keeps_content_hash(tmp_path):
    qs, ans = make_questions(8)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        a = run_crawl(_cfg(base, tmp_path / "u"))
        b = run_crawl(_cfg(base, tmp_path / "u"))
    assert b.counts["new"] == 0 and a.content_hash == b.content_hash


def test_robots_disallowed_detail_is_quarantined(tmp_path):
    qs, ans = make_questions(3)
    app = Univ100App(questions=qs, answers=ans, robots="User-agent: *\nDisallow: /find/qna/question?questionId=2\n")
    with serve(Univ100Handler, app) as base:
        m = run_crawl(_cfg(base, tmp_path / "u"))
    q = _store.read_jsonl(tmp_path / "u" / "quarantine.jsonl")
    assert m.counts["records"] == 2
    assert [x["reason"] for x in q] == ["fetch_failed: disallowed by robots.txt"]
    assert app.hits["detail:2"] == 0


def test_unreachable_list_saves_progress_and_fails_clearly(tmp_path):
    qs, ans = make_questions(25)
    app = Univ100App(questions=qs, answers=ans)
    app.faults["list:20"] = ["500"] * 10
    with serve(Univ100Handler, app) as base:
        with pytest.raises(FetchError, match="crawl incomplete"):
            run_crawl(_cfg(base, tmp_path / "u"))
    assert len(_store.read_jsonl(tmp_path / "u" / "records.jsonl")) == 20   # the first page's questions are kept
    assert _store.read_manifest(tmp_path / "u") is None                    # but the output is not marked done


def test_non_browser_user_agent_gets_403_and_says_so(tmp_path):
    qs, ans = make_questions(2)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        cfg = _cfg(base, tmp_path / "u")
        cfg.http.user_agent = "python-httpx"
        with pytest.raises(FetchError, match="HTTP 403"):
            run_crawl(cfg)


def test_reparse_rebuilds_rows_from_raw_without_network(tmp_path):
    qs, ans = make_questions(6)
    app = Univ100App(questions=qs, answers=ans)
    with serve(Univ100Handler, app) as base:
        cfg = _cfg(base, tmp_path / "u")
        m1 = run_crawl(cfg)
    m2 = reparse(cfg)
    assert m2.content_hash == m1.content_hash and m2.counts["reparsed"] == 6


def test_row_cleaning_removes_pii_html_and_jamo_exactly():
    rec = {"id": "1", "title": "<b>편입</b> 문의 ㅋㅋ", "text": "제 메일은 me@gmail.com 이에요",
           "answers": ["", "010-1234-5678로 전화했어요. https://blog.naver.com/x 참고. 공식: https://www.chungbuk.ac.kr/a"], "url": "u"}
    row, reason, pii = record_to_row(rec, Univ100Config())
    assert reason is None
    assert row["instruction"] == "편입 문의\n제 메일은 이에요"
    assert row["output"] == "로 전화했어요. 참고. 공식:"
    assert pii == {"email": 1, "phone": 1, "url": 2}
    row, _, _ = record_to_row(rec, Univ100Config(keep_url_domains=["chungbuk.ac.kr"]))
    assert row["output"].endswith("공식: https://www.chungbuk.ac.kr/a")
    assert row["input"] == "" and row["source"] == "univ100"


def test_answer_choice_and_drop_reasons():
    rec = {"id": "1", "title": "질문", "text": "본문", "answers": ["짧은 답이지만 충분히 긴 답변", "훨씬 더 길고 자세한 두 번째 답변입니다"], "url": "u"}
    assert record_to_row(rec, Univ100Config())[0]["output"] == "짧은 답이지만 충분히 긴 답변"
    assert record_to_row(rec, Univ100Config(answer_choice="longest"))[0]["output"] == "훨씬 더 길고 자세한 두 번째 답변입니다"
    assert record_to_row(dict(rec, answers=[]), Univ100Config())[1] == "empty_output"
    assert record_to_row(dict(rec, answers=["ㅋㅋㅋ"]), Univ100Config())[1] == "empty_output"
    assert record_to_row(dict(rec, answers=["넵 감사"]), Univ100Config())[1] == "short_output"


def test_parsers_reject_wrong_shapes():
    from culbot.tasks.crawl_univ100 import ParseError

    assert parse_list_page(json.dumps({"result": {"questions": [{"id": 3}, {"questionId": 4}]}})) == ["3", "4"]
    with pytest.raises(ParseError, match="result.questions"):
        parse_list_page('{"result": {}}')
    with pytest.raises(ParseError, match="must be strings"):
        parse_question('{"result": {"question": {"id": 1, "title": null, "text": "x"}}}', campus_id=1, question_url="{id}", fetched_at="")


def test_snapshot_source_runs_offline(tmp_path):
    from tests.conftest import SAMPLES

    m = run_crawl(Univ100Config(source="snapshot", snapshot_dir=SAMPLES / "univ100", out_dir=tmp_path / "u"))
    assert m.counts["records"] == 12 and m.counts["rows"] == 10
    assert m.counts["dropped"] == {"empty_output": 1, "short_output": 1}


def test_entity_escaped_html_is_unescaped_then_stripped():
    rec = {"id": "1", "title": "등록금 납부", "text": "언제까지 내나요?",
           "answers": ["납부 기간은 &lt;b&gt;2월 초&lt;/b&gt;까지입니다. 자세한 건 &lt;a href=&quot;x&quot;&gt;공지&lt;/a&gt; 참고 &amp; 문의"], "url": "u"}
    row, reason, _ = record_to_row(rec, Univ100Config())
    assert reason is None and row["output"] == "납부 기간은 2월 초까지입니다. 자세한 건 공지 참고 & 문의"


def test_a_cut_list_page_is_retried_and_never_skipped(tmp_path):
    qs, ans = make_questions(137)
    app = Univ100App(questions=qs, answers=ans, report_total=True)
    app.faults["list:40"] = ["cut"]                                  # once: a retry reads it
    with serve(Univ100Handler, app) as base:
        m = run_crawl(_cfg(base, tmp_path / "u"))
    assert m.counts["records"] == 137 and m.counts["questions_listed"] == m.counts["expected"] == 137
    assert app.hits["list:40"] == 2


def test_a_list_page_that_stays_broken_ends_the_crawl_loudly_and_the_next_crawl_finds_its_questions(tmp_path):
    from culbot.tasks.crawl_univ100 import CrawlIncomplete

    qs, ans = make_questions(137)
    app = Univ100App(questions=qs, answers=ans, report_total=True)
    app.faults["list:40"] = ["cut"] * 10                             # every try
    with serve(Univ100Handler, app) as base:
        with pytest.raises(CrawlIncomplete, match=r"offset 40.*listed 117 of 137"):
            run_crawl(_cfg(base, tmp_path / "u"))
        assert len(_store.read_jsonl(tmp_path / "u" / "records.jsonl")) == 117   # what was read is kept
        assert _store.read_manifest(tmp_path / "u") is None                      # but the output is not marked done
        q1 = _store.read_jsonl(tmp_path / "u" / "quarantine.jsonl")
        assert [x["offset"] for x in q1] == [40] and q1[0]["reason"].startswith("malformed")
        app.faults.clear()
        new_qs, new_ans = make_questions(10, start=138)
        app.questions[:0] = new_qs                                   # 10 new questions, newest first
        app.answers.update(new_ans)
        m = run_crawl(_cfg(base, tmp_path / "u"))
    assert m.counts["records"] == 147 and m.counts["expected"] == 147
    q2 = _store.read_jsonl(tmp_path / "u" / "quarantine.jsonl")
    assert q2[: len(q1)] == q1                                       # quarantine accumulates; never emptied
