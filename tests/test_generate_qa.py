"""QA generation against a real local OpenAI-compatible server, through the real openai client: parsing, validation, quarantine, the response cache."""
import json

import pytest

from culbot.pipeline_config.schema import ConfigError, QAGenConfig
from culbot.tasks import _store
from culbot.tasks.generate_qa import AnswerParseError, load_prompt, parse_answer, run_generate, validate_item
from tests.conftest import OPENAI_KEY as KEY
from tests.conftest import SAMPLES, facts, page_for, qa_config, write_pages
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json

BAD_ITEMS = [
    ("잘못 안내 질문 0번은 무엇인가요?", "", "잘못 안내에 따르면 항목 0번은 매주 월요일 오전 9시에 진행됩니다."),   # the one good item
    ("잘못 안내의 식당 메뉴는?", "", "오늘의 특선은 파스타와 스테이크이며 디저트로 티라미수가 나옵니다."),          # ungrounded
    ("What time does it start?", "", "It starts at nine on Mondays according to the notice."),                           # not Korean
    ("잘못 안내 문의 전화번호는?", "", "잘못 안내 문의는 010-9999-8888 로 하면 됩니다."),                                # invented contact
    ("잘못 안내 질문 0번은 무엇인가요?", "", "잘못 안내에 따르면 항목 0번은 매주 월요일에 진행됩니다."),                 # duplicate
    ("잘못 안내 질문 빈 답", "", ""),                                                                                       # empty output
]


def script() -> dict:
    good = lambda tag, n=3: Reply(content=items_json(facts(tag, n)))
    return {
        "가가 안내": [good("가가")],
        "나나 안내": [Reply(content="```json\n" + items_json(facts("나나")) + "\n```")],
        "다다 안내": [Reply(content="다음은 생성한 데이터입니다:\n" + items_json(facts("다다")) + "\n이상입니다.")],
        "라라 안내": [good("라라", 1)],
        "마마 안내": [Reply(content=items_json(facts("마마"))[:80], finish_reason="length")],
        "바바 안내": [Reply(status=429, headers={"Retry-After": "1"}), good("바바")],
        "사사 안내": [Reply(status=500), good("사사")],
        "아아 안내": [Reply(content="죄송하지만 JSON을 만들 수 없습니다."), good("아아")],
        "자자 안내": [Reply(content="데이터를 만들 수 없습니다.")],
        "잘못 안내": [Reply(content=items_json(BAD_ITEMS))],
    }


TAGS = ["가가", "나나", "다다", "라라", "마마", "바바", "사사", "아아", "자자", "잘못"]


def test_generation_counts_quarantine_ledger_and_zero_calls_on_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for(t, 1 if t == "라라" else 3) for t in TAGS])
    app = OpenAIApp(script=script())
    with serve(OpenAIHandler, app) as base:
        m = run_generate(qa_config(tmp_path, base), pages)
        # 1 each for 가나다라마잘못, 2 for 바바(429) 사사(500) 아아(parse retry), 3 for 자자 (1 + 2 parse retries)
        assert app.requests == 6 + 2 * 3 + 3
        c = m.counts
        assert c["rows"] == 3 + 3 + 3 + 1 + 3 + 3 + 3 + 1
        assert c["quarantine_reasons"] == {"finish_reason_length": 1, "unparsable": 1, "ungrounded": 1, "not_korean": 1,
                                            "contact_not_in_source": 1, "duplicate_instruction": 1, "empty_output": 1}
        q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
        length = [x for x in q if x["reason"] == "finish_reason_length"][0]
        assert length["raw"] == items_json(facts("마마"))[:80] and length["url"].endswith("/마마")
        assert [x for x in q if x["reason"].startswith("unparsable")][0]["raw"] == "데이터를 만들 수 없습니다."
        ledger = json.loads((tmp_path / "qa" / "ledger.json").read_text())
        assert ledger["requests"] == 15 and ledger["retries"] == 2 and ledger["answers_short"] == 1
        # usage comes only with the 13 answers; the 429 and 500 carried none
        assert ledger["prompt_tokens"] == 13 * 500 and ledger["cost_usd"] == pytest.approx((6500 * 0.5 + 2600 * 1.5) / 1e6)
        assert ledger["rate_limit_headers"]["x-ratelimit-limit-requests"] == "100"
        # both messages carry the right roles (upstream sent two system messages)
        assert [msg["role"] for msg in app.bodies[0]["messages"]] == ["system", "user"]
        assert app.bodies[0]["temperature"] == 0.0 and app.bodies[0]["max_tokens"] == 2000
        assert app.auth == {f"Bearer {KEY}"}

        app.requests = 0
        again = run_generate(qa_config(tmp_path, base), pages)
        assert app.requests == 0
        assert again.content_hash == m.content_hash and again.counts["cache_hits"] == 10

    rows = _store.read_jsonl(tmp_path / "qa" / "rows.jsonl")
    assert {r["source"] for r in rows} == {"cbnu"} and all(r["grounding"] >= 0.35 for r in rows)
    for f in (tmp_path / "qa").rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(), f"API key leaked into {f}"


