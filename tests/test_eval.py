"""Eval of a tiny trained run: loss, perplexity, probe answers with the training template, and the gate."""
import json

import pytest

from culbot.pipeline_config.train_schema import EvalConfig
from culbot.tasks import _store
from culbot.tasks.contracts import EvalReport
from culbot.tasks.eval import gate, run_eval
from culbot.tasks.run_folder import RunNotFinished
from tests.conftest import SAMPLES


def test_eval_reports_loss_perplexity_and_probe_answers(trained_run):
    res = run_eval(trained_run, EvalConfig(probes=["도서관은 몇 시에 여나요?", "휴학은 어디서 신청해요?"], max_new_tokens=8, answer_questions=0))
    assert res.status == "passed" and res.label_tokens > 0
    assert res.perplexity == pytest.approx(2.718281828 ** res.eval_loss, rel=1e-6)
    assert res.template == "cbnu2"
    assert res.probes[0].prompt == (
        "아래는 충북대학교와 관련한 작업을 설명하는 명령어입니다. 충북대학교의 공식 정보에 근거하여 요청을 적절히 완료하는 응답을 작성하세요."
        "\n\n### 명령어:\n도서관은 몇 시에 여나요?\n\n### 응답:\n")
    md = (trained_run / "eval" / "eval.md").read_text()
    assert "**PASSED**" in md and "도서관은 몇 시에 여나요?" in md
    assert _store.read_model(trained_run / "eval" / "eval.json", EvalReport) == res
    assert _store.read_manifest(trained_run / "eval").lineage.dataset   # the report says which data it judged
    failed = run_eval(trained_run, EvalConfig(probes=["x"], max_new_tokens=1, max_eval_loss=0.001, answer_questions=0))
    assert failed.status == "failed" and "> gate 0.001" in failed.reason
    run_eval(trained_run, EvalConfig(probes=["도서관은 몇 시에 여나요?"], max_new_tokens=8, answer_questions=0))   # leave a passing eval for the tests below


def test_eval_scores_retrieval_on_the_hand_written_questions_and_gates_on_recall(trained_run, tmp_path):
    from culbot.pipeline_config.schema import RagConfig
    from culbot.tasks.index import build_index

    index = build_index(SAMPLES / "cbnu_pages", RagConfig(), tmp_path / "idx")
    spec = EvalConfig(probes=["x"], max_new_tokens=1, retrieval_questions=SAMPLES / "rag_questions.jsonl", answer_questions=0)
    harder = tmp_path / "harder.jsonl"   # one question whose gold document the index does not have: recall@5 < 1
    harder.write_text((SAMPLES / "rag_questions.jsonl").read_text() + '{"id": "x", "question": "화성 탐사선 발사일", "gold": ["없는 문서"]}\n')
    failed = run_eval(trained_run, spec.model_copy(update={"min_recall_at_5": 1.0, "retrieval_questions": harder}), index.path)
    assert failed.status == "failed" and failed.reason.startswith(f"retrieval recall@5 {failed.retrieval.recall_at_5:.3f} < gate 1.0")
    res = run_eval(trained_run, spec.model_copy(update={"min_recall_at_5": 0.8}), index.path)
    r = res.retrieval
    assert res.status == "passed" and "retrieval recall@5" in res.reason and "≥ gate 0.8" in res.reason
    assert r.questions == 67 and r.unanswerable == 10 and set(r.by_set) == {"direct", "paraphrase", "near-duplicate", "unanswerable"}
    assert 0.8 <= r.recall_at_5 and r.recall_at_1 <= r.recall_at_5 and r.mrr >= r.recall_at_1
    # issue 23: the answer facts in the passages the model is given, and refusal at the threshold serving uses (the index's)
    assert r.context_k == 3 and 0.8 <= r.context_fact_recall <= 1.0
    assert r.served_threshold == json.loads((index.path / "index.json").read_text())["calibration"]["threshold"]
    assert r.served_accuracy is not None and r.by_set["unanswerable"]["refused"] >= 0.5
    md = (trained_run / "eval" / "eval.md").read_text()
    assert "## Retrieval" in md and f"| all answerable | 57 | {r.recall_at_1:.3f} | {r.recall_at_5:.3f} | {r.mrr:.3f} |" in md
    assert f"Context fact recall: {r.context_fact_recall:.3f}" in md and f"index's own no-answer threshold {r.served_threshold}" in md
    m = _store.read_manifest(trained_run / "eval")
    assert m.inputs["index"] == index.content_hash and m.counts["recall_at_5"] == r.recall_at_5
    run_eval(trained_run, EvalConfig(probes=["도서관은 몇 시에 여나요?"], max_new_tokens=8, answer_questions=0))   # leave a passing eval for the tests below


def test_the_gate_fails_a_loss_that_is_not_finite():
    assert gate(float("nan"), EvalConfig()) == (False, "validation loss nan is not finite")
    assert gate(2.5, EvalConfig(max_eval_loss=3.0)) == (True, "validation loss 2.5000 ≤ gate 3.0")
    # no ceiling: "passed" says that the loss gated nothing but NaN (issue 15: PASSED at perplexity 986)
    assert gate(6.894, EvalConfig()) == (True, "validation loss 6.8940 (perplexity 986) is finite; no ceiling is set "
                                             "(eval.max_eval_loss), so the loss only guards against NaN")


def test_eval_metrics_table_names_each_gate():
    from culbot.tasks.contracts import EvalReport, RetrievalMetrics
    from culbot.tasks.eval import metrics_table

    res = EvalReport(run="r", status="passed", reason="", eval_loss=6.893, perplexity=986.0, label_tokens=120, template="cbnu",
                     probes=[], seconds=1.0, retrieval=RetrievalMetrics(questions=10, unanswerable=2, recall_at_1=0.5, recall_at_5=0.8, mrr=0.6))
    rows = metrics_table(res, EvalConfig(min_recall_at_5=0.7))
    assert rows[0] == {"metric": "validation loss", "value": 6.893, "baseline": None, "gate": "finite (no ceiling set)"}
    assert {"metric": "retrieval recall@5", "value": 0.8, "baseline": None, "gate": "≥ 0.7"} in rows
    assert metrics_table(res, EvalConfig(max_eval_loss=3.0))[0]["gate"] == "≤ 3.0"


def test_a_run_that_did_not_complete_is_not_evaluated(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunNotFinished, match=r"run: not a run folder \(a run folder is artifacts/runs/<profile>-<id>/"):
        run_eval(tmp_path / "run", EvalConfig())
    (tmp_path / "run" / "config.json").write_text("{}")   # a run that was launched but never finished
    with pytest.raises(RunNotFinished, match="training status is 'missing'"):
        run_eval(tmp_path / "run", EvalConfig())
