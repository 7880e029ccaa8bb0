"""Evaluate a trained adapter: validation loss and perplexity, probe answers, retrieval, answer quality, and the gate.

Run as: culbot eval --run artifacts/runs/<run> [--index artifacts/indexes/<hash>] [--dataset artifacts/datasets/<hash>]

Answer quality (answer_quality.py): the model answers validation and hand-written questions through the
same core as `culbot chat` (answer.py), with retrieval, and is scored (fact recall, chrF, groundedness,
refusals) against the last published model, or the base model the first time. eval.gate 'enforce' fails
the run on a regression beyond eval.margins; 'report' only reports it.

With an index, retrieval is scored too (recall@1, recall@5, MRR, and the top score that tells answerable
questions from the rest) on the validation split's generated CBNU questions and the hand-written set
(eval.retrieval_questions), and eval.min_recall_at_5 gates on it.

Probes are formatted with the training template code (templates.render_prompt) and the
template recorded in the adapter's run card. The result is <run>/eval/: eval.json (an
EvalReport with the gate's verdict), eval.md and a manifest.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path


from culbot.pipeline_config.train_schema import AnswerConfig, EvalConfig, PublishConfig

from . import _store
from ._prefect import stage_task, table
from .contracts import (EVAL_REPORT_FILE, AnswerQuality, EvalOutput, EvalReport, ProbeAnswer, Release, RetrievalMetrics, RunCard, RunRef, SpecialTokens,
                        Stage, StageRef, Template, short_hash)
from .model_io import load_adapted
from .releases import previous_release, registry_path
from .run_folder import ADAPTER, EVAL, read_config, require_completed
from .special_tokens import encode_prompt
from .templates import extract_response, render_prompt

log = logging.getLogger("culbot.eval")

REPORT_MD = "eval.md"

def eval_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over label tokens."""
    import torch

    from .collate import PadCollator

    collate, total, count = PadCollator(pad_id), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(model.device) for k, v in collate(rows[i:i + batch_size]).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return (total / count if count else float("nan")), count


def answer_probes(model, tokenizer, template: Template, probes: list[str], max_new_tokens: int,
                  tokens: SpecialTokens | None = None) -> list[ProbeAnswer]:
    """Each probe rendered and encoded as in training (special_tokens.encode_prompt), stopping on the run's end tokens."""
    import torch

    out = []
    for q in probes:
        prompt = render_prompt(template, q, "", tokenizer)
        ids = torch.tensor([encode_prompt(tokenizer, prompt, template)], device=model.device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokens.stop_ids if tokens else tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)
        out.append(ProbeAnswer(question=q, prompt=prompt, answer=extract_response(template, text)))
    return out


def retrieval_markdown(m: RetrievalMetrics) -> list[str]:
    lines = ["## Retrieval", "", f"{m.questions} questions ({m.unanswerable} unanswerable)", "",
             "| questions | n | recall@1 | recall@5 | MRR |", "|---|---:|---:|---:|---:|",
             f"| all answerable | {m.questions - m.unanswerable} | {m.recall_at_1:.3f} | {m.recall_at_5:.3f} | {m.mrr:.3f} |"]
    lines += [f"| {name} | {f['questions']:.0f} | {f['recall_at_1']:.3f} | {f['recall_at_5']:.3f} | {f['mrr']:.3f} |"
              for name, f in m.by_set.items() if "recall_at_1" in f]
    if m.context_fact_recall is not None:
        lines += ["", f"Context fact recall: {m.context_fact_recall:.3f} of the answerable questions with answer facts have all of them "
                      f"in the {m.context_k} passages the model is given."]
    if m.served_threshold is not None:
        lines += ["", f"Confidence, median: answerable {m.answerable_top_score_median}, unanswerable {m.unanswerable_top_score_median} "
                      f"(AUC {m.confidence_auc}). At the index's own no-answer threshold {m.served_threshold}, the one serving uses, "
                      f"answer/refuse balanced accuracy is {m.served_accuracy} (the best threshold on these questions, "
                      f"{m.no_answer_threshold}, would give {m.threshold_accuracy})."]
    return lines + [""]


