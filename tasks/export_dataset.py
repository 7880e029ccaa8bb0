"""Export a dataset version for other trainers: alpaca or sharegpt JSONL that axolotl and LLaMA-Factory read as is.

Run as: culbot export-dataset --dataset artifacts/datasets/<version> --format sharegpt --out exports/culbot-sharegpt

Writes train.jsonl and validation.jsonl, LLaMA-Factory's dataset_info.json, and a README.md dataset
card (Hub metadata, sources, counts, the axolotl and LLaMA-Factory settings that read it).
alpaca: instruction, input, output, system and history ([[question, answer], ...]); sharegpt:
conversations of {from: system|human|gpt, value}, a system prompt as the first turn. Every row has
every column that dataset_info.json maps (an empty system is "", no history is []), because
LLaMA-Factory's converter reads each mapped column of every row. Completion rows (plain text) have no place in either format
and are counted as skipped. bench/check_exports.py runs LLaMA-Factory's own loader on an export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml

from . import _store
from .contracts import short_hash

FORMATS = ("alpaca", "sharegpt")


def _messages(row: dict) -> list[dict]:
    if row.get("messages"):
        return json.loads(row["messages"])
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def to_alpaca(row: dict) -> dict | None:
    """instruction, input, output, system and history on every row: LLaMA-Factory reads each column that
    dataset_info.json maps on every row (a column no row has was a KeyError while it loaded the data)."""
    if not row.get("messages"):
        return {"instruction": row["instruction"], "input": row["input"], "output": row["output"], "system": "", "history": [],
                "source": row["source"]}
    msgs = json.loads(row["messages"])
    if msgs[0]["role"] == "completion":
        return None
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    turns = [m["content"] for m in msgs if m["role"] != "system"]
    pairs = list(zip(turns[0::2], turns[1::2]))
    return {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "system": system, "history": [list(p) for p in pairs[:-1]],
            "source": row["source"]}


SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def to_sharegpt(row: dict) -> dict | None:
    """conversations of {from, value}, a system prompt as its first turn (from: system), where both LLaMA-Factory's
    sharegpt converter and axolotl's chat_template loader read it; no optional column."""
    msgs = _messages(row)
    if msgs[0]["role"] == "completion":
        return None
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in msgs], "source": row["source"]}


def dataset_info(name: str, fmt: str) -> dict:
    """LLaMA-Factory's data/dataset_info.json entries for the two files."""
    if fmt == "alpaca":
        spec = {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}}
    else:
        spec = {"formatting": "sharegpt", "columns": {"messages": "conversations"},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}}
    return {f"{name}_{split}": {"file_name": f"{split}.jsonl", **spec} for split in ("train", "validation")}


def card(name: str, fmt: str, version: str, counts: dict, stats: dict) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    front = DatasetCardData(language=["ko"], license="other", task_categories=["text-generation"], tags=["culbot", "cbnu", "korean", fmt],
                            pretty_name=name, configs=[{"config_name": "default", "data_files": [
                                {"split": "train", "path": "train.jsonl"}, {"split": "validation", "path": "validation.jsonl"}]}])
    axolotl = ({"path": ".", "type": "alpaca", "ds_type": "json", "data_files": ["train.jsonl"]} if fmt == "alpaca" else
               {"path": ".", "type": "chat_template", "ds_type": "json", "data_files": ["train.jsonl"], "field_messages": "conversations",
                "message_property_mappings": {"role": "from", "content": "value"},
                "roles": {"system": ["system"], "user": ["human"], "assistant": ["gpt"]}})
    rows = "\n".join(f"| {s} | {n} | {stats.get('validation_by_source', {}).get(s, 0)} |" for s, n in sorted(stats.get("train_by_source", {}).items()))
    body = f"""# {name}

Culbot dataset version `{short_hash(version)}` (content hash `{version}`), exported as {fmt} JSONL: Korean instruction data
for a Chungbuk National University (충북대학교) campus assistant, from KULLM-v2, QA generated from CBNU web pages,
univ100 student Q&A and any other datasets of the data profile. Every row keeps its `source`.

| source | train | validation |
|---|---:|---:|
{rows}

Exported: train {counts['train']}, validation {counts['validation']}; skipped {counts['skipped_completion']} plain-text (completion) rows,
which neither format holds.

## Train on it

axolotl:

```yaml
datasets:
{yaml.safe_dump([axolotl], allow_unicode=True, sort_keys=False).rstrip()}
```

LLaMA-Factory: copy `dataset_info.json`'s entries into `data/dataset_info.json` (or point `dataset_dir` here) and set
`dataset: {name}_train`.

## Limits

Part of the data was generated by a language model from university web pages and part is informal student advice;
answers can be outdated or wrong. The licences of the sources (KULLM-v2 and the others) apply to their rows.
"""
    return str(DatasetCard(f"---\n{front.to_yaml()}\n---\n\n{body}"))


def export_dataset(dataset_dir: Path, fmt: Literal["alpaca", "sharegpt"], out_dir: Path, name: str | None = None) -> dict:
    """Write the version's splits in ``fmt`` to ``out_dir`` (each file atomically, the card last); returns the counts."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    dataset_dir, m = _store.read_input(Path(dataset_dir), "export-dataset: not a finished dataset version (artifacts/datasets/<version>)")
    name = name or f"culbot_{short_hash(m.content_hash)}"
    convert = to_alpaca if fmt == "alpaca" else to_sharegpt
    out_dir = Path(out_dir)
    counts = {"train": 0, "validation": 0, "skipped_completion": 0}
    for split in ("train", "validation"):
        out = []
        for row in _store.read_table(dataset_dir / f"{split}.parquet"):
            r = convert(row)
            if r is None:
                counts["skipped_completion"] += 1
            else:
                out.append(r)
        _store.atomic_write_jsonl(out_dir / f"{split}.jsonl", out)
        counts[split] = len(out)
    _store.atomic_write_json(out_dir / "dataset_info.json", dataset_info(name, fmt))
    stats = _store.read_json(dataset_dir / "stats.json") if (dataset_dir / "stats.json").is_file() else {}
    _store.atomic_write_text(out_dir / "README.md", card(name, fmt, m.content_hash, counts, stats))
    return counts
