"""Tokenize a formatted dataset for training: special tokens, label masking, cutoff.

Run as: culbot tokenize --data artifacts/formatted/<hash> --train-profile cpu-tiny [--out artifacts/tokenized]

Each row's conversation is rendered with its template (or the profile's data.template) into
prompt and answer pieces, tokenized separately and concatenated, so a prompt's tokens are
exactly what inference sees when it encodes the prompt alone. The special tokens follow
tasks/special_tokens.py: the BOS the tokenizer adds, the EOS after alpaca-style answers (only
when not truncated, as alpaca-lora), a chat template's own end-of-turn token. With
train_on_inputs=False only answers are learned (every assistant turn of a multi-turn row).
Over-length rows are truncated or dropped as configured, and counted either way. The output
folder also holds the templates the run trains with and their special tokens.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path

from prefect import task

from culbot.pipeline_config.train_schema import DataSpec, TrainProfile

from . import _store
from ._prefect import stage_cache
from .contracts import TEMPLATES_FILE, BaseModelRef, SpecialTokens, StageOutput, StageRef, Template, TemplateSet, TokenCounts, short_hash
from .model_io import check_eos
from .conversations import COMPLETION
from .special_tokens import prefix_ids, special_tokens
from .templates import conversation, load_template, render_segments

log = logging.getLogger("culbot.tokenize")

IGNORE = -100
SETTINGS = {"cutoff_len", "train_on_inputs", "overlength"}  # the DataSpec fields that shape tokens (and template, in the key as text)
SPECIAL_TOKENS_FILE = "special_tokens.json"   # template name -> SpecialTokens


def build_from_pieces(pieces: list[tuple[list[int], bool]], *, cutoff_len: int, train_on_inputs: bool,
                      overlength: str) -> tuple[dict | None, str | None]:
    """One training example from (ids, learned) pieces in order, or (None, reason) when it is dropped.

    Over the cutoff it is cut (the end token, last, goes first: alpaca-lora's "EOS only when not truncated")
    or dropped; an example with no learned token left is dropped.

    The rule, one example at a time: :func:`tokenize_rows` applies it to a whole split on flat arrays, and the tests
    check that both give the same examples, drops and counts."""
    ids, labels = [], []
    for piece, learned in pieces:
        ids += piece
        labels += piece if (learned or train_on_inputs) else [IGNORE] * len(piece)
    truncated = len(ids) > cutoff_len
    if truncated:
        if overlength == "drop":
            return None, "over_cutoff"
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(x == IGNORE for x in labels):
            return None, "prompt_fills_cutoff"   # no response token would be learned
    return {"input_ids": ids, "labels": labels, "length": len(ids), "truncated": truncated}, None


def build_example(prompt_ids: list[int], response_ids: list[int], *, eos_id: int, cutoff_len: int,
                  train_on_inputs: bool, overlength: str) -> tuple[dict | None, str | None]:
    """A single-turn example: the prompt (masked unless train_on_inputs), then the response and the EOS (learned)."""
    return build_from_pieces([(prompt_ids, False), (response_ids + [eos_id], True)], cutoff_len=cutoff_len,
                             train_on_inputs=train_on_inputs, overlength=overlength)


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return _store.hash_json([text, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None])


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of many texts in one batched call, no special tokens added (those in the text are parsed as such)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)   # the Rust tokenizer: one parallel call, ids only
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    # encode_batch_fast computes no character offsets: the same ids, about 1.7x faster (bench/bench_prep.py)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def row_segments(r: dict, t: Template, tokenizer, reuse_prompt: bool) -> tuple[bool, list[tuple[str, bool]]]:
    """(plain text?, the row's (text, learned) pieces): the prompt format rendered when it is this template's, else the
    conversation rendered now (templates.render_segments)."""
    if not r["messages"]:
        if reuse_prompt and r["prompt"] and r["template"] == t.name and t.kind != "chat":
            return False, [(r["prompt"], False), (r["response"], True)]
        return False, render_segments(t, conversation(r["instruction"], r["input"], r["response"]), tokenizer)
    messages = json.loads(r["messages"])
    return messages[0]["role"] == COMPLETION, render_segments(t, messages, tokenizer)


def examples_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
                      ("labels", pa.list_(pa.int32())), ("length", pa.int32()), ("truncated", pa.bool_())])


def tokenize_rows(rows: list[dict], tokenizer, templates: TemplateSet, tokens: dict[str, SpecialTokens], *, cutoff_len: int,
                  train_on_inputs: bool, overlength: str, reuse_prompt: bool = True):
    """Each row rendered with its template into (text, learned) pieces, every piece of every row encoded in one
    batched call, then assembled: the BOS, the pieces, and after each answer of an alpaca-style template the EOS (a
    chat template's pieces already end with its end-of-turn token). ``reuse_prompt``: the rows' templates are the
    ones they were formatted with, so their rendered prompts are used as they are.

    Returns (an Arrow table of the kept examples, counts). Each example is what :func:`build_from_pieces` makes of its
    pieces (tests/test_tokenize_data.py checks it), but the Python loop only decides what is kept: ids, labels and
    cuts are made on flat numpy arrays, and the table from flat buffers and offsets (bench/bench_prep.py)."""
    import itertools

    import numpy as np
    import pyarrow as pa

    rendered, plain_bos = [], prefix_ids(tokenizer)
    for r in rows:
        t = templates.for_source(r["source"])
        rendered.append((t, *row_segments(r, t, tokenizer, reuse_prompt)))
    flat = encode_texts(tokenizer, [text for _, _, segs in rendered for text, _ in segs])
    counts = {"rows": len(rows), "kept": 0, "truncated": 0, "over_cutoff": 0, "prompt_fills_cutoff": 0, "tokens": 0, "label_tokens": 0}
    kept_ids, kept_sources, truncated = [], [], []
    pieces, piece_len, piece_learned, row_len = [], [], [], []   # the kept rows' pieces in order, not yet cut
    at = 0
    for r, (t, completion, segs) in zip(rows, rendered):
        tok = tokens[t.name]
        bos = plain_bos if completion else tok.bos
        # plain text ends with the EOS; an alpaca-style answer with the end token; a chat template's pieces carry theirs
        end = [tokenizer.eos_token_id] if completion else [tok.end_id] if t.kind != "chat" else []
        mine = [(bos, False)] if bos else []
        for _, learned in segs:
            ids = flat[at]
            at += 1
            mine.append((ids + end if learned else ids, learned or train_on_inputs))
        total = sum(len(x) for x, _ in mine)
        if total > cutoff_len:
            if overlength == "drop":
                counts["over_cutoff"] += 1
                continue
            n = 0   # where the first learned token is: at or past the cutoff, the example would teach nothing
            for x, learned in mine:
                if learned and x:
                    break
                n += len(x)
            if n >= cutoff_len:
                counts["prompt_fills_cutoff"] += 1
                continue
        kept_ids.append(r["id"])
        kept_sources.append(r["source"])
        truncated.append(total > cutoff_len)
        row_len.append(total)
        for x, learned in mine:
            pieces.append(x)
            piece_len.append(len(x))
            piece_learned.append(learned)
    full_len = np.asarray(row_len, dtype=np.int64)
    size = int(full_len.sum())
    ids_full = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=size)
    learned_full = np.repeat(np.asarray(piece_learned, dtype=bool), np.asarray(piece_len, dtype=np.int64))
    starts = np.concatenate([[0], np.cumsum(full_len)[:-1]]).astype(np.int64) if len(row_len) else np.zeros(0, np.int64)
    keep = (np.arange(size, dtype=np.int64) - np.repeat(starts, full_len)) < cutoff_len   # each row cut at the cutoff
    ids = ids_full[keep]
    labels = np.where(learned_full, ids_full, IGNORE).astype(np.int32)[keep]
    lengths = np.minimum(full_len, cutoff_len).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]:,} tokens in one split: more than a parquet list column (int32 offsets) holds; split the dataset")
    off = pa.array(offsets.astype(np.int32))
    table = pa.Table.from_arrays(
        [pa.array(kept_ids, pa.string()), pa.array(kept_sources, pa.string()), pa.ListArray.from_arrays(off, pa.array(ids)),
         pa.ListArray.from_arrays(off, pa.array(labels)), pa.array(lengths), pa.array(truncated, pa.bool_())], schema=examples_schema())
    counts.update(kept=len(kept_ids), truncated=int(sum(truncated)), tokens=int(lengths.sum()), label_tokens=int((labels != IGNORE).sum()))
    return table, counts


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector off while a split is tokenized: it makes about a million short-lived lists of ints, none
    in a cycle, and each collection walked the whole heap (14% of tokenize time at 80k rows, bench/bench_prep.py)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def count_sources(table) -> dict[str, int]:
    """Examples per source."""
    out: dict[str, int] = {}
    for src in table.column("source").to_pylist():
        out[src] = out.get(src, 0) + 1
    return dict(sorted(out.items()))


def training_templates(formatted: TemplateSet, data: DataSpec) -> TemplateSet:
    """The templates a run trains with: the formatted data's, or every source through ``data.template``."""
    if not data.template:
        return formatted
    return TemplateSet(map={}, default=data.template, templates={data.template: load_template(data.template)}, context=formatted.context)


def run_tokenize(formatted_dir: Path | StageRef, base: BaseModelRef, out_root: Path, data: DataSpec) -> StageOutput:
    """Tokenize both splits with the base model's tokenizer into <out_root>/<short hash>/."""
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.monotonic()
    out_root = Path(out_root)
    formatted_dir, formatted = _store.read_input(formatted_dir, "tokenize input is not a finished formatted dataset")
    templates = training_templates(_store.read_model(formatted_dir / TEMPLATES_FILE, TemplateSet), data)
    where = base.location(Path("."))
    tokenizer = AutoTokenizer.from_pretrained(where, revision=base.revision)
    model_config = AutoConfig.from_pretrained(where, revision=base.revision)
    if any(t.kind != "chat" for t in templates.templates.values()):
        check_eos(tokenizer, model_config)   # alpaca-style answers end with the EOS: tokenizer and model must agree on it
    tokens = {name: special_tokens(tokenizer, t, model_config.model_type) for name, t in templates.templates.items()}
    settings = data.model_dump(include=SETTINGS)
    tok_hash = tokenizer_hash(tokenizer)
    key = _store.hash_json({"formatted": formatted.content_hash, "tokenizer": tok_hash, "templates": templates.model_dump(mode="json"),
                            "special_tokens": {k: v.model_dump() for k, v in tokens.items()}, **settings})
    final = out_root / short_hash(key)
    if _store.is_complete(final):
        return StageOutput.of(final, _store.read_manifest(final))
    staging = _store.new_staging_dir(out_root, short_hash(key))
    counts = {}
    for split in ("train", "validation"):
        rows = pq.read_table(formatted_dir / f"{split}.parquet",
                             columns=["id", "source", "template", "instruction", "input", "messages", "prompt", "response"]).to_pylist()
        with gc_paused():
            examples, counts[split] = tokenize_rows(rows, tokenizer, templates, tokens, reuse_prompt=not data.template, **settings)
        counts[split]["by_source"] = count_sources(examples)
        pq.write_table(examples, staging / f"{split}.parquet")   # pyarrow directly; datasets reads it back as is
    _store.write_model(staging / TEMPLATES_FILE, templates)
    _store.atomic_write_json(staging / SPECIAL_TOKENS_FILE, {k: v.model_dump() for k, v in tokens.items()})
    m = _store.write_manifest(staging, stage="tokenize", inputs={"formatted": formatted.content_hash, "tokenizer": tok_hash},
                              lineage=formatted.lineage.then(formatted=formatted.content_hash),
                              config={**settings, "base": base.name, "template": data.template,
                                      "special_tokens": {k: v.model_dump() for k, v in tokens.items()}},
                              counts=TokenCounts(**counts).model_dump(), timings={"tokenize": time.monotonic() - t0}, content_hash=key)
    _store.promote(staging, final)
    log.info("tokenized %s: %s", formatted_dir.name, {s: c["kept"] for s, c in counts.items()})
    return StageOutput.of(final, m)


@task(name="tokenize", cache_policy=stage_cache(__name__), persist_result=True)
def tokenize_task(tp: TrainProfile, formatted: StageRef) -> StageOutput:
    """With the training profile's base model and data settings; refuses a profile that cannot fit before any download."""
    from .model_io import resolve_base
    from .plan import check_fits

    check_fits(tp)
    root = Path(tp.artifacts_root)
    base = resolve_base(tp.model, models_root=root / "models", samples_dir=tp.samples_dir)
    return run_tokenize(formatted, base, root / "tokenized", tp.data)
