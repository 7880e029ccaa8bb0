"""QA generation against a real local OpenAI-compatible server, through the real openai client."""
import json

import pytest

from culbot.pipeline_config.schema import ConfigError, QAGenConfig
from culbot.tasks import _store
from culbot.tasks.generate_qa import (
    AnswerParseError, BudgetExceeded, ItemRules, chunk_page, estimate_tokens, load_prompt, parse_answer, run_generate, validate_item,
)
from tests.conftest import SAMPLES
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json

KEY = "sk-test-never-log-me-123"


def facts(tag: str, n: int = 3) -> list[tuple[str, str, str]]:
    return [(f"{tag} 안내 질문 {i}번은 무엇인가요?", "", f"{tag} 안내에 따르면 항목 {i}번은 매주 월요일 오전 9시에 진행됩니다.") for i in range(n)]


def page_for(tag: str, n: int = 3) -> dict:
    text = "\n".join(f"{tag} 안내에 따르면 항목 {i}번은 매주 월요일 오전 9시에 진행됩니다. 문의는 043-261-2114 입니다." for i in range(n))
    return {"url": f"https://www.chungbuk.ac.kr/{tag}", "title": f"{tag} 안내", "text": text, "content_hash": _store.sha256_text(text)}


def write_pages(folder, pages):
    _store.atomic_write_jsonl(folder / "pages.jsonl", pages)
    _store.write_manifest(folder, stage="crawl_cbnu", inputs={}, config={}, counts={})
    return folder


def cfg(tmp_path, base, **kw) -> QAGenConfig:
    d = dict(backend="openai", base_url=base + "/v1", items_per_chunk=3, max_in_flight=4, requests_per_minute=6000,
             backoff_base_s=0.05, parse_retries=2, max_retries=3, timeout_s=10, cache_dir=tmp_path / "cache", out_dir=tmp_path / "qa")
    d.update(kw)
    return QAGenConfig(**d)


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
        m = run_generate(cfg(tmp_path, base), pages)
        # 1 each for 가나다라마잘못, 2 for 바바(429) 사사(500) 아아(parse retry), 3 for 자자 (1 + 2 parse retries)
        assert app.requests == 6 + 2 * 3 + 3
        c = m["counts"]
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
        again = run_generate(cfg(tmp_path, base), pages)
        assert app.requests == 0
        assert again["content_hash"] == m["content_hash"] and again["counts"]["cache_hits"] == 10

    rows = _store.read_jsonl(tmp_path / "qa" / "rows.jsonl")
    assert {r["source"] for r in rows} == {"cbnu"} and all(r["grounding"] >= 0.35 for r in rows)
    for f in (tmp_path / "qa").rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(), f"API key leaked into {f}"


def test_request_budget_stops_cleanly_and_rerun_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = ["가가", "나나", "다다", "라라", "사사"]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=items_json(facts(t)))] for t in tags})
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(BudgetExceeded, match=r"request budget reached: 3 of qa.max_requests=3.*raise the budget and rerun"):
            run_generate(cfg(tmp_path, base, max_requests=3, max_in_flight=1), pages)
        assert app.requests == 3
        assert _store.read_manifest(tmp_path / "qa") is None
        m = run_generate(cfg(tmp_path, base, max_requests=3), pages)
    assert app.requests == 5 and m["counts"]["cache_hits"] == 3 and m["counts"]["rows"] == 15


def test_cost_budget_stops_before_overspending(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in ["가가", "나나"]])
    app = OpenAIApp(script={})
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(BudgetExceeded, match="cost budget reached"):
            run_generate(cfg(tmp_path, base, max_cost_usd=0.001, max_tokens=1000, price_output_per_million=1000.0), pages)
    assert app.requests == 0


def test_in_flight_cap_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = ["가가", "나나", "다다", "라라", "사사", "아아"]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=items_json(facts(t)))] for t in tags}, latency_s=0.3)
    with serve(OpenAIHandler, app) as base:
        run_generate(cfg(tmp_path, base, max_in_flight=2), pages)
    assert app.max_in_flight == 2 and app.requests == 6


