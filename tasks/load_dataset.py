"""Load the data profile's extra datasets (KULLM-v2 and any other) in the formats labs already have.

Run as: culbot load-dataset --name kullm [--data-profile sample]

Each entry of the data profile's `datasets:` list (like axolotl's `datasets:` and LLaMA-Factory's
dataset_info.json) names a Hub dataset at a revision or a local file (JSONL, JSON, Parquet, CSV),
its `type`, a field mapping and a sample size:
  alpaca      instruction, input, output (optional system, and history as [[question, answer], ...])
  sharegpt    conversations: [{from: human|gpt|system, value}], optional system
  messages    messages: [{role: user|assistant|system, content}] (OpenAI / HF chat format)
  completion  text, learned whole
Rows become Culbot's schema (instruction, input, output, and the conversation for multi-turn rows,
tasks/conversations.py). A row that cannot be read goes to quarantine.jsonl with the reason; a
dataset that yields no usable row fails the stage, naming the commonest reasons.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path

from culbot.pipeline_config.schema import DatasetEntry

from . import _store, _text
from ._prefect import report, retry_on_network, stage_task, time_window
from .contracts import Stage, StageOutput
from .conversations import as_row, check_messages

log = logging.getLogger("culbot.load_dataset")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


class NoUsableRows(ValueError):
    """Every row of a dataset was quarantined (wrong type or field mapping, most often)."""


def resolve_revision(hub_id: str, revision: str) -> str:
    """A branch or tag resolved to its commit sha, so the manifest records exactly what was loaded."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi

    return HfApi().dataset_info(hub_id, revision=revision).sha


def read_jsonl_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows, quarantine) of a JSON Lines file: a line that is not a JSON object is kept aside with its number."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"file": str(path), "line": n, "reason": f"not_json: {e.msg} at column {e.colno}", "raw": line[:2000]})
                continue
            if not isinstance(row, dict):
                bad.append({"file": str(path), "line": n, "reason": "not_an_object", "raw": line[:2000]})
                continue
            rows.append({**row, "__line__": n})
    return rows, bad


def load_raw(entry: DatasetEntry, revision: str | None = None) -> tuple[list[dict], list[dict], str]:
    """(rows, quarantine, where): the entry's rows as published, each with its line or index."""
    import datasets

    if entry.hub_id:
        rev = revision or entry.revision
        log.info("%s: loading %s@%s (%s) from the Hub", entry.name, entry.hub_id, rev, entry.split)
        ds = datasets.load_dataset(entry.hub_id, entry.subset, revision=rev, split=entry.split)
        return [{**r, "__line__": i} for i, r in enumerate(ds)], [], f"{entry.hub_id}@{rev}"
    path = Path(entry.file)
    label = f"datasets[{entry.name}].file"
    if not path.is_file():
        raise FileNotFoundError(f"{label}: {path} not found")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")):
        return (*read_jsonl_rows(path), str(path))
    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"{label}: {path}: unsupported type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise ValueError(f"{label}: {path}: cannot be read as {kind} ({type(e).__name__}: {e})") from None
    return [{**r, "__line__": i} for i, r in enumerate(ds)], [], str(path)


def sample(rows: list[dict], *, max_rows: int | None, fraction: float | None, seed: int) -> list[dict]:
    """A deterministic sample (by seed) of at most ``max_rows`` or ``fraction`` of the rows, in their order."""
    n = len(rows)
    keep = min(n, max_rows) if max_rows else (round(n * fraction) if fraction else n)
    if keep >= n:
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(n), keep))]


def _messages_of(row: dict, entry: DatasetEntry) -> tuple[list[dict] | None, str | None]:
    """The conversation of a sharegpt or messages row, roles mapped to system/user/assistant."""
    f = entry.field_map()
    turns = row.get(f["conversations" if entry.type == "sharegpt" else "messages"])
    if not isinstance(turns, list):
        return None, "conversation_missing"
    roles = {**(SHAREGPT_ROLES if entry.type == "sharegpt" else {r: r for r in ("system", "user", "assistant")}), **entry.roles}
    out = []
    system = row.get(f.get("system", "")) if f.get("system") else None
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for t in turns:
        if not isinstance(t, dict):
            return None, "message_not_text"
        role = t.get(f["role"])
        if role not in roles:
            return None, f"unknown_role: {role}"
        out.append({"role": roles[role], "content": t.get(f["content"])})
    return out, None


