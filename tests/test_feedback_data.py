"""Issue 26: the feedback-data stage. Only approved feedback becomes data: corrections as rows with the served context,
ratings as preference pairs on the exact served prompt; refused and voted-down questions are reported by topic; the
stage's key follows the store; merge-data prefers a reviewed correction to a generated row; the store records which
dataset version used each item."""
from __future__ import annotations

import pytest

from culbot.pipeline_config.schema import FeedbackConfig, MergeDataConfig
from culbot.tasks import _store
from culbot.tasks.feedback_data import cache_key, mark_used, run_feedback_data
from culbot.tasks.feedback_store import FeedbackStore
from culbot.tasks.merge_data import run_merge

CONTEXT = "[참고 1] 생활관 입사 안내\n신입생 입사 신청은 2월에 생활관 홈페이지에서 받습니다."


def _served(store: FeedbackStore, id: str, question: str, answer: str, *, refused: bool = False) -> None:
    store.record_answer(id=id, channel="serve", question=question, prompt=f"### 질문:\n{question}\n\n### 답변:\n", context=CONTEXT,
                        answer=answer, sources=[{"title": "생활관 입사 안내", "url": "https://dorm.chungbuk.ac.kr/a", "doc": "dorm"}],
                        confidence=0.2 if refused else 0.8, refused=refused, model="m", dataset="d", index="i")


def _store_with_feedback(tmp_path) -> tuple[FeedbackConfig, FeedbackStore, dict[str, int]]:
    cfg = FeedbackConfig(enabled=True, store=f"sqlite:///{tmp_path}/fb.db", out_dir=tmp_path / "feedback")
    store = FeedbackStore(cfg.store)
    _served(store, "a-dorm", "기숙사 신청은 언제 해요?", "3월에 신청합니다.")
    _served(store, "a-dorm2", "기숙사 신청은 언제 해요?", "2월에 생활관 홈페이지에서 신청합니다.")   # the same prompt, answered better
    _served(store, "a-lib", "도서관은 몇 시에 열어요?", "오전 9시에 엽니다.")
    _served(store, "a-food", "학생식당 메뉴는 어디서 봐요?", "죄송합니다. 잘 모르겠습니다.", refused=True)
    _served(store, "a-food2", "학생식당 가격은 얼마예요?", "죄송합니다. 잘 모르겠습니다.", refused=True)
    _served(store, "a-bus", "셔틀버스 시간표 알려주세요", "1시간마다 다닙니다.")
    ids = {
        "fix": store.add("a-dorm", rating="down", correction="신입생 입사 신청은 2월에 생활관 홈페이지에서 받습니다."),
        "down": store.add("a-dorm", rating="down"),
        "up": store.add("a-dorm2", rating="up"),
        "lib_up": store.add("a-lib", rating="up"),
        "bus_down": store.add("a-bus", rating="down", comment="시간표가 틀렸어요"),
        "pending": store.add("a-lib", rating="down", correction="오전 8시에 엽니다."),
        "spam": store.add("a-bus", correction="광고 문구"),
    }
    store.review([ids[k] for k in ("fix", "down", "up", "lib_up", "bus_down")], approve=True, reviewer="kim")
    store.review([ids["spam"]], approve=False, reviewer="kim")
    return cfg, store, ids


@pytest.fixture(autouse=True)
def _store_from_the_profile(monkeypatch):
    monkeypatch.delenv("CULBOT_FEEDBACK_DB", raising=False)   # conftest points serve/chat/demo there; these read feedback.store


