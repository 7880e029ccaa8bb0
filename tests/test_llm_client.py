"""The LLM client against a real local OpenAI-compatible server: budgets, the in-flight cap, keys from the
environment or a Prefect Secret block, and requests the server rejects."""
import json

import pytest

from culbot.pipeline_config.schema import ConfigError, QAGenConfig
from culbot.tasks import _store
from culbot.tasks.generate_qa import run_generate
from culbot.tasks.llm_client import BudgetExceeded
from tests.conftest import OPENAI_KEY as KEY
from tests.conftest import facts, page_for, qa_config, write_pages
from tests.servers.base import serve
from tests.servers.openai_api import OpenAIApp, OpenAIHandler, Reply, items_json


def test_request_budget_stops_cleanly_and_rerun_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = ["가가", "나나", "다다", "라라", "사사"]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=items_json(facts(t)))] for t in tags})
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(BudgetExceeded, match=r"request budget reached: 3 of qa.max_requests=3.*raise the budget and rerun"):
            run_generate(qa_config(tmp_path, base, max_requests=3, max_in_flight=1), pages)
        assert app.requests == 3
        assert _store.read_manifest(tmp_path / "qa") is None
        m = run_generate(qa_config(tmp_path, base, max_requests=3), pages)
    assert app.requests == 5 and m.counts["cache_hits"] == 3 and m.counts["rows"] == 15


def test_cost_budget_stops_before_overspending(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in ["가가", "나나"]])
    app = OpenAIApp(script={})
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(BudgetExceeded, match="cost budget reached"):
            run_generate(qa_config(tmp_path, base, max_cost_usd=0.001, max_tokens=1000, price_output_per_million=1000.0), pages)
    assert app.requests == 0


def test_in_flight_cap_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = ["가가", "나나", "다다", "라라", "사사", "아아"]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=items_json(facts(t)))] for t in tags}, latency_s=0.3)
    with serve(OpenAIHandler, app) as base:
        run_generate(qa_config(tmp_path, base, max_in_flight=2), pages)
    assert app.max_in_flight == 2 and app.requests == 6


def test_missing_key_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    pages = write_pages(tmp_path / "pages", [page_for("가가")])
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        run_generate(QAGenConfig(cache_dir=tmp_path / "c", out_dir=tmp_path / "qa"), pages)


def test_key_from_a_prefect_secret_block(tmp_path, monkeypatch, prefect_harness):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    Secret(value="sk-from-block-456").save("culbot-openai-test", overwrite=True)
    pages = write_pages(tmp_path / "pages", [page_for("가가")])
    app = OpenAIApp(script={"가가 안내": [Reply(content=items_json(facts("가가")))]})
    with serve(OpenAIHandler, app) as base:
        m = run_generate(qa_config(tmp_path, base, api_key_secret_block="culbot-openai-test"), pages)
    assert app.auth == {"Bearer sk-from-block-456"} and m.counts["rows"] == 3
    assert "sk-from-block-456" not in (tmp_path / "qa" / "manifest.json").read_text()


def test_rejected_request_is_quarantined_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    pages = write_pages(tmp_path / "pages", [page_for("가가"), page_for("나나")])
    app = OpenAIApp(script={"가가 안내": [Reply(status=400)], "나나 안내": [Reply(content=items_json(facts("나나")))]})
    with serve(OpenAIHandler, app) as base:
        m = run_generate(qa_config(tmp_path, base), pages)
    assert app.by_marker["가가 안내"] == 1 and m.counts["rows"] == 3
    q = _store.read_jsonl(tmp_path / "qa" / "quarantine.jsonl")
    assert [x["reason"] for x in q] == ["request_rejected"] and "HTTP 400" in q[0]["detail"]


def test_the_cost_budget_holds_with_requests_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = [f"문서{i:02d}" for i in range(12)]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    long_answer = items_json(facts("문서") * 20)   # a long answer: about 1,000 completion tokens
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=long_answer)] for t in tags}, latency_s=0.3, usage_from_text=True)
    with serve(OpenAIHandler, app) as base:
        with pytest.raises(BudgetExceeded, match="cost budget"):
            run_generate(qa_config(tmp_path, base, max_in_flight=4, max_tokens=1000, max_cost_usd=0.006), pages)
    spent = sum(p * 0.5 + c * 1.5 for p, c in app.usage) / 1e6   # what the server billed
    assert len(app.usage) < 12 and 0 < spent <= 0.006, f"spent ${spent:.6f} of $0.006 in {len(app.usage)} answers"
    ledger = json.loads((tmp_path / "qa" / "ledger.json").read_text())   # the ledger of a stopped run is kept
    assert ledger["cost_usd"] == pytest.approx(spent, abs=1e-6) and ledger["errors"]["stopped"] == 1


def test_hitting_the_budget_stops_the_queue_at_once_and_keeps_the_answers(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tags = [f"문서{i:02d}" for i in range(41)]
    pages = write_pages(tmp_path / "pages", [page_for(t) for t in tags])
    app = OpenAIApp(script={f"{t} 안내": [Reply(content=items_json(facts(t)))] for t in tags})
    with serve(OpenAIHandler, app) as base:
        t0 = time.monotonic()
        with pytest.raises(BudgetExceeded, match="request budget reached: 3 of qa.max_requests=3"):
            run_generate(qa_config(tmp_path, base, max_requests=3, requests_per_minute=60), pages)   # one request a second
        took = time.monotonic() - t0
    assert took < 6, f"took {took:.1f}s to stop (before: one rate-limit turn per pending chunk, ~41 s)"
    assert app.requests == 3 and len(list((tmp_path / "cache").rglob("*.json"))) == 3   # the three answers are kept