def report_markdown(res: EvalReport) -> str:
    lines = [f"# Eval of `{res.run}`", "", f"**{res.status.upper()}**: {res.reason}", "",
             "| metric | value |", "|---|---:|", f"| validation loss | {res.eval_loss:.4f} |",
             f"| perplexity | {res.perplexity:.2f} |", f"| label tokens | {res.label_tokens} |", ""]
    if res.answers is not None:
        from .answer_quality import markdown

        lines += markdown(res.answers)
    if res.retrieval is not None:
        lines += retrieval_markdown(res.retrieval)
    lines += [f"## Probes (template `{res.template}`)", ""]
    for p in res.probes:
        lines += [f"**Q:** {p.question}", "", f"**A:** {p.answer or '(empty)'}", ""]
    return "\n".join(lines)


def metrics_table(res: EvalReport, spec: EvalConfig) -> list[dict]:
    """The eval's figures as table-artifact rows: metric, value, the baseline's value and the gate that applies to it."""
    rows = [{"metric": "validation loss", "value": round(res.eval_loss, 4), "baseline": None,
             "gate": f"≤ {spec.max_eval_loss}" if spec.max_eval_loss is not None else "finite (no ceiling set)"},
            {"metric": "perplexity", "value": round(res.perplexity, 2), "baseline": None, "gate": None},
            {"metric": "label tokens", "value": res.label_tokens, "baseline": None, "gate": None}]
    if res.retrieval is not None:
        r = res.retrieval
        rows += [{"metric": "retrieval recall@1", "value": r.recall_at_1, "baseline": None, "gate": None},
                 {"metric": "retrieval recall@5", "value": r.recall_at_5, "baseline": None,
                  "gate": f"≥ {spec.min_recall_at_5}" if spec.min_recall_at_5 is not None else None},
                 {"metric": "retrieval MRR", "value": r.mrr, "baseline": None, "gate": None},
                 {"metric": f"context fact recall (context_k {r.context_k})", "value": r.context_fact_recall, "baseline": None, "gate": None},
                 {"metric": "refusal balanced accuracy at the served threshold", "value": r.served_accuracy, "baseline": None, "gate": None}]
    if res.answers is not None:
        base = res.answers.baseline_metrics
        for k, v in res.answers.metrics.gated().items():
            floor = spec.floors.get(k)
            rows.append({"metric": f"answers {k}", "value": round(v, 4), "baseline": getattr(base, k, None) if base else None,
                         "gate": f"{spec.gate}" + (f", floor {floor}" if floor is not None else "")})
    return rows


def gate(loss: float, spec: EvalConfig, retrieval: RetrievalMetrics | None = None, answers: AnswerQuality | None = None) -> tuple[bool, str]:
    """The eval gate: a finite validation loss, at most ``max_eval_loss`` when set; retrieval recall@5 at least ``min_recall_at_5``;
    answer quality no worse than the baseline beyond eval.margins and above eval.floors (eval.gate 'enforce')."""
    if not math.isfinite(loss):
        return False, f"validation loss {loss} is not finite"
    if spec.max_eval_loss is not None and loss > spec.max_eval_loss:
        return False, f"validation loss {loss:.4f} > gate {spec.max_eval_loss}"
    # Without a ceiling the loss gates nothing but NaN/inf: say so, so "passed" at perplexity 986 reads as what it is.
    reason = (f"validation loss {loss:.4f} ≤ gate {spec.max_eval_loss}" if spec.max_eval_loss is not None else
              f"validation loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.0f}) is finite; no ceiling is set "
              f"(eval.max_eval_loss), so the loss only guards against NaN")
    if retrieval is not None and spec.min_recall_at_5 is not None:
        if retrieval.recall_at_5 < spec.min_recall_at_5:
            return False, f"retrieval recall@5 {retrieval.recall_at_5:.3f} < gate {spec.min_recall_at_5}"
        reason += f"; retrieval recall@5 {retrieval.recall_at_5:.3f} ≥ gate {spec.min_recall_at_5}"
    if answers is not None:
        from .answer_quality import verdict

        ok, says = verdict(answers, spec)
        if not ok:
            return False, says
        reason += "; " + says
    return True, reason


