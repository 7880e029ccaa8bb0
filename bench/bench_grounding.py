"""Grounding check quality on a labelled set: precision and recall of flagging unsupported answers.

Run as: python bench/bench_grounding.py [--set tests/data/grounding_labelled.jsonl] [--out bench/results/grounding.json]

The set holds grounded and ungrounded Korean answers to the shipped CBNU sample pages, each with its
kind (paraphrase, changed number, negation, invented, changed word, ...). Each answer is checked
against its page as the pipeline checks a generated item against its chunk. "Before" is the
character-pair overlap alone (the old check); "after" is the layered check (facts, negation, overlap).
The optional LLM judge is not measured here: it needs a real model.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402


def evaluate(rows: list[dict], pages: dict[str, str], min_overlap: float) -> dict:
    from culbot.tasks import _text, grounding

    out = {}
    for name, flag in (("before: overlap only", lambda a, s: _text.grounding_score(a, s) < min_overlap),
                       ("after: facts + negation + overlap", lambda a, s: grounding.check(a, s, min_overlap)[1] is not None)):
        tp = fp = fn = tn = 0
        missed: collections.Counter = collections.Counter()
        false_alarms = []
        for r in rows:
            flagged = flag(r["answer"], pages[r["page"]])
            if not r["grounded"]:
                tp += flagged
                fn += not flagged
                missed[r["kind"]] += not flagged
            else:
                fp += flagged
                tn += not flagged
                if flagged:
                    false_alarms.append(r["answer"])
        out[name] = {"flagged_ungrounded": tp, "missed_ungrounded": fn, "false_alarms": fp, "passed_grounded": tn,
                     "precision": round(tp / (tp + fp), 3) if tp + fp else None, "recall": round(tp / (tp + fn), 3) if tp + fn else None,
                     "missed_by_kind": dict(sorted((k, v) for k, v in missed.items() if v)), "false_alarm_answers": false_alarms}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", type=Path, default=REPO / "tests" / "data" / "grounding_labelled.jsonl")
    ap.add_argument("--min-overlap", type=float, default=0.35, help="qa.min_grounding")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "grounding.json")
    args = ap.parse_args(argv)
    from culbot.tasks import _store
    from culbot.tasks.documents import read_directory

    rows = _store.read_jsonl(args.set)
    pages = {p["url"].removeprefix("file:"): f"[{p['title']}]\n{p['text']}" for p in read_directory(REPO / "raw" / "samples" / "cbnu_pages")[0]}
    res = {"grounded": sum(r["grounded"] for r in rows), "ungrounded": sum(not r["grounded"] for r in rows), **evaluate(rows, pages, args.min_overlap)}
    print(f"grounding check on {args.set.name}: {res['grounded']} grounded, {res['ungrounded']} ungrounded answers")
    print("\n| check | precision | recall | flagged / ungrounded | false alarms / grounded |\n|---|---:|---:|---:|---:|")
    for name in list(res)[2:]:
        r = res[name]
        print(f"| {name} | {r['precision']} | {r['recall']} | {r['flagged_ungrounded']} / {res['ungrounded']} | {r['false_alarms']} / {res['grounded']} |")
    for name in list(res)[2:]:
        print(f"\n{name}: missed by kind {res[name]['missed_by_kind']}; false alarms {res[name]['false_alarm_answers']}")
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