def test_replay_backend_answers_samples_offline_and_quarantines_misses(tmp_path):
    from culbot.tasks.documents import read_directory

    pages, _ = read_directory(SAMPLES / "cbnu_pages")
    pages.append({"url": "file:new.txt", "title": "새 문서", "text": "아직 녹음된 답변이 없는 새 문서입니다. " * 3, "content_hash": "x"})
    folder = write_pages(tmp_path / "pages", pages)
    c = QAGenConfig(backend="replay", replay_dir=SAMPLES / "qa_replay", chunk_tokens=400, cache_dir=tmp_path / "cache", out_dir=tmp_path / "qa")
    m = run_generate(c, folder)
    assert m.counts["rows"] == 25 + 56 and m.counts["requests"] == 0   # the 5 first sample pages, then 28 more with 2 items each
    q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
    miss = [x for x in q if x["reason"] == "no_recorded_answer"]
    assert len(miss) == 1 and miss[0]["url"] == "file:new.txt" and "record_replay" in miss[0]["detail"]


def test_an_almost_json_answer_is_kept_without_asking_again(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for("가가", 3)])
    almost = items_json(facts("가가")).replace("}]", "},]").replace('"output": ', "'output': ", 1)   # trailing comma, a single quote
    with pytest.raises(json.JSONDecodeError):
        json.loads(almost)
    app = OpenAIApp(script={"가가 안내": [Reply(content=almost)]})
    with serve(OpenAIHandler, app) as base:
        m = run_generate(qa_config(tmp_path, base), pages)
    assert app.requests == 1 and m.counts["rows"] == 3   # parse_retries would have paid for two more answers
    ledger = json.loads((tmp_path / "qa" / "ledger.json").read_text())
    assert ledger["answers_repaired"] == 1 and ledger["answers_unparsable"] == 0


def test_parse_answer_tolerates_fences_prose_and_wrappers():
    items = [{"instruction": "질문", "input": "", "output": "답"}]
    j = json.dumps(items, ensure_ascii=False)
    assert parse_answer(j) == items
    assert parse_answer(f"```json\n{j}\n```") == items
    assert parse_answer(f"네, 만들었습니다.\n{j}\n감사합니다.") == items
    assert parse_answer(json.dumps({"data": items}, ensure_ascii=False)) == items
    for bad in ("", "그냥 문장입니다", "[{broken"):
        with pytest.raises(AnswerParseError):
            parse_answer(bad)


def test_almost_json_is_repaired_instead_of_paying_for_a_new_answer():
    from culbot.tasks.generate_qa import parse_answer_repairing

    want = [{"instruction": "도서관은 몇 시에 열어요?", "input": "", "output": "오전 9시에 엽니다."}]
    trailing_comma = '[{"instruction": "도서관은 몇 시에 열어요?", "input": "", "output": "오전 9시에 엽니다.",},]'
    single_quotes = "[{'instruction': '도서관은 몇 시에 열어요?', 'input': '', 'output': '오전 9시에 엽니다.'}]"
    for text in (trailing_comma, single_quotes, f"```json\n{trailing_comma}\n```"):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text.strip("`json\n"))
        assert parse_answer_repairing(text) == (want, True)
    raw_newline = '[{"instruction": "도서관은\n몇 시에 열어요?", "input": "", "output": "오전 9시에 엽니다."}]'   # a real line break
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw_newline)
    assert parse_answer_repairing(raw_newline)[0][0]["instruction"] == "도서관은\n몇 시에 열어요?"
    assert parse_answer_repairing(json.dumps(want, ensure_ascii=False)) == (want, False)