def evaluate_retrieval(index: Path | StageRef, spec: EvalConfig) -> RetrievalMetrics:
    """The index scored on the validation split's CBNU questions and the hand-written set (when its file is there)."""
    from .retrieval import Retriever, evaluate, read_questions, validation_questions

    folder, _ = _store.read_input(index, "eval: the index is not a finished index")
    questions = validation_questions(folder)
    if spec.retrieval_questions is not None:
        if Path(spec.retrieval_questions).is_file():
            questions += [{**q, "set": q.get("set", "hand-written")} for q in read_questions(spec.retrieval_questions)]
        else:
            log.warning("eval.retrieval_questions: %s not found; retrieval is scored on the validation questions only", spec.retrieval_questions)
    return evaluate(Retriever(folder), questions)


def find_dataset(card: RunCard, root: Path = Path("artifacts/datasets")) -> Path | None:
    """The dataset version a run was trained on, where the default layout keeps it."""
    folder = root / short_hash(card.lineage.dataset or "")
    return folder if card.lineage.dataset and _store.is_complete(folder) else None


def evaluate_answer_quality(model, tokenizer, card: RunCard, adapter_dir: Path, spec: EvalConfig, answer: AnswerConfig,
                            index: Path | None, retrieval: RetrievalMetrics | None, dataset: Path | None,
                            previous: Release | None) -> tuple[AnswerQuality, AnswerConfig]:
    """Answer quality through the serving core; returns it and the answer settings used. Refusal uses the threshold
    serving will: the answer settings' if set, else the index's own."""
    from .answer import Answerer, LocalGenerator
    from .answer_quality import evaluate_answers, select_questions
    from .retrieval import Retriever, read_questions

    hand = read_questions(spec.retrieval_questions) if spec.retrieval_questions and Path(spec.retrieval_questions).is_file() else []
    if index is None:
        hand = [q for q in hand if q.get("gold")]   # without an index nothing can refuse by retrieval
    questions = select_questions(dataset, hand, spec.answer_questions)
    if dataset is None:
        log.warning("answer quality: no dataset version found for %s; only the hand-written questions are answered", adapter_dir.parent.name)
    answerer = Answerer(adapter_dir, LocalGenerator(model, tokenizer, adapter_dir.parent.name), tokenizer, card,
                        retriever=Retriever(index) if index is not None else None, spec=answer, index_dir=index)
    log.info("answer quality: %d questions, retrieval %s, baseline %s", len(questions), "on" if index else "off",
             f"release {previous.run}" if previous else "the base model")
    q = evaluate_answers(answerer, questions, spec, previous=previous, base_answerer=None if previous else answerer.base_model())
    return q, answer


