"""Answer quality and the release gate: scoring, the registry baseline, a worse model refused and a better one passed,
and the eval stage with its report and publish refusal."""
from __future__ import annotations

import re
import shutil

import pytest

from culbot.pipeline_config.train_schema import AnswerConfig, EvalConfig, PublishConfig
from culbot.tasks import _store, grounding
from culbot.tasks.answer_quality import compare, evaluate_answers, fact_recall, select_questions, verdict
from culbot.tasks.contracts import AnswerMetrics, short_hash
from culbot.tasks.retrieval import Retriever

from .conftest import SAMPLES
from .servers.base import serve
from .servers.completions import CompletionsApp, CompletionsHandler


def test_fact_recall_counts_numbers_dates_contacts_and_names():
    ref = "생활관 입사 신청은 2월 3일부터 2월 10일까지이며, 문의는 043-261-2114로 하세요."
    assert fact_recall(ref, ref) == 1.0
    assert fact_recall(ref, "2월 3일부터 신청합니다.") == 0.5   # 2월, 3일 of 2월, 3일, 10일 and the phone number
    assert fact_recall("충북대학교 중앙도서관", "충북대학교에 있습니다") == pytest.approx(0.5)   # names (NNP)
    assert fact_recall("네, 가능합니다.", "네") is None   # nothing checkable


def test_compare_names_the_metric_and_the_regression():
    prev = AnswerMetrics(questions=10, answerable=8, unanswerable=2, fact_recall=0.6, chrf=40.0, false_refusal_rate=0.0)
    cur = AnswerMetrics(questions=10, answerable=8, unanswerable=2, fact_recall=0.5, chrf=40.5, false_refusal_rate=0.25)
    changes, missed = compare(cur, prev, EvalConfig(floors={"chrf": 50}))
    by = {c.metric: c for c in changes}
    assert by["fact_recall"].regressed and by["fact_recall"].delta == -0.1
    assert not by["chrf"].regressed and by["false_refusal_rate"].regressed   # lower is better there
    assert missed == ["chrf 40.5 < floor 50.0"]


@pytest.fixture(scope="module")
def dataset_dir(sample_formatted):
    m = _store.read_manifest(sample_formatted)
    return sample_formatted.parent.parent / "datasets" / short_hash(m.lineage.dataset)


