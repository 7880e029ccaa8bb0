"""Format a dataset version into prompt/response pairs with named templates.

Run as: culbot format --dataset artifacts/datasets/<version> --out artifacts/formatted

Each row is rendered with the template of its source (templates.py), and the full text of
every template used is saved with the data as templates.json, so tokenize, train, eval and
serving all read the same templates.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import task

from culbot.pipeline_config.schema import FormatConfig

from . import _store
from ._prefect import stage_cache
from .contracts import TEMPLATES_FILE, StageOutput, StageRef, TemplateSet, short_hash
from .templates import load_template, render_prompt

log = logging.getLogger("culbot.format")

COLUMNS = ("id", "source", "template", "prompt", "response")


def template_set(fmt: FormatConfig) -> TemplateSet:
    names = sorted({*fmt.template_map.values(), fmt.default_template})
    return TemplateSet(map=dict(fmt.template_map), default=fmt.default_template, templates={n: load_template(n) for n in names})


def format_rows(rows: list[dict], templates: TemplateSet, tokenizer: Any = None) -> list[dict]:
    out = []
    for r in rows:
        t = templates.for_source(r["source"])
        out.append({"id": r["id"], "source": r["source"], "template": t.name,
                    "prompt": render_prompt(t, r["instruction"], r["input"], tokenizer), "response": r["output"]})
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


def run_format(dataset_dir: Path | StageRef, fmt: FormatConfig, out_root: Path | None = None) -> StageOutput:
    t0 = time.monotonic()
    out_root = Path(out_root or fmt.out_root)
    dataset_dir, dataset = _store.read_input(dataset_dir, "format input is not a finished dataset version")
    templates = template_set(fmt)
    tokenizer = _load_tokenizer(fmt.chat_tokenizer) if any(t.kind == "chat" for t in templates.templates.values()) else None
    splits = {s: format_rows(_store.read_table(dataset_dir / f"{s}.parquet"), templates, tokenizer) for s in ("train", "validation")}
    version = _store.hash_json({"dataset": dataset.content_hash, "templates": templates.model_dump(mode="json"),
                                "chat_tokenizer": fmt.chat_tokenizer})
    final = out_root / short_hash(version)
    if _store.is_complete(final):
        return StageOutput.of(final, _store.read_manifest(final))
    counts = {**{s: len(rows) for s, rows in splits.items()}, "by_template": count_templates(splits)}
    staging = _store.new_staging_dir(out_root, short_hash(version))
    for s, rows in splits.items():
        _store.write_text_table(staging / f"{s}.parquet", rows, COLUMNS)
    _store.write_model(staging / TEMPLATES_FILE, templates)
    m = _store.write_manifest(staging, stage="format", inputs={"dataset": dataset.content_hash}, lineage=dataset.lineage.then(dataset=dataset.content_hash),
                              config=fmt.model_dump(mode="json"), counts=counts, timings={"format": time.monotonic() - t0}, content_hash=version)
    _store.promote(staging, final)
    log.info("formatted %s -> %s: %s", dataset_dir.name, final, counts)
    return StageOutput.of(final, m)


@task(name="format", cache_policy=stage_cache(__name__), persist_result=True)
def format_task(fmt: FormatConfig, dataset: StageRef) -> StageOutput:
    return run_format(dataset, fmt)
