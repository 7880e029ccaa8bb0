"""Merge univ100, CBNU QA and the extra datasets' rows (KULLM-v2, ...) into one dataset version: dedup, split, version.

Run as: culbot merge-data --univ100 raw/univ100 --cbnu-qa raw/cbnu_qa --source kullm=raw/datasets/kullm --out artifacts/datasets

A version is addressed by the content hash of its rows:
artifacts/datasets/<short hash>/{train,validation}.parquet, stats.json, dropped.jsonl
and manifest.json (written last). The same inputs give the same version.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any


from culbot.pipeline_config.schema import MergeDataConfig

from . import _store, _text
from ._prefect import report, stage_task
from .contracts import Stage, StageOutput, StageRef, short_hash
from .conversations import as_row, check_messages, dedup_text

log = logging.getLogger("culbot.merge")

COLUMNS = ("id", "source", "instruction", "input", "output", "messages")


def normalize_row(row: dict[str, Any], source: str) -> tuple[dict | None, str | None]:
    """One schema {id, source, instruction, input, output, messages}; NFC and whitespace normalised. ``messages`` is the
    conversation (JSON) of a multi-turn or plain-text row (tasks/conversations.py), "" for a single-turn one."""
    if row.get("messages"):
        msgs, reason = check_messages(row["messages"])
        if msgs is None:
            return None, f"broken_row: {reason}"
        fields = {k: v for k, v in as_row(msgs).items() if k != "messages"}
        messages = json.dumps(msgs, ensure_ascii=False)
    else:
        fields, reason = _text.instruction_fields(row)
        if fields is None:
            return None, reason if reason.startswith("empty_") else f"broken_row: {reason}"
        messages = ""
    out = {"id": str(row.get("id") or ""), "source": source, **fields, "messages": messages}
    if not out["id"]:
        out["id"] = f"{source}:{short_hash(_store.hash_json([out['instruction'], out['input'], out['output'], messages]))}"
    return out, None


def dedup_key(row: dict) -> str:
    return _text.one_line(dedup_text({**row, "messages": json.loads(row["messages"]) if row["messages"] else None})).lower()


def merge_sources(sources: dict[str, list[dict]], priority: list[str]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Rows in priority order with exact duplicates on (instruction, input) removed."""
    order = [s for s in priority if s in sources] + sorted(s for s in sources if s not in priority)
    kept: dict[str, dict] = {}
    dropped: list[dict] = []
    reasons: dict[str, int] = {}
    for source in order:
        for row in sources[source]:
            clean, reason = normalize_row(row, source)
            if clean is not None:
                k = dedup_key(clean)
                if k in kept:
                    clean, reason = None, f"duplicate_of_{kept[k]['source']}"
                    dropped.append({"reason": reason, "duplicate_of": kept[k]["id"], "row": row})
                else:
                    kept[k] = clean
            else:
                dropped.append({"reason": reason, "row": row})
            if reason:
                r = reason.split(":")[0]
                reasons[r] = reasons.get(r, 0) + 1
    return list(kept.values()), dropped, reasons


def split_rows(rows: list[dict], *, seed: int, fraction: float | None, size: int | None) -> tuple[list[dict], list[dict]]:
    """Validation split stratified by source, deterministic by seed and independent of row order."""
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    total = len(rows)
    quota: dict[str, int] = {}
    if size:
        size = min(size, total)
        exact = {s: size * len(rs) / total for s, rs in by_source.items()}
        quota = {s: int(v) for s, v in exact.items()}
        for s in sorted(exact, key=lambda s: (-(exact[s] - quota[s]), s))[: size - sum(quota.values())]:
            quota[s] += 1  # largest remainder
    else:
        for s, rs in by_source.items():
            q = round(len(rs) * (fraction or 0))
            quota[s] = 1 if q == 0 and fraction and len(rs) >= 2 else q
    train, val = [], []
    for s in sorted(by_source):
        ranked = sorted(by_source[s], key=lambda r: _store.sha256_text(f"{seed}:{r['id']}"))
        val_ids = {r["id"] for r in ranked[: quota[s]]}
        for r in by_source[s]:
            (val if r["id"] in val_ids else train).append(r)
    key = lambda r: (r["source"], r["id"])
    return sorted(train, key=key), sorted(val, key=key)


