"""Stage 6: tokenize a formatted dataset for training: EOS, label masking, cutoff.

Run as: culbot tokenize --data artifacts/formatted/<hash> --profile cpu-tiny [--out artifacts/tokenized]

Prompt and response are tokenized separately and concatenated, so the prompt's
tokens are exactly what inference sees when it tokenizes the prompt alone. EOS
is appended only when the sequence was not truncated (alpaca-lora). With
train_on_inputs=False the prompt's labels are -100. Over-length rows are
truncated or dropped as configured, and counted either way.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from . import _store

log = logging.getLogger("culbot.tokenize")

IGNORE = -100


class EosMismatch(ValueError):
    """The tokenizer's EOS id differs from the model config's (upstream hard-coded eos_token_id=2)."""


def check_eos(tokenizer, model_config) -> int:
    tok_eos, cfg_eos = tokenizer.eos_token_id, model_config.eos_token_id
    if tok_eos is None or tok_eos != cfg_eos:
        raise EosMismatch(f"tokenizer eos_token_id={tok_eos} but model config eos_token_id={cfg_eos}; "
                          "pin a model revision whose tokenizer and config agree")
    return tok_eos


def build_example(prompt_ids: list[int], response_ids: list[int], *, eos_id: int, cutoff_len: int,
                  train_on_inputs: bool, overlength: str) -> tuple[dict | None, str | None]:
    """One training example, or (None, reason) when it is dropped."""
    ids = prompt_ids + response_ids
    truncated = len(ids) + 1 > cutoff_len
    if truncated:
        if overlength == "drop":
            return None, "over_cutoff"
        if len(prompt_ids) >= cutoff_len and not train_on_inputs:
            return None, "prompt_fills_cutoff"   # no response token would be learned
        ids = ids[:cutoff_len]
    else:
        ids = ids + [eos_id]
    labels = list(ids)
    if not train_on_inputs:
        n = min(len(prompt_ids), len(ids))
        labels[:n] = [IGNORE] * n
    return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated}, None


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return _store.hash_json([text, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])


def tokenize_rows(rows: list[dict], tokenizer, *, eos_id: int, cutoff_len: int, train_on_inputs: bool,
                  overlength: str) -> tuple[list[dict], dict[str, int]]:
    """Batched fast-tokenizer calls over all prompts and responses, then per-row assembly."""
    # The Rust tokenizer directly: one parallel batch call each, ids only (no per-row Python conversion).
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is None:  # a slow (Python) tokenizer
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    prompts = encode([r["prompt"] for r in rows])
    responses = encode([r["response"] for r in rows])
    out, counts = [], {"rows": len(rows), "kept": 0, "truncated": 0, "over_cutoff": 0, "prompt_fills_cutoff": 0,
                       "tokens": 0, "label_tokens": 0}
    for r, p, a in zip(rows, prompts, responses):
        ex, reason = build_example(p, a, eos_id=eos_id, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, overlength=overlength)
        if ex is None:
            counts[reason] += 1
            continue
        counts["kept"] += 1
        counts["truncated"] += ex["truncated"]
        counts["tokens"] += ex["length"]
        counts["label_tokens"] += ex["length"] - (0 if train_on_inputs else min(len(p), ex["length"]))
        out.append({"id": r["id"], "source": r["source"], **ex})
    return out, counts


def run_tokenize(formatted_dir: Path, model: str, out_root: Path, *, cutoff_len: int, train_on_inputs: bool = False,
                 overlength: str = "truncate", revision: str | None = None) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("truncated", pa.bool_())])
    t0 = time.monotonic()
    formatted_dir, out_root = Path(formatted_dir), Path(out_root)
    problems = _store.verify(formatted_dir)
    if problems:
        raise RuntimeError(f"tokenize input is not a finished formatted dataset: {problems[0]}")
    fm = _store.read_manifest(formatted_dir)
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    eos = check_eos(tokenizer, AutoConfig.from_pretrained(model, revision=revision))
    settings = {"cutoff_len": cutoff_len, "train_on_inputs": train_on_inputs, "overlength": overlength}
    key = _store.hash_json({"formatted": fm["content_hash"], "tokenizer": tokenizer_hash(tokenizer), **settings})
    final = out_root / key[:16]
    if _store.is_complete(final):
        return _store.read_manifest(final) | {"path": str(final)}
    staging = _store.new_staging_dir(out_root, key[:16])
    counts = {}
    for split in ("train", "validation"):
        rows = pq.read_table(formatted_dir / f"{split}.parquet", columns=["id", "source", "prompt", "response"]).to_pylist()
        examples, counts[split] = tokenize_rows(rows, tokenizer, eos_id=eos, **settings)
        # pyarrow directly: 5x faster than datasets' per-example feature encoding; datasets reads it back as is.
        table = pa.Table.from_pydict({c: [e[c] for e in examples] for c in schema.names}, schema=schema)
        pq.write_table(table, staging / f"{split}.parquet")
    _store.write_manifest(staging, stage="tokenize", inputs={"formatted": fm["content_hash"], "formatted_path": str(formatted_dir), "model": model},
                          config=settings, counts=counts, timings={"tokenize": time.monotonic() - t0}, content_hash=key,
                          extra={"tokenizer_hash": tokenizer_hash(tokenizer), "eos_token_id": eos, "templates": fm.get("templates", {}),
                                 "dataset_version": fm.get("dataset_version")})
    _store.promote(staging, final)
    log.info("tokenized %s: %s", formatted_dir.name, counts)
    return _store.read_manifest(final) | {"path": str(final)}