def test_only_approved_feedback_becomes_rows_and_pairs_and_the_report_groups_what_went_unanswered(tmp_path):
    cfg, store, ids = _store_with_feedback(tmp_path)
    out = run_feedback_data(cfg)
    rows = _store.read_jsonl(out.path / "rows.jsonl")
    assert [(r["instruction"], r["input"], r["output"], r["source"]) for r in rows] == [
        ("기숙사 신청은 언제 해요?", CONTEXT, "신입생 입사 신청은 2월에 생활관 홈페이지에서 받습니다.", "feedback")]   # pending and rejected ones are not
    pairs = _store.read_jsonl(out.path / "pairs.jsonl")
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("신입생 입사 신청은 2월에 생활관 홈페이지에서 받습니다.", "3월에 신청합니다."),     # a correction of an answer voted down
        ("2월에 생활관 홈페이지에서 신청합니다.", "3월에 신청합니다.")}                   # an answer voted up vs one voted down
    assert all(p["prompt"] == "### 질문:\n기숙사 신청은 언제 해요?\n\n### 답변:\n" for p in pairs)   # the exact served prompt
    report = _store.read_json(out.path / "unanswered.json")
    by_topic = {g["topic"]: g for g in report}
    assert by_topic["학생식당"]["questions"] == 2 and by_topic["학생식당"]["refused"] == 2   # both refusals under one topic
    assert any(g["voted_down"] for g in report if "셔틀버스 시간표 알려주세요" in g["examples"])
    assert "| 학생식당 | 2 | 2 | 0 |" in (out.path / "unanswered.md").read_text()
    assert out.counts["approved_items"] == 5 and out.counts["rows"] == 1 and out.counts["pairs"] == 2 and out.counts["first_feedback"]
    assert _store.is_complete(out.path)

    key = cache_key(cfg)
    assert cache_key(cfg) == key                                   # nothing changed: the cached folder stands
    store.review([ids["pending"]], approve=True, reviewer="lee")
    assert cache_key(cfg) != key                                   # a new approval rebuilds it
    assert len(_store.read_jsonl(run_feedback_data(cfg).path / "rows.jsonl")) == 2


def test_a_reviewed_correction_wins_a_duplicate_in_merge_data_and_the_store_records_the_version(tmp_path):
    cfg, store, ids = _store_with_feedback(tmp_path)
    made = run_feedback_data(cfg)
    generated = tmp_path / "cbnu_qa"
    _store.atomic_write_jsonl(generated / "rows.jsonl", [
        {"id": "cbnu:1", "source": "cbnu", "instruction": "기숙사 신청은 언제 해요?", "input": CONTEXT, "output": "3월에 신청합니다."},
        {"id": "cbnu:2", "source": "cbnu", "instruction": "졸업 학점은 몇 학점이에요?", "input": "", "output": "130학점입니다."}])
    _store.write_manifest(generated, stage="generate-qa", inputs={}, config={}, counts={})
    dataset = run_merge({"cbnu": generated, "feedback": made.ref()}, MergeDataConfig(out_root=tmp_path / "datasets"))
    rows = _store.read_table(dataset.path / "train.parquet") + _store.read_table(dataset.path / "validation.parquet")
    dorm = [r for r in rows if r["instruction"] == "기숙사 신청은 언제 해요?"]
    assert [(r["source"], r["output"]) for r in dorm] == [("feedback", "신입생 입사 신청은 2월에 생활관 홈페이지에서 받습니다.")]
    mark_used(cfg, made, dataset)
    used = {i["id"]: i["used_in"] for i in store.items(status="approved")}
    assert used[ids["fix"]] == used[ids["down"]] == used[ids["up"]] == dataset.content_hash   # its row and its pairs
    assert used[ids["lib_up"]] is None                                                      # no pair, no row: not used


def test_every_reader_finds_the_store_the_same_way(monkeypatch, capsys):
    """The URL given (feedback.store, or --feedback-db) wins; else $CULBOT_FEEDBACK_DB, which alone may hold a password;
    else the default SQLite file. A password in config or on the command line is refused without being repeated."""
    from culbot.flows.cli import main
    from culbot.pipeline_config.loader import ConfigError
    from culbot.pipeline_config.schema import DEFAULT_FEEDBACK_URL, load_data_profile

    assert FeedbackConfig().url() == DEFAULT_FEEDBACK_URL
    monkeypatch.setenv("CULBOT_FEEDBACK_DB", "postgresql+psycopg://lab:pw@db.example/culbot")
    assert FeedbackConfig().url() == "postgresql+psycopg://lab:pw@db.example/culbot"
    assert FeedbackConfig(store="sqlite:///x.db").url() == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="holds a password") as e:
        load_data_profile("sample", ["feedback.store=postgresql://lab:s3cret@db/culbot"])
    assert "s3cret" not in str(e.value)
    assert main(["feedback", "list", "--feedback-db", "postgresql://lab:s3cret@db/culbot"]) == 2
    err = capsys.readouterr().err
    assert "holds a password" in err and "s3cret" not in err