def test_missing_key_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    pages = write_pages(tmp_path / "pages", [page_for("가가")])
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        run_generate(QAGenConfig(cache_dir=tmp_path / "c", out_dir=tmp_path / "qa"), pages)


def test_replay_backend_answers_samples_offline_and_quarantines_misses(tmp_path):
    from culbot.tasks.crawl_cbnu import read_directory

    pages, _ = read_directory(SAMPLES / "cbnu_pages")
    pages.append({"url": "file:new.txt", "title": "새 문서", "text": "아직 녹음된 답변이 없는 새 문서입니다. " * 3, "content_hash": "x"})
    folder = write_pages(tmp_path / "pages", pages)
    c = QAGenConfig(backend="replay", replay_dir=SAMPLES / "qa_replay", chunk_tokens=400, cache_dir=tmp_path / "cache", out_dir=tmp_path / "qa")
    m = run_generate(c, folder)
    assert m["counts"]["rows"] == 25 and m["counts"]["requests"] == 0
    q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
    miss = [x for x in q if x["reason"] == "no_recorded_answer"]
    assert len(miss) == 1 and miss[0]["url"] == "file:new.txt" and "record_replay" in miss[0]["detail"]


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


def test_validate_item_rules():
    src = "중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다. 문의 043-261-2114"
    r = ItemRules(min_korean_ratio=0.5, max_output_words=10, min_grounding=0.35)
    ok, reason = validate_item({"instruction": "도서관 운영 시간은?", "output": "중앙도서관은 평일 오전 9시부터 운영합니다."}, src, r)
    assert reason is None and ok["input"] == "" and ok["grounding"] > 0.9
    assert validate_item({"instruction": "도서관 전화번호는?", "input": None, "output": "043-261-2114"}, src, r)[1] is None
    assert validate_item({"instruction": "질문", "output": " ".join(["도서관"] * 11)}, src, r)[1] == "output_too_long"
    assert validate_item({"instruction": 3, "output": "x"}, src, r)[1] == "instruction_missing_or_not_text"
    assert validate_item("문자열", src, r)[1] == "not_an_object"


def test_chunking_keeps_every_character_and_respects_the_budget():
    text = "\n".join(f"{i}번째 문단입니다. 충북대학교의 학사 제도에 관한 설명이 이어집니다." for i in range(60))
    text += "\n" + "".join(chr(0xAC00 + i * 7 % 11000) for i in range(3000))  # one line with no break points at all
    page = {"url": "u", "title": "긴 문서", "text": text}
    chunks, hard = chunk_page(page, 300, estimate_tokens)
    assert hard == 1 and len(chunks) > 5
    assert all(c.tokens <= 300 for c in chunks)
    assert "".join(c.text.replace("\n", "") for c in chunks) == text.replace("\n", "")
    assert len({c.hash for c in chunks}) == len(chunks)


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


def test_key_from_a_prefect_secret_block(tmp_path, monkeypatch, prefect_harness):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    Secret(value="sk-from-block-456").save("culbot-openai-test", overwrite=True)
    pages = write_pages(tmp_path / "pages", [page_for("가가")])
    app = OpenAIApp(script={"가가 안내": [Reply(content=items_json(facts("가가")))]})
    with serve(OpenAIHandler, app) as base:
        m = run_generate(cfg(tmp_path, base, api_key_secret_block="culbot-openai-test"), pages)
    assert app.auth == {"Bearer sk-from-block-456"} and m["counts"]["rows"] == 3
    assert "sk-from-block-456" not in (tmp_path / "qa" / "manifest.json").read_text()


def test_rejected_request_is_quarantined_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for("가가"), page_for("나나")])
    app = OpenAIApp(script={"가가 안내": [Reply(status=400)], "나나 안내": [Reply(content=items_json(facts("나나")))]})
    with serve(OpenAIHandler, app) as base:
        m = run_generate(cfg(tmp_path, base), pages)
    assert app.by_marker["가가 안내"] == 1 and m["counts"]["rows"] == 3
    q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
    assert [x["reason"] for x in q] == ["request_rejected"] and "HTTP 400" in q[0]["detail"]