def dataset_stats(train: list[dict], val: list[dict], drops: dict[str, int], inputs: dict[str, int]) -> dict:
    def per_source(rows):
        out: dict[str, int] = {}
        for r in rows:
            out[r["source"]] = out.get(r["source"], 0) + 1
        return dict(sorted(out.items()))

    def lengths(rows, key):
        if not rows:
            return {}
        ls = sorted(len(r[key]) for r in rows)
        return {"min": ls[0], "median": ls[len(ls) // 2], "max": ls[-1]}

    rows = train + val
    return {
        "rows_in": inputs,
        "train": len(train), "validation": len(val),
        "train_by_source": per_source(train), "validation_by_source": per_source(val),
        "dropped": dict(sorted(drops.items())),
        "with_input": sum(1 for r in rows if r["input"]),
        "conversations": sum(1 for r in rows if r["messages"]),
        "output_chars": lengths(rows, "output"), "instruction_chars": lengths(rows, "instruction"),
    }


def stats_markdown(version: str, stats: dict) -> str:
    """The Prefect report of a dataset version."""
    lines = [f"# Dataset version `{short_hash(version)}`", "", f"train **{stats['train']}**, validation **{stats['validation']}**, rows with input {stats['with_input']}", "",
             "| source | rows in | train | validation |", "|---|---:|---:|---:|"]
    for s in sorted(stats["rows_in"]):
        lines.append(f"| {s} | {stats['rows_in'][s]} | {stats['train_by_source'].get(s, 0)} | {stats['validation_by_source'].get(s, 0)} |")
    if stats["dropped"]:
        lines += ["", "| dropped because | rows |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in stats["dropped"].items()]
    if stats["output_chars"]:
        o = stats["output_chars"]
        lines += ["", f"output length in characters: min {o['min']}, median {o['median']}, max {o['max']}"]
    return "\n".join(lines) + "\n"


def run_merge(inputs: dict[str, Path | StageRef], merge_data: MergeDataConfig, out_root: Path | None = None) -> StageOutput:
    """Merge the rows.jsonl of each input folder (source name -> folder) into a dataset version."""
    t0 = time.monotonic()
    out_root = Path(out_root or merge_data.out_root)
    sources, input_hashes = {}, {}
    for name, source in inputs.items():
        folder, m = _store.read_input(source, f"merge-data input {name!r} is not a finished stage output")
        sources[name] = _store.read_jsonl(folder / "rows.jsonl")
        input_hashes[name] = m.content_hash
    rows, dropped, drops = merge_sources(sources, merge_data.source_priority)
    train, val = split_rows(rows, seed=merge_data.seed, fraction=merge_data.validation_fraction, size=merge_data.validation_size)
    version = _store.hash_json({"train": train, "validation": val})
    final = out_root / short_hash(version)
    stats = dataset_stats(train, val, drops, {k: len(v) for k, v in sources.items()})
    if _store.is_complete(final):
        log.info("dataset version %s already exists; reusing it", short_hash(version))
        return StageOutput.of(final, _store.read_manifest(final))
    staging = _store.new_staging_dir(out_root, short_hash(version))
    _store.write_text_table(staging / "train.parquet", train, COLUMNS)
    _store.write_text_table(staging / "validation.parquet", val, COLUMNS)
    _store.atomic_write_json(staging / "stats.json", stats)
    _store.atomic_write_jsonl(staging / "dropped.jsonl", dropped)
    m = _store.write_manifest(staging, stage="merge-data", inputs=input_hashes, config=merge_data.model_dump(mode="json"),
                              counts=stats, timings={"merge-data": time.monotonic() - t0}, content_hash=version)
    _store.promote(staging, final)
    _store.atomic_write_text(out_root / "LATEST", short_hash(version) + "\n")
    history = _store.read_jsonl(out_root / "versions.jsonl")
    history.append({"content_hash": version, "folder": short_hash(version), "created_at": m.created_at, "train": len(train),
                    "validation": len(val), "inputs": input_hashes})
    _store.atomic_write_jsonl(out_root / "versions.jsonl", history)
    log.info("dataset version %s: train %d, validation %d, dropped %s", short_hash(version), len(train), len(val), drops)
    return StageOutput.of(final, m)


STAGE = Stage(name="merge-data", module=__name__, profile="data", section="merge_data")


@stage_task(STAGE)
def merge_data_task(merge_data: MergeDataConfig, inputs: dict[str, StageRef]) -> StageOutput:
    """``inputs``: source name -> its stage folder; the content hashes make the cache key."""
    from prefect.artifacts import create_markdown_artifact

    out = run_merge(inputs, merge_data)
    create_markdown_artifact(stats_markdown(out.content_hash, out.counts), key="dataset-stats", description="Dataset version stats")
    report("merge-data", f"dataset version {short_hash(out.content_hash)}: counts", out.counts)
    return out