def run_eval(run_dir: Path, spec: EvalConfig, index: Path | StageRef | None = None, *, answer: AnswerConfig | None = None,
             dataset: Path | StageRef | None = None, publish: PublishConfig | None = None) -> EvalReport:
    """``publish``: where the previous release is recorded (the answer-quality baseline); ``dataset``: the dataset version
    whose validation questions are answered (None: found by the run's lineage under artifacts/datasets)."""
    import datasets

    run_dir = Path(run_dir).resolve()
    t0 = time.monotonic()
    require_completed(run_dir)
    config = read_config(run_dir)
    model, tokenizer, card = load_adapted(run_dir / ADAPTER)
    rows = datasets.Dataset.from_parquet(str(config.data_dir(run_dir) / "validation.parquet")).select_columns(["input_ids", "labels"]).to_list()
    loss, n = eval_loss(model, rows, tokenizer.pad_token_id, spec.batch_size)
    template = card.template_for(spec.probe_source)
    probes = answer_probes(model, tokenizer, template, spec.probes, spec.max_new_tokens, card.special_tokens)
    retrieval = evaluate_retrieval(index, spec) if index is not None else None
    index_dir, index_hash = (None, None)
    if index is not None:
        index_dir, im = _store.read_input(index, "eval: the index is not a finished index")
        index_hash = im.content_hash
    answers, answer = None, answer or AnswerConfig()
    if spec.answer_questions > 0:
        dataset_dir = _store.read_input(dataset, "eval: the dataset is not a finished dataset version")[0] if dataset else find_dataset(card)
        answers, answer = evaluate_answer_quality(model, tokenizer, card, run_dir / ADAPTER, spec, answer, index_dir, retrieval, dataset_dir,
                                                  previous_release(publish, exclude_run=run_dir.name) if publish else None)
    ok, reason = gate(loss, spec, retrieval, answers)
    res = EvalReport(run=run_dir.name, status="passed" if ok else "failed", reason=reason, eval_loss=loss,
                     perplexity=math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"), label_tokens=n,
                     template=template.name, probes=probes, seconds=round(time.monotonic() - t0, 2), retrieval=retrieval,
                     answer=answer, answers=answers, index=index_hash, index_name=index_dir.name if index_dir else None)
    out = run_dir / EVAL
    _store.reopen(out)
    _store.write_model(out / EVAL_REPORT_FILE, res)
    _store.atomic_write_text(out / REPORT_MD, report_markdown(res))
    inputs = {"adapter": _store.read_manifest(run_dir / ADAPTER).content_hash, **({"index": index_hash} if index_hash else {})}
    counts = {"eval_loss": loss, "label_tokens": n, "status": res.status,
              **({"recall_at_1": retrieval.recall_at_1, "recall_at_5": retrieval.recall_at_5, "mrr": retrieval.mrr} if retrieval else {}),
              **(answers.metrics.gated() if answers else {})}
    _store.write_manifest(out, stage="eval", inputs=inputs, lineage=card.lineage, config=spec.model_dump(mode="json"),
                          counts=counts, timings={"eval": res.seconds})
    log.info("eval %s: loss %.4f, perplexity %.2f (%s); report %s", res.status, loss, res.perplexity, reason, out / REPORT_MD)
    return res


def eval_output(run_dir: Path) -> EvalOutput:
    """The eval stage's output for a run folder that has an eval report."""
    out = Path(run_dir).resolve() / EVAL
    m = _store.read_manifest(out)
    if m is None:
        raise FileNotFoundError(f"{out}: no finished eval; run `culbot eval --run {run_dir}` first")
    res = _store.read_model(out / EVAL_REPORT_FILE, EvalReport)
    return EvalOutput(path=out, content_hash=m.content_hash, stage="eval", counts=m.counts, passed=res.passed,
                      reason=res.reason, eval_loss=res.eval_loss)


def release_key(publish: PublishConfig, run: str) -> str | None:
    """The baseline release of ``run`` (the last one of another run): a new release is a new baseline, while
    publishing this run itself changes nothing (a rerun stays cached)."""
    prev = previous_release(publish, exclude_run=run) if registry_path(publish).is_file() else None
    return f"{prev.run}@{prev.at}" if prev else None


def cache_key(spec: EvalConfig, run: RunRef, publish: PublishConfig | None = None) -> dict:
    """What the inputs do not show: the content of the hand-written question file (editing it reruns eval) and the
    baseline release (a new release reruns it)."""
    p = spec.retrieval_questions
    return {"questions": _store.sha256_file(Path(p)) if p is not None and Path(p).is_file() else None,
            "baseline": release_key(publish, run.run_dir.name) if publish else None}


STAGE = Stage(name="eval", module=__name__, profile="train", section="eval", key=cache_key)


@stage_task(STAGE)
def eval_task(spec: EvalConfig, run: RunRef, index: StageRef | None = None, *, answer: AnswerConfig | None = None,
              dataset: StageRef | None = None, publish: PublishConfig | None = None) -> EvalOutput:
    """The answer-quality eval of a run against the last release (``publish``'s registry)."""
    from prefect.artifacts import create_markdown_artifact

    res = run_eval(run.run_dir, spec, index, answer=answer, dataset=dataset, publish=publish)
    create_markdown_artifact((run.run_dir / EVAL / REPORT_MD).read_text(encoding="utf-8"), key="eval-report", description="Eval report")
    table("eval-metrics", f"Eval of {run.run_dir.name}: {res.status}", metrics_table(res, spec))
    return eval_output(run.run_dir)