def scripted(references: dict[str, str], how: str):
    """A scripted model: 'good' answers with the reference (or the first retrieved passage's first line), 'medium' with half
    of it, 'bad' with a vague non-answer."""
    def answer(prompt: str) -> str:
        q = re.search(r"### 명령어:\n(.*?)\n\n", prompt, re.S).group(1)
        ctx = re.search(r"### 입력:\n\[참고 1\] [^\n]*\n([^\n]+)", prompt)
        ref = references.get(q) or (ctx.group(1) if ctx else "")
        if how == "bad":
            return "글쎄요, 학교에 물어보세요.\n### 명령어:\n다음 질문"
        half = ref[: len(ref) // 2]
        if how == "medium":
            return half
        # 'good': the whole reference where the retrieved passages support it (a good model says nothing unsupported)
        context = prompt.split("### 입력:\n", 1)[-1].split("\n\n### 응답:", 1)[0]
        return ref if grounding.check(ref, context, 0.5)[1] is None or grounding.check(half, context, 0.5)[1] is not None else half
    return answer


def test_the_gate_refuses_a_worse_model_and_passes_a_better_one(trained_run, cbnu_index, dataset_dir, tmp_path):
    from culbot.tasks.answer import Answerer
    from culbot.tasks.eval import evaluate_retrieval
    from culbot.tasks.releases import previous_release, record_release, release_of
    from culbot.tasks.run_folder import read_run_card

    spec = EvalConfig(answer_questions=12, gate="enforce")
    threshold = evaluate_retrieval(cbnu_index, spec).no_answer_threshold
    hand = [q for q in _store.read_jsonl(SAMPLES / "rag_questions.jsonl")]
    questions = select_questions(dataset_dir, hand, spec.answer_questions)
    assert {q["set"].split()[0] for q in questions} == {"validation", "hand-written"} and any(not q["gold"] for q in questions)
    refs = {q["question"]: q["reference"] for q in questions if q["reference"]}
    publish = PublishConfig(local_dir=tmp_path / "publish")
    card = read_run_card(trained_run / "adapter")

    def evaluate(how: str, previous):
        with serve(CompletionsHandler, CompletionsApp(script=scripted(refs, how))) as url:
            a = Answerer.load(trained_run / "adapter", cbnu_index, upstream=f"{url}/v1",
                              spec=AnswerConfig(no_answer_threshold=threshold, max_new_tokens=64))
            return evaluate_answers(a, questions, spec, previous=previous, base_answerer=None)

    medium = evaluate("medium", None)
    assert medium.baseline == "none" and medium.metrics.refusal_rate == 1.0   # unanswerable ones refused by retrieval
    ev = type("E", (), {"answers": medium, "index": "idx"})()
    record_release(publish, release_of(trained_run, card, ev, "local", {}))
    previous = previous_release(publish)
    assert previous.metrics == medium.metrics and previous.answers

    bad = evaluate("bad", previous)
    ok, says = verdict(bad, spec)
    assert not ok and "fact_recall" in says and f"published {trained_run.name}" in says
    fr = next(c for c in bad.changes if c.metric == "fact_recall")
    assert fr.regressed and fr.current < fr.previous and f"{fr.delta:+.4g}" in says
    assert bad.examples[0].answer == "글쎄요, 학교에 물어보세요."   # cut at the template's stop string
    assert verdict(bad, spec.model_copy(update={"gate": "report"}))[0]   # report mode: said, not enforced

    good = evaluate("good", previous)
    ok, says = verdict(good, spec)
    assert ok, says
    assert good.metrics.fact_recall > medium.metrics.fact_recall and good.metrics.chrf > medium.metrics.chrf
    assert good.metrics.groundedness is not None


def test_the_eval_stage_reports_answer_quality_and_a_missed_floor_blocks_publishing(trained_run, cbnu_index, dataset_dir, tmp_path):
    from culbot.tasks.eval import REPORT_MD, run_eval
    from culbot.tasks.publish import PublishRefused, run_publish

    run = tmp_path / "runs" / trained_run.name   # at the fixture's depth: the run's relative paths still resolve
    shutil.copytree(trained_run, run, symlinks=True)
    publish = PublishConfig(local_dir=tmp_path / "publish")
    spec = EvalConfig(probes=["도서관은?"], max_new_tokens=4, answer_questions=6, gate="report")
    res = run_eval(run, spec, cbnu_index, answer=AnswerConfig(max_new_tokens=8), dataset=dataset_dir, publish=publish)
    assert res.passed and res.answers.baseline.startswith("base model") and res.index
    assert len(res.answers.examples) == 6 and res.answers.baseline_answers
    # serving answers as eval did: with the index's own threshold (issue 23: eval's measured one was copied to any index)
    assert res.answer.no_answer_threshold is None and res.retrieval.served_threshold == Retriever(cbnu_index).threshold
    md = (run / "eval" / REPORT_MD).read_text()
    assert "## Answer quality" in md and "| fact_recall |" in md and "answers side by side" in md

    strict = spec.model_copy(update={"gate": "enforce", "floors": {"chrf": 99.0}})
    res = run_eval(run, strict, cbnu_index, answer=AnswerConfig(max_new_tokens=8), dataset=dataset_dir, publish=publish)
    assert not res.passed and "chrf" in res.reason and "< floor 99.0" in res.reason
    with pytest.raises(PublishRefused, match="chrf"):
        run_publish(run, None, publish.model_copy(update={"what": "adapter"}))


def test_a_run_is_never_its_own_baseline_so_republishing_keeps_eval_cached(tmp_path):
    from culbot.tasks.contracts import Registry, Release
    from culbot.tasks.eval import release_key
    from culbot.tasks.releases import previous_release, record_release

    spec = PublishConfig(local_dir=tmp_path)
    assert release_key(spec, "run-a") is None
    record_release(spec, Release(run="run-a", at="t1", target="local", where={}))
    assert release_key(spec, "run-a") is None and previous_release(spec, exclude_run="run-a") is None
    assert release_key(spec, "run-b") == "run-a@t1"
    record_release(spec, Release(run="run-a", at="t2", target="local", where={}))   # republished: replaced, not duplicated
    record_release(spec, Release(run="run-b", at="t3", target="local", where={}))
    assert [r.at for r in _store.read_model(tmp_path / "registry.json", Registry).releases] == ["t2", "t3"]
    assert previous_release(spec, exclude_run="run-b").at == "t2" and release_key(spec, "run-c") == "run-b@t3"
