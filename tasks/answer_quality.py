"""Answer quality: generate answers with retrieval and score them; compare with the last published model.

Questions: validation rows of the dataset version (CBNU and univ100, with their reference answers) and the
hand-written set (eval.retrieval_questions; gold [] marks a question the documents cannot answer).

- fact recall: the share of the reference's checkable facts (numbers, dates, times, amounts, phone numbers,
  e-mails, URLs, codes: grounding.facts; and proper names: kiwipiepy NNP morphemes) found in the answer;
- chrF (sacrebleu) against the reference;
- groundedness: the share of generated answers that pass grounding.check against their retrieved passages;
- refusal rate on unanswerable questions, and false refusals on answerable ones.

The baseline is the last release in the registry (publish.py), else the base model without the adapter.
"""
from __future__ import annotations

import logging
import re
import statistics
from pathlib import Path

from culbot.pipeline_config.train_schema import EvalConfig

from . import _store, _text, grounding
from .answer import Answerer, Reply
from .contracts import LOWER_IS_BETTER, AnswerExample, AnswerMetrics, AnswerQuality, MetricChange, Release

log = logging.getLogger("culbot.answer_quality")

# An answer that says it does not know (the configured refusal, or the model's own words).
_REFUSAL = re.compile(r"찾지 못|모르|확인되지 않|알 수 없|답변드리기 어렵|정보가 없")


