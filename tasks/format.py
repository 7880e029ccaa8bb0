"""Format a dataset version into prompt/response pairs with named templates.

Run as: culbot format --dataset artifacts/datasets/<version> --out artifacts/formatted

Each row is rendered with the template of its source (templates.py), and the full text of
every template used is saved with the data as templates.json, so tokenize, train, eval and
serving all read the same templates.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any


from culbot.pipeline_config.schema import FormatConfig, RagConfig

from . import _store
from ._prefect import stage_task
from .contracts import Stage, TEMPLATES_FILE, ContextFormat, StageOutput, StageRef, TemplateSet, short_hash
from .templates import RENDERER_VERSION, load_template, render_context, render_prompt

log = logging.getLogger("culbot.format")

COLUMNS = ("id", "source", "template", "instruction", "input", "messages", "prompt", "response")


def template_set(fmt: FormatConfig) -> TemplateSet:
    names = sorted({*fmt.template_map.values(), fmt.default_template})
    return TemplateSet(map=dict(fmt.template_map), default=fmt.default_template, templates={n: load_template(n) for n in names})


def format_rows(rows: list[dict], templates: TemplateSet, tokenizer: Any = None) -> list[dict]:
    """Each row with its rendered prompt and response, and what renders it again with another template: instruction and
    input, or the conversation (``messages``, JSON) of a multi-turn row, which tokenize renders (as it does a chat
    template's prompt, here only when format.chat_tokenizer is set)."""
    out = []
    for r in rows:
        t = templates.for_source(r["source"])
        messages = r.get("messages") or ""
        rendered = (t.kind != "chat" or tokenizer is not None) and not messages
        out.append({"id": r["id"], "source": r["source"], "template": t.name, "instruction": r["instruction"], "input": r["input"],
                    "messages": messages, "prompt": render_prompt(t, r["instruction"], r["input"], tokenizer) if rendered else "",
                    "response": r["output"]})
    return out


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def count_templates(splits: dict[str, list[dict]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rows in splits.values():
        for r in rows:
            out[r["template"]] = out.get(r["template"], 0) + 1
    return out


share_of = _store.stable_share   # the same rows go without context on every rebuild


def with_context(rows: list[dict], index: Path | StageRef, rag: RagConfig, fmt: ContextFormat) -> int:
    """Put retrieved context in `input` of the rows that have a gold passage; returns how many got one."""
    from .retrieval import Retriever

    folder = Path(index.path if isinstance(index, StageRef) else index)
    retriever = Retriever(folder, rag)
    gold = {g["row"]: g["passage"] for g in _store.read_jsonl(folder / "gold.jsonl")}
    n = 0
    for r in rows:
        pid = gold.get(r["id"])
        if r["source"] not in fmt.sources or pid is None or share_of(r["id"]) < fmt.no_context_share:
            continue
        distractors = [h.passage_id for h in retriever.search(r["instruction"], k=fmt.k + 2).hits if h.passage_id != pid][: fmt.k - 1]
        chosen = [pid, *distractors]
        random.Random(r["id"]).shuffle(chosen)   # the gold passage is not always first, in training as in serving
        context = render_context([(retriever.by_id[p].title, retriever.by_id[p].text) for p in chosen], fmt)
        r["input"] = f"{context}\n\n{r['input']}" if r["input"] else context
        n += 1
    return n


def run_format(dataset_dir: Path | StageRef, fmt: FormatConfig, out_root: Path | None = None, *, rag: RagConfig | None = None,
               index: Path | StageRef | None = None) -> StageOutput:
    t0 = time.monotonic()
    out_root = Path(out_root or fmt.out_root)
    dataset_dir, dataset = _store.read_input(dataset_dir, "format input is not a finished dataset version")
    templates = template_set(fmt)
    context_inputs = {}
    if index is not None and rag is not None and rag.train_with_context:
        index_dir, im = _store.read_input(index, "format input is not a finished index")
        templates = templates.model_copy(update={"context": ContextFormat(k=rag.context_k, no_context_share=rag.no_context_share,
                                                                          sources=list(rag.context_sources))})
        context_inputs = {"index": im.content_hash, "retrieval": rag.model_dump(mode="json", include={"weights", "rrf_k", "fusion", "synonyms", "question_keys"})}
    tokenizer = _load_tokenizer(fmt.chat_tokenizer) if any(t.kind == "chat" for t in templates.templates.values()) else None
    splits = {s: _store.read_table(dataset_dir / f"{s}.parquet") for s in ("train", "validation")}
    with_ctx = {s: with_context(rows, index_dir, rag, templates.context) if templates.context else 0 for s, rows in splits.items()}
    splits = {s: format_rows(rows, templates, tokenizer) for s, rows in splits.items()}
    version = _store.hash_json({"dataset": dataset.content_hash, "templates": templates.model_dump(mode="json"), "renderer": RENDERER_VERSION,
                                "chat_tokenizer": fmt.chat_tokenizer, **context_inputs})
    final = out_root / short_hash(version)
    if _store.is_complete(final):
        return StageOutput.of(final, _store.read_manifest(final))
    counts = {**{s: len(rows) for s, rows in splits.items()}, "by_template": count_templates(splits),
              **({"with_context": with_ctx} if templates.context else {})}
    staging = _store.new_staging_dir(out_root, short_hash(version))
    for s, rows in splits.items():
        _store.write_text_table(staging / f"{s}.parquet", rows, COLUMNS)
    _store.write_model(staging / TEMPLATES_FILE, templates)
    inputs = {"dataset": dataset.content_hash, **({"index": context_inputs["index"]} if context_inputs else {})}
    m = _store.write_manifest(staging, stage="format", inputs=inputs, lineage=dataset.lineage.then(dataset=dataset.content_hash),
                              config={**fmt.model_dump(mode="json"), "context": templates.context.model_dump() if templates.context else None},
                              counts=counts, timings={"format": time.monotonic() - t0}, content_hash=version)
    _store.promote(staging, final)
    log.info("formatted %s -> %s: %s", dataset_dir.name, final, counts)
    return StageOutput.of(final, m)


STAGE = Stage(name="format", module=__name__, profile="data", section="format")


@stage_task(STAGE)
def format_task(fmt: FormatConfig, dataset: StageRef, rag: RagConfig | None = None, index: StageRef | None = None) -> StageOutput:
    return run_format(dataset, fmt, rag=rag, index=index)
