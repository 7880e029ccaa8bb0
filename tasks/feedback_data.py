"""Turn students' reviewed feedback into training data: corrections as rows, ratings as preference pairs, and a report of what students ask that Culbot cannot answer.

Run as: culbot feedback data [--out raw/feedback]     (the store: feedback.store, or $CULBOT_FEEDBACK_DB)

Only approved feedback (`culbot feedback approve`) becomes data:
- ``rows.jsonl``: each approved correction as a row of source ``feedback``: the student's question as the instruction,
  the passages the answer was given (exactly as served) as the input, the correction as the output. merge-data
  dedups them against every other source, and a reviewed correction wins a duplicate (``merge_data.source_priority``).
- ``pairs.jsonl``: {prompt, chosen, rejected}: the exact served prompt; "chosen" is a correction of that prompt's answer
  or an answer voted up, "rejected" an answer voted down. What preference training (DPO) reads.
- ``unanswered.md`` and ``unanswered.json``: refused questions and those voted down, grouped by topic (their commonest
  Kiwi noun), with counts and examples: a list a university office can act on. Also a Prefect artifact.

The folder is rewritten in place, manifest last; its cache key is a hash of the store's approved items and reported
questions, so a new approval rebuilds it and nothing else does.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

from culbot.pipeline_config.schema import FeedbackConfig

from . import _store, _text
from ._prefect import stage_task
from .contracts import Stage, StageOutput
from .feedback_store import FeedbackStore

log = logging.getLogger("culbot.feedback_data")

ROWS, PAIRS, REPORT_MD, REPORT_JSON = "rows.jsonl", "pairs.jsonl", "unanswered.md", "unanswered.json"


def correction_rows(items: list[dict]) -> list[dict]:
    """One row per answered question with an approved correction (the newest correction of an answer wins)."""
    newest: dict[str, dict] = {}
    for i in sorted(items, key=lambda i: i["id"]):
        if i["correction"]:
            newest[i["answer_id"]] = i
    top_url = lambda i: next((s.get("url") for s in i["sources"] if s.get("url")), "")   # noqa: E731
    return [{"id": f"feedback:{i['id']}", "source": "feedback", "instruction": i["question"], "input": i["context"],
             "output": i["correction"], "url": top_url(i), "feedback_id": i["id"]} for i in newest.values()]


def preference_pairs(items: list[dict]) -> list[dict]:
    """{prompt, chosen, rejected} for every served prompt that has a better answer (a correction, or an answer voted up)
    and a worse one (an answer voted down); a correction of an answer voted down pairs the two directly."""
    by_prompt: dict[str, dict] = defaultdict(lambda: {"chosen": {}, "rejected": {}})
    for i in sorted(items, key=lambda i: i["id"]):
        slot = by_prompt[i["prompt"]]
        if i["correction"]:
            slot["chosen"][i["correction"]] = i["id"]
        elif i["rating"] == "up":
            slot["chosen"][i["answer"]] = i["id"]
        if i["rating"] == "down":
            slot["rejected"][i["answer"]] = i["id"]
    pairs = []
    for prompt, slot in by_prompt.items():
        for rejected, rid in slot["rejected"].items():
            for chosen, cid in slot["chosen"].items():
                if chosen.strip() != rejected.strip():
                    pairs.append({"id": f"feedback:{cid}:{rid}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                                  "feedback_ids": sorted({cid, rid})})
    return pairs


def unanswered_report(questions: list[dict], examples: int) -> list[dict]:
    """Questions grouped by topic: each under its noun (adjacent nouns joined, as 학생식당) that is commonest over all of
    them (so the groups gather), with
    how many were refused or voted down, and the first examples."""
    from .retrieval import noun_phrases

    nouns = noun_phrases([q["question"] for q in questions])
    counts = Counter(n for ns in nouns for n in set(ns))
    groups: dict[str, list[dict]] = defaultdict(list)
    for q, ns in zip(questions, nouns):
        groups[max(ns, key=lambda n: (counts[n], -ns.index(n))) if ns else "(기타)"].append(q)
    out = [{"topic": topic, "questions": len(qs), "refused": sum(q["refused"] for q in qs), "voted_down": sum(q["down"] for q in qs),
            "examples": list(dict.fromkeys(q["question"] for q in qs))[:examples]} for topic, qs in groups.items()]
    return sorted(out, key=lambda g: (-g["questions"], g["topic"]))


def report_markdown(groups: list[dict], since: str | None, until: str | None) -> str:
    lines = ["# 학생들이 묻지만 컬봇이 답하지 못한 질문 (what students ask that Culbot cannot answer)", "",
             f"Refused questions and answers voted down, {since or '?'} to {until or '?'} (UTC), grouped by topic.", "",
             "| topic | questions | refused | voted down | examples |", "|---|---:|---:|---:|---|"]
    for g in groups:
        shown = " / ".join(_text.table_cell(e, 200) for e in g["examples"])
        lines.append(f"| {g['topic']} | {g['questions']} | {g['refused']} | {g['voted_down']} | {shown} |")
    return "\n".join(lines) + "\n"


def run_feedback_data(feedback: FeedbackConfig, out_dir: Path | None = None) -> StageOutput:
    """Read approved feedback from the store; write rows, pairs, the unanswered report and the manifest."""
    t0 = time.monotonic()
    out_dir = _store.reopen(Path(out_dir or feedback.out_dir))
    store = FeedbackStore(feedback.url())
    approved = store.items(status="approved")
    rows, pairs = correction_rows(approved), preference_pairs(approved)
    unanswered = store.unanswered()
    groups = unanswered_report(unanswered, feedback.report_examples)
    dates = sorted(i["created_at"] for i in approved)
    since, until = (dates[0][:10], dates[-1][:10]) if dates else (None, None)
    _store.atomic_write_jsonl(out_dir / ROWS, rows)
    _store.atomic_write_jsonl(out_dir / PAIRS, pairs)
    _store.atomic_write_json(out_dir / REPORT_JSON, groups)
    _store.atomic_write_text(out_dir / REPORT_MD, report_markdown(groups, unanswered[0]["created_at"][:10] if unanswered else None,
                                                                  unanswered[-1]["created_at"][:10] if unanswered else None))
    counts = {"approved_items": len(approved), "rows": len(rows), "pairs": len(pairs), "unanswered_questions": len(unanswered),
              "unanswered_topics": len(groups), "first_feedback": since or "", "last_feedback": until or ""}
    m = _store.write_manifest(out_dir, stage="feedback-data", inputs={"store": store.state_key()}, config=feedback.model_dump(mode="json"),
                              counts=counts, timings={"feedback-data": time.monotonic() - t0})
    log.info("feedback: %d approved items -> %d rows, %d preference pairs; %d unanswered questions in %d topics (%s)",
             len(approved), len(rows), len(pairs), len(unanswered), len(groups), out_dir / REPORT_MD)
    return StageOutput.of(out_dir, m)


def mark_used(feedback: FeedbackConfig, made: StageOutput, dataset: StageOutput) -> None:
    """Record in the store which dataset version took each approved item (its rows and pairs)."""
    ids = {r["feedback_id"] for r in _store.read_jsonl(Path(made.path) / ROWS)}
    ids |= {i for p in _store.read_jsonl(Path(made.path) / PAIRS) for i in p["feedback_ids"]}
    if ids:
        FeedbackStore(feedback.url()).mark_used(sorted(ids), dataset.content_hash)


def cache_key(feedback: FeedbackConfig) -> str:
    """What the config does not show: the store's approved items and reported questions."""
    return FeedbackStore(feedback.url()).state_key()


STAGE = Stage(name="feedback-data", module=__name__, profile="data", section="feedback", key=cache_key)


@stage_task(STAGE)
def feedback_data_task(feedback: FeedbackConfig) -> StageOutput:
    from prefect.artifacts import create_markdown_artifact

    out = run_feedback_data(feedback)
    create_markdown_artifact((Path(out.path) / REPORT_MD).read_text(encoding="utf-8"), key="unanswered-questions",
                             description="What students ask that Culbot cannot answer: refused and voted-down questions by topic")
    return out