def select_questions(dataset_dir: Path | None, handwritten: list[dict], n: int) -> list[dict]:
    """About n questions: half from the validation split (CBNU and univ100 alternating, in a stable order), the rest
    hand-written (unanswerable ones first in their share, so the refusal rate is measured)."""
    if n <= 0:
        return []
    rows = _store.read_table(Path(dataset_dir) / "validation.parquet") if dataset_dir else []
    by_source: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: _store.stable_share(r["id"])):
        if r["source"] in ("cbnu", "univ100") and r["output"].strip():
            by_source.setdefault(r["source"], []).append(r)
    want_val = n - min(len(handwritten), n // 2)
    picked: list[dict] = []
    while len(picked) < want_val and any(by_source.values()):
        for src in sorted(by_source):
            if by_source[src] and len(picked) < want_val:
                r = by_source[src].pop(0)
                picked.append({"id": r["id"], "set": f"validation {src}", "question": r["instruction"], "reference": r["output"], "gold": ["?"]})
    rest = n - len(picked)
    no = [q for q in handwritten if not q.get("gold")]
    yes = [q for q in handwritten if q.get("gold")]
    hand = no[: max(rest // 3, 1)] if no else []
    hand += yes[: rest - len(hand)]
    return picked + [{"id": str(q["id"]), "set": f"hand-written {q.get('set', '')}".strip(), "question": q["question"],
                      "reference": q.get("answer", ""), "gold": q.get("gold", [])} for q in hand]


def reference_facts(text: str) -> set[str]:
    from .retrieval import _kiwi

    names = {"name:" + t.form for t in _kiwi().tokenize(text) if t.tag == "NNP" and len(t.form) > 1}
    return grounding.facts(text) | names


def fact_recall(reference: str, answer: str) -> float | None:
    ref = reference_facts(reference)
    if not ref:
        return None
    got = reference_facts(answer)
    return len(ref & got) / len(ref)


def is_refusal(reply: Reply) -> bool:
    return reply.refused or bool(_REFUSAL.search(reply.text))


def score(questions: list[dict], replies: list[Reply], min_overlap: float) -> tuple[AnswerMetrics, list[AnswerExample]]:
    from sacrebleu.metrics import CHRF

    examples, recalls, grounded, hyps, refs = [], [], [], [], []
    refusals_no, refusals_yes = [], []
    for q, r in zip(questions, replies):
        answerable = bool(q["gold"])
        refused = is_refusal(r)
        (refusals_yes if answerable else refusals_no).append(refused)
        said = "" if r.empty else r.text   # the empty-answer notice is not the model's answer
        fr = fact_recall(q["reference"], said) if answerable and q["reference"] else None
        if fr is not None:
            recalls.append(fr)
        if answerable and q["reference"]:
            hyps.append(said)
            refs.append(q["reference"])
        ok = None
        if not r.refused and r.sources:
            ok = not r.empty and grounding.check(r.text, r.context, min_overlap)[1] is None
            grounded.append(ok)
        examples.append(AnswerExample(id=q["id"], set=q["set"], question=q["question"], reference=q["reference"], answer=r.text,
                                      refused=refused, sources=[s.title for s in r.sources], grounded=ok,
                                      fact_recall=None if fr is None else round(fr, 3)))
    timed = [r for r in replies if not r.refused and not r.empty and r.seconds]
    tokens, seconds = sum(r.tokens for r in timed), sum(r.seconds or 0 for r in timed)

    def mean(xs: list) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    m = AnswerMetrics(questions=len(questions), answerable=len(refusals_yes), unanswerable=len(refusals_no),
                      fact_recall=mean(recalls), chrf=round(CHRF().corpus_score(hyps, [refs]).score, 2) if hyps else None,
                      groundedness=mean(grounded), refusal_rate=mean(refusals_no), false_refusal_rate=mean(refusals_yes),
                      first_token_s=round(statistics.median([r.first_token_s for r in timed if r.first_token_s is not None]), 4) if timed else None,
                      tokens_per_s=round(tokens / seconds, 1) if seconds else None)
    return m, examples


def answer_all(answerer: Answerer, questions: list[dict]) -> list[Reply]:
    out = []
    for n, q in enumerate(questions, 1):
        out.append(answerer.answer(q["question"]))
        if n % 10 == 0 or n == len(questions):
            log.info("answered %d/%d questions", n, len(questions))
    return out


def compare(current: AnswerMetrics, previous: AnswerMetrics | None, spec: EvalConfig) -> tuple[list[MetricChange], list[str]]:
    """Per-metric change against the baseline (regressed: worse by more than its margin), and the floors missed."""
    changes = []
    if previous is not None:
        prev = previous.gated()
        for k, v in current.gated().items():
            if k not in prev:
                continue
            delta = round(v - prev[k], 4)
            worse = delta if k in LOWER_IS_BETTER else -delta
            margin = spec.margins.get(k)
            changes.append(MetricChange(metric=k, previous=prev[k], current=v, delta=delta, margin=margin,
                                        regressed=margin is not None and worse > margin))
    missed = [f"{k} {getattr(current, k)} < floor {f}" for k, f in spec.floors.items()
              if getattr(current, k) is None or getattr(current, k) < f]
    return changes, missed


def evaluate_answers(answerer: Answerer, questions: list[dict], spec: EvalConfig, *, previous: Release | None,
                     base_answerer: Answerer | None) -> AnswerQuality:
    """Answer and score; the baseline is ``previous`` (a release) or, without one, ``base_answerer`` on the same questions."""
    metrics, examples = score(questions, answer_all(answerer, questions), spec.grounding_min_overlap)
    if previous is not None and previous.metrics is not None:
        baseline, base_metrics, base_answers = f"published {previous.run} ({previous.at})", previous.metrics, previous.answers
    elif base_answerer is not None:
        log.info("no published model yet: comparing with the base model on the same %d questions", len(questions))
        replies = answer_all(base_answerer, questions)
        base_metrics, _ = score(questions, replies, spec.grounding_min_overlap)
        baseline, base_answers = f"base model {answerer.card.base.name}", {q["id"]: r.text for q, r in zip(questions, replies)}
    else:
        baseline, base_metrics, base_answers = "none", None, {}
    changes, missed = compare(metrics, base_metrics, spec)
    return AnswerQuality(metrics=metrics, baseline=baseline, baseline_metrics=base_metrics, changes=changes, floors_missed=missed,
                         examples=examples, baseline_answers=base_answers)


def verdict(q: AnswerQuality, spec: EvalConfig) -> tuple[bool, str]:
    """(passes, what it says): regressions beyond margins and missed floors fail in 'enforce', are reported in 'report'."""
    problems = [f"{c.metric} {c.previous} -> {c.current} ({c.delta:+.4g}, margin {c.margin})" for c in q.changes if c.regressed]
    problems += q.floors_missed
    if not problems:
        return True, f"answer quality holds against {q.baseline}"
    text = f"answer quality regressed against {q.baseline}: " + "; ".join(problems)
    if spec.gate == "report":
        return True, text + " (eval.gate=report: reported, not enforced)"
    return False, text


def markdown(q: AnswerQuality, examples: int = 10) -> list[str]:
    names = ["fact_recall", "chrf", "groundedness", "refusal_rate", "false_refusal_rate"]
    changes = {c.metric: c for c in q.changes}
    prev = q.baseline_metrics
    lines = ["## Answer quality", "", f"{q.metrics.questions} questions ({q.metrics.answerable} answerable, {q.metrics.unanswerable} "
             f"unanswerable), compared with **{q.baseline}**.", "",
             "| metric | previous | this model | change | margin |", "|---|---:|---:|---:|---:|"]
    for k in names:
        cur = getattr(q.metrics, k)
        c = changes.get(k)
        p = getattr(prev, k) if prev else None
        flag = " ⚠ regressed" if c and c.regressed else ""
        lines.append(f"| {k} | {'—' if p is None else p} | {'—' if cur is None else cur} | "
                     f"{f'{c.delta:+.4g}{flag}' if c else '—'} | {c.margin if c and c.margin is not None else '—'} |")
    lines += ["", f"Latency: first token {q.metrics.first_token_s} s (median), {q.metrics.tokens_per_s} tokens/s.", ""]
    if q.floors_missed:
        lines += ["Floors missed: " + "; ".join(q.floors_missed), ""]
    lines += [f"### {min(examples, len(q.examples))} answers side by side", "",
              "| question | reference | previous | this model | sources |", "|---|---|---|---|---|"]
    for e in q.examples[:examples]:
        cell = _text.table_cell
        lines.append(f"| {cell(e.question, 60)} | {cell(e.reference)} | {cell(q.baseline_answers.get(e.id, '—'))} | "
                     f"{cell(e.answer)} | {cell(', '.join(e.sources[:3]), 60)} |")
    return lines + [""]