def test_validate_item_rules():
    src = "중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다. 문의 043-261-2114"
    r = QAGenConfig(min_korean_ratio=0.5, max_output_words=10, min_grounding=0.35)
    ok, reason = validate_item({"instruction": "도서관 운영 시간은?", "output": "중앙도서관은 평일 오전 9시부터 운영합니다."}, src, r)
    assert reason is None and ok["input"] == "" and ok["grounding"] > 0.9
    assert validate_item({"instruction": "도서관 전화번호는?", "input": None, "output": "043-261-2114"}, src, r)[1] is None
    assert validate_item({"instruction": "질문", "output": " ".join(["도서관"] * 11)}, src, r)[1] == "output_too_long"
    assert validate_item({"instruction": 3, "output": "x"}, src, r)[1] == "instruction_missing_or_not_text"
    assert validate_item("문자열", src, r)[1] == "not_an_object"


def test_prompt_version_changes_with_the_files(tmp_path):
    import shutil

    from culbot.pipeline_config.schema import PACKAGE_DIR

    v1 = load_prompt("v1")
    copy = tmp_path / "v1"
    shutil.copytree(PACKAGE_DIR / "prompts" / "qa" / "v1", copy)
    assert load_prompt(str(copy)).version == v1.version
    (copy / "system.txt").write_text("다른 시스템 프롬프트")
    assert load_prompt(str(copy)).version != v1.version
    (copy / "user.txt").write_text("정보 없음")
    with pytest.raises(ConfigError, match="missing placeholder"):
        load_prompt(str(copy))




def test_the_optional_judge_quarantines_what_it_finds_unsupported_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for("가가")])
    verdict = lambda ok: Reply(content=json.dumps({"supported": ok, "reason": "원문에 있음" if ok else "원문은 매주 월요일이라고만 합니다"}, ensure_ascii=False))
    app = OpenAIApp(script={  # the judge's messages quote the answer after "[답변]"; the first marker found wins
        "[답변]\n가가 안내에 따르면 항목 1번": [verdict(False)],
        "[답변]": [verdict(True)],
        "가가 안내": [Reply(content=items_json(facts("가가")))],
    })
    with serve(OpenAIHandler, app) as base:
        m = run_generate(qa_config(tmp_path, base, judge=True, judge_model="judge-model"), pages)
        assert app.requests == 1 + 3 and m.counts["rows"] == 2
        judge_bodies = [b for b in app.bodies if "[답변]" in b["messages"][-1]["content"]]
        assert {b["model"] for b in judge_bodies} == {"judge-model"} and {b["max_tokens"] for b in judge_bodies} == {200}
        q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
        assert [x["reason"] for x in q] == ["judge_unsupported: 원문은 매주 월요일이라고만 합니다"] and q[0]["item_index"] == 1
        ledger = json.loads((tmp_path / "qa" / "ledger.json").read_text())
        assert ledger["judged"] == 3 and ledger["judge_unsupported"] == 1 and ledger["requests"] == 4
        app.requests = 0
        again = run_generate(qa_config(tmp_path, base, judge=True, judge_model="judge-model"), pages)
        assert app.requests == 0 and again.content_hash == m.content_hash   # verdicts come from the cache


def test_a_judge_answer_that_is_not_json_counts_as_unsupported():
    from culbot.tasks.grounding import parse_verdict

    assert parse_verdict('{"supported": true, "reason": "ok"}') == (True, "ok")
    assert parse_verdict('판단: ```json\n{"supported": false, "reason": "숫자가 다름"}\n```') == (False, "숫자가 다름")
    assert parse_verdict("네, 뒷받침됩니다.")[0] is False and parse_verdict('{"supported": "yes"}')[0] is False


def test_a_run_whose_every_answer_is_quarantined_fails_naming_the_commonest_reasons(tmp_path, monkeypatch):
    """Issue 22: generate-qa exited 0 with 0 rows when every chunk was quarantined (truncated, garbage, timeout answers)."""
    from culbot.tasks.generate_qa import NoUsableRows

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for("가가", 3), page_for("나나", 3), page_for("다다", 3)])
    app = OpenAIApp(script={"가가 안내": [Reply(content=items_json(facts("가가"))[:80], finish_reason="length")],
                            "나나 안내": [Reply(content=items_json(facts("나나"))[:60], finish_reason="length")],
                            "다다 안내": [Reply(content="데이터를 만들 수 없습니다.")]})
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(NoUsableRows, match=r"none of 3 chunks gave a usable row \(finish_reason_length ×2, unparsable ×1\)"):
            run_generate(qa_config(tmp_path, base), pages)
    assert len(_store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")) == 3   # kept, with their reasons
    assert _store.read_manifest(tmp_path / "qa") is None                        # never a finished output