def convert_row(row: dict, entry: DatasetEntry, n: int) -> tuple[dict | None, str | None]:
    """One published row in Culbot's schema, or the reason it cannot be read."""
    f = entry.field_map()
    if entry.type == "alpaca":
        item = {k: row.get(f[k]) for k in ("instruction", "input", "output")}
        fields, reason = _text.instruction_fields(item)
        if fields is None:
            return None, reason
        system, history = row.get(f["system"]), row.get(f["history"])
        if system or history:   # LLaMA-Factory's alpaca: earlier turns and a system prompt make it a conversation
            if history is not None and not (isinstance(history, list) and all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history)):
                return None, "history_not_pairs"
            msgs = ([{"role": "system", "content": system}] if system else []) + \
                [m for q, a in (history or []) for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
            clean, reason = check_messages(msgs)
            out = as_row(clean) if clean else None
        else:
            out, reason = fields, None
    elif entry.type == "completion":
        text = row.get(f["text"])
        clean, reason = check_messages([{"role": "completion", "content": text}]) if isinstance(text, str) else (None, "text_missing_or_not_text")
        out = as_row(clean) if clean else None
    else:
        msgs, reason = _messages_of(row, entry)
        clean, reason = check_messages(msgs) if msgs else (None, reason)
        out = as_row(clean) if clean else None
    if out is None:
        return None, reason
    rid = row.get(f["id"])
    return {"id": f"{entry.name}:{rid if rid not in (None, '') else n}", "source": entry.name, **out}, None


def run_load_dataset(entry: DatasetEntry) -> StageOutput:
    out_dir = entry.folder()
    t0 = time.monotonic()
    _store.reopen(out_dir)
    sha = resolve_revision(entry.hub_id, entry.revision) if entry.hub_id else None
    loaded, quarantine, where = load_raw(entry, sha)
    quarantine = [{"stage": "load-dataset", "dataset": entry.name, **q} for q in quarantine]
    picked = sample(loaded, max_rows=entry.max_rows, fraction=entry.fraction, seed=entry.seed)
    rows = []
    for n, row in enumerate(picked):
        line = row.pop("__line__")
        clean, reason = convert_row(row, entry, n)
        if clean is None:
            quarantine.append({"stage": "load-dataset", "dataset": entry.name, "file": where, "line": line, "row": n, "reason": reason,
                               "item": row})
        else:
            rows.append(clean)
    quarantine.sort(key=lambda q: q["line"])   # in file order
    _store.atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    if not rows:
        reasons = Counter(q["reason"].split(":")[0] for q in quarantine).most_common(3)
        raise NoUsableRows(f"datasets[{entry.name}] ({where}, type {entry.type}): none of {len(picked)} rows could be read "
                           f"({', '.join(f'{r} ×{c}' for r, c in reasons) or 'the file is empty'}); check its type and fields. "
                           f"The rows are in {out_dir / 'quarantine.jsonl'}")
    _store.atomic_write_jsonl(out_dir / "rows.jsonl", rows)
    counts = {"loaded": len(loaded), "sampled": len(picked), "rows": len(rows), "with_input": sum(1 for r in rows if r["input"].strip()),
              "conversations": sum(1 for r in rows if r.get("messages")), "quarantined": len(quarantine)}
    log.info("%s: %s", entry.name, counts)
    if quarantine:
        log.warning("%s: %d row(s) kept aside in %s (first: %s line %s, %s)", entry.name, len(quarantine), out_dir / "quarantine.jsonl",
                    quarantine[0].get("file"), quarantine[0].get("line"), quarantine[0]["reason"])
    inputs = {"hub": f"{entry.hub_id}@{sha}"} if entry.hub_id else {"file": _store.sha256_file(Path(entry.file))}
    m = _store.write_manifest(out_dir, stage="load-dataset", inputs=inputs, config=entry.model_dump(mode="json"),
                              counts=counts, timings={"load": time.monotonic() - t0},
                              content_hash=_store.sha256_file(out_dir / "rows.jsonl"))
    return StageOutput.of(out_dir, m)


def cache_key(entry: DatasetEntry) -> str:
    """What the entry does not show: the file's sha256, a pinned Hub commit, or a branch re-read once a day."""
    if entry.file is not None:
        return _store.sha256_file(Path(entry.file))
    pinned = re.fullmatch(r"[0-9a-f]{40}", entry.revision or "") is not None
    return f"{entry.hub_id}@{entry.revision}" + ("" if pinned else "-" + time_window(24))


STAGE = Stage(name="load-dataset", module=__name__, profile="data", section="datasets", key=cache_key)


@stage_task(STAGE, task_run_name="load-dataset-{entry.name}", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_on_network)
def load_dataset_task(entry: DatasetEntry) -> StageOutput:
    """Network stage when loading from the Hub (network failures are retried)."""
    out = run_load_dataset(entry)
    report(f"load-dataset-{entry.name}", f"dataset {entry.name} ({entry.type}, {entry.hub_id or entry.file})", out.counts)
    return out
