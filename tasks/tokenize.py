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

A split is streamed in batches of rows (write_examples): each batch is encoded in one call into
the Rust tokenizer in a background thread while the batch before is assembled on flat arrays
and written, so memory stays flat and both the tokenizer's threads and Python stay busy.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from array import array
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path


from culbot.pipeline_config.train_schema import TokenizeConfig, TrainProfile

from . import _store
from ._prefect import stage_task
from .contracts import Stage, TEMPLATES_FILE, BaseModelRef, SpecialTokens, StageOutput, StageRef, Template, SplitCounts, TemplateSet, TokenCounts, short_hash
from .model_io import check_eos
from .conversations import COMPLETION
from .special_tokens import prefix_ids, special_tokens
from .templates import conversation, load_template, render_segments

log = logging.getLogger("culbot.tokenize")

IGNORE = -100
SETTINGS = {"cutoff_len", "train_on_inputs", "overlength"}  # the TokenizeConfig fields that shape tokens (and template, in the key as text)
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


# Token ids need no dictionary pages (they were a third of the write time); zstd at level 1 writes as fast as snappy
# and about a third of the size (bench/bench_prep.py)
PARQUET_OPTIONS = {"use_dictionary": False, "compression": "zstd", "compression_level": 1}
PROGRESS_EVERY_S = 10.0
BATCH_ROWS = 2048   # rows per encode call: one call over a whole split holds every Encoding at once (bench/bench_prep.py)


def encoder(tokenizer) -> Callable[[list[str]], list]:
    """Texts -> their encodings (anything with ``.ids``) or id lists, no special tokens added (those in a text are
    parsed as such). A fast tokenizer's is one call into Rust that runs on every core and releases the GIL."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if backend.truncation or backend.padding:   # set in some tokenizer.json files: every text is encoded whole, unpadded
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())   # a copy, so the caller's tokenizer is left as it is
        backend.no_truncation()
        backend.no_padding()
    # encode_batch_fast computes no character offsets: the same ids, about 1.7x faster
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: encode(texts, add_special_tokens=False)


def ids_of(encoded: list) -> Iterable[list[int]]:
    """The id lists of an :func:`encoder`'s result."""
    return encoded if not encoded or isinstance(encoded[0], list) else map(attrgetter("ids"), encoded)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of many texts, no special tokens added."""
    encode = encoder(tokenizer)
    return [ids for start in range(0, len(texts), 8192) for ids in ids_of(encode(texts[start:start + 8192]))]


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


@dataclass
class Rendered:
    """A batch of rows as the texts to encode, in order, and what goes around each text's ids."""

    rows: list[dict]
    texts: list[str] = field(default_factory=list)
    learned: list[bool] = field(default_factory=list)     # the text's tokens (and its end token) get labels
    before: list[list[int]] = field(default_factory=list)   # ids put before the text: the BOS, before a row's first text
    end: list[int] = field(default_factory=list)          # the id put after the text (an answer's end token), or -1
    texts_per_row: list[int] = field(default_factory=list)


def render_rows(rows: list[dict], tokenizer, templates: TemplateSet, tokens: dict[str, SpecialTokens], *,
                train_on_inputs: bool, reuse_prompt: bool = True, plain_bos: list[int] | None = None) -> Rendered:
    """Each row rendered with its template into (text, learned) pieces, with the special tokens around them: the BOS,
    and after each answer of an alpaca-style template the EOS (a chat template's pieces already end with its
    end-of-turn token). ``reuse_prompt``: the rows' templates are the ones they were formatted with, so their rendered
    prompts are used as they are. ``plain_bos``: :func:`prefix_ids` of the tokenizer, when the caller has it."""
    out, plain_bos = Rendered(rows), prefix_ids(tokenizer) if plain_bos is None else plain_bos
    for r in rows:
        t = templates.for_source(r["source"])
        completion, segs = row_segments(r, t, tokenizer, reuse_prompt)
        if not segs:
            raise ValueError(f"row {r['id']!r}: nothing to tokenize")
        tok = tokens[t.name]
        # plain text ends with the EOS; an alpaca-style answer with the end token; a chat template's pieces carry theirs
        end = tokenizer.eos_token_id if completion else tok.end_id if t.kind != "chat" else -1
        before = list(plain_bos if completion else tok.bos)
        for text, learned in segs:
            out.texts.append(text)
            out.learned.append(learned or train_on_inputs)
            out.before.append(before)
            out.end.append(end if learned else -1)
            before = []
        out.texts_per_row.append(len(segs))
    return out


def assemble(batch: Rendered, encoded: list, *, cutoff_len: int, overlength: str):
    """The examples of a rendered batch from its texts' encodings: (an Arrow table of the kept examples, counts).

    Each example is what :func:`build_from_pieces` makes of its pieces (tests/test_tokenize.py checks it), but
    the Python loop only copies each text's ids into one flat buffer: the cuts, drops and labels are made on flat
    numpy arrays, and the table from the buffer and offsets (bench/bench_prep.py)."""
    import numpy as np
    import pyarrow as pa

    flat, body_len = array("i"), array("q")   # every row's tokens in order: [BOS] text [end] text [end] ...
    extend, append, add_len = flat.fromlist, flat.append, body_len.append   # fromlist: ~30% faster than extend
    for ids, before, end in zip(ids_of(encoded), batch.before, batch.end):
        if before:
            extend(before)
        extend(ids)
        if end >= 0:
            append(end)
        add_len(len(ids) + (end >= 0))
    n, n_texts = len(batch.rows), len(batch.texts)
    if n == 0:
        return examples_schema().empty_table(), {k: v for k, v in zero_counts().items() if k != "by_source"}
    ids_full = np.frombuffer(flat, dtype=np.int32)
    body = np.frombuffer(body_len, dtype=np.int64)
    before_len = np.fromiter(map(len, batch.before), dtype=np.int64, count=n_texts)
    # each text's tokens: its BOS (never learned), then its ids and end token (learned with the text)
    flags = np.repeat(np.stack([np.zeros(n_texts, bool), np.asarray(batch.learned, bool)], axis=1).ravel(),
                      np.stack([before_len, body], axis=1).ravel())
    first_text = np.concatenate([[0], np.cumsum(batch.texts_per_row)[:-1]]).astype(np.int64)
    row_total = np.add.reduceat(before_len + body, first_text)
    row_start = np.concatenate([[0], np.cumsum(row_total)[:-1]]).astype(np.int64)
    learned_at = np.append(np.flatnonzero(flags), len(flags))
    # where, within its row, the first learned token is (past the row's end when it has none)
    first_learned = learned_at[np.searchsorted(learned_at, row_start)] - row_start
    over = row_total > cutoff_len
    over_cutoff = over if overlength == "drop" else np.zeros(n, bool)
    # cut at the cutoff, an example whose first learned token is at or past it would teach nothing
    fills = over & ~over_cutoff & (first_learned >= cutoff_len)
    kept = ~(over_cutoff | fills)
    keep_len = np.where(kept, np.minimum(row_total, cutoff_len), 0)
    keep = np.repeat(np.tile([True, False], n), np.stack([keep_len, row_total - keep_len], axis=1).ravel())
    ids = ids_full[keep]
    labels = np.where(flags[keep], ids, IGNORE).astype(np.int32)
    lengths = keep_len[kept].astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))   # a batch is far below 2**31 tokens
    kept_rows = [batch.rows[i] for i in np.flatnonzero(kept)]
    truncated = over[kept]
    table = pa.Table.from_arrays(
        [pa.array([r["id"] for r in kept_rows], pa.string()), pa.array([r["source"] for r in kept_rows], pa.string()),
         pa.ListArray.from_arrays(offsets, pa.array(ids)), pa.ListArray.from_arrays(offsets, pa.array(labels)),
         pa.array(lengths), pa.array(truncated, pa.bool_())], schema=examples_schema())
    counts = {"rows": n, "kept": len(kept_rows), "truncated": int(truncated.sum()), "over_cutoff": int(over_cutoff.sum()),
              "prompt_fills_cutoff": int(fills.sum()), "tokens": int(lengths.sum()), "label_tokens": int((labels != IGNORE).sum())}
    return table, counts


def tokenize_rows(rows: list[dict], tokenizer, templates: TemplateSet, tokens: dict[str, SpecialTokens], *, cutoff_len: int,
                  train_on_inputs: bool, overlength: str, reuse_prompt: bool = True):
    """One batch of rows: (an Arrow table of the kept examples, counts). See :func:`render_rows` and :func:`assemble`."""
    batch = render_rows(rows, tokenizer, templates, tokens, train_on_inputs=train_on_inputs, reuse_prompt=reuse_prompt)
    return assemble(batch, encode_texts(tokenizer, batch.texts), cutoff_len=cutoff_len, overlength=overlength)


def zero_counts() -> dict:
    """A split's counts before any row (SplitCounts' fields)."""
    return {k: {} if k == "by_source" else 0 for k in SplitCounts.model_fields}


def add_counts(total: dict, counts: dict) -> dict:
    for k, v in counts.items():
        total[k] = add_counts(total.get(k, {}), v) if isinstance(v, dict) else total.get(k, 0) + v
    return total


def write_examples(batches: Iterable[list[dict]], path: Path, tokenizer, templates: TemplateSet, tokens: dict[str, SpecialTokens], *,
                   cutoff_len: int, train_on_inputs: bool, overlength: str, reuse_prompt: bool = True,
                   expected_rows: int | None = None) -> SplitCounts:
    """Tokenize batches of rows into one parquet file; returns the split's counts (with examples per source). Progress
    is logged every ``PROGRESS_EVERY_S`` seconds (out of ``expected_rows`` when given).

    A pipeline over the batches: while a background thread encodes batch k (Rust, on every core, without the GIL),
    this thread assembles and writes batch k-1 and renders batch k+1, so no core waits for the Python steps. One
    encode call over a whole split held every Encoding at once and took about twice the time: for 320k texts, 52 s
    against 28 s wall and 99 s against 52 s CPU in calls of 4,096 texts (bench/bench_prep.py's rows)."""
    import pyarrow.parquet as pq

    encode, plain_bos, total = encoder(tokenizer), prefix_ids(tokenizer), zero_counts()
    started = logged = time.monotonic()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="culbot-encode") as pool, \
            pq.ParquetWriter(path, examples_schema(), **PARQUET_OPTIONS) as writer:
        pending = None   # (rendered batch, its encodings to come)

        def finish(job):
            table, counts = assemble(job[0], job[1].result(), cutoff_len=cutoff_len, overlength=overlength)
            writer.write_table(table)
            add_counts(total, {**counts, "by_source": count_sources(table)})
            nonlocal logged
            if time.monotonic() - logged >= PROGRESS_EVERY_S:
                logged = time.monotonic()
                of = f"/{expected_rows:,} ({total['rows'] / max(expected_rows, 1):.0%})" if expected_rows else ""
                log.info("tokenize %s: %s%s rows, %s tokens, %.0f rows/s", path.stem, f"{total['rows']:,}", of,
                         f"{total['tokens']:,}", total["rows"] / (logged - started))

        for rows in batches:
            batch = render_rows(rows, tokenizer, templates, tokens, train_on_inputs=train_on_inputs, reuse_prompt=reuse_prompt,
                                plain_bos=plain_bos)
            job = (batch, pool.submit(encode, batch.texts))
            if pending:
                finish(pending)
            pending = job
        if pending:
            finish(pending)
        if total["rows"] == 0:
            writer.write_table(examples_schema().empty_table())
    return SplitCounts(**{**total, "by_source": dict(sorted(total["by_source"].items()))})


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


def training_templates(formatted: TemplateSet, data: TokenizeConfig) -> TemplateSet:
    """The templates a run trains with: the formatted data's, or every source through ``data.template``."""
    if not data.template:
        return formatted
    return TemplateSet(map={}, default=data.template, templates={data.template: load_template(data.template)}, context=formatted.context)


def run_tokenize(formatted_dir: Path | StageRef, base: BaseModelRef, out_root: Path, data: TokenizeConfig) -> StageOutput:
    """Tokenize both splits with the base model's tokenizer into <out_root>/<short hash>/."""
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
        source = formatted_dir / f"{split}.parquet"
        rows = _store.iter_rows(source, batch_size=BATCH_ROWS,
                                columns=["id", "source", "template", "instruction", "input", "messages", "prompt", "response"])
        with gc_paused():   # pyarrow directly; datasets reads it back as is
            counts[split] = write_examples(rows, staging / f"{split}.parquet", tokenizer, templates, tokens,
                                           reuse_prompt=not data.template, expected_rows=_store.count_rows(source), **settings)
    _store.write_model(staging / TEMPLATES_FILE, templates)
    _store.atomic_write_json(staging / SPECIAL_TOKENS_FILE, {k: v.model_dump() for k, v in tokens.items()})
    m = _store.write_manifest(staging, stage="tokenize", inputs={"formatted": formatted.content_hash, "tokenizer": tok_hash},
                              lineage=formatted.lineage.then(formatted=formatted.content_hash),
                              config={**settings, "base": base.name, "template": data.template,
                                      "special_tokens": {k: v.model_dump() for k, v in tokens.items()}},
                              counts=TokenCounts(**counts).model_dump(), timings={"tokenize": time.monotonic() - t0}, content_hash=key)
    _store.promote(staging, final)
    log.info("tokenized %s: %s", formatted_dir.name, {s: c.kept for s, c in counts.items()})
    return StageOutput.of(final, m)


def cache_key(tp: TrainProfile) -> str | None:
    """What the profile does not show: the samples a tiny base model and its tokenizer are built from."""
    from culbot.pipeline_config.train_schema import TINY_FAMILIES

    return _store.tree_hash(Path(tp.samples_dir)) if tp.model.base in TINY_FAMILIES and Path(tp.samples_dir).is_dir() else None


STAGE = Stage(name="tokenize", module=__name__, profile="train", section="tokenize", key=cache_key)


@stage_task(STAGE)
def tokenize_task(tp: TrainProfile, formatted: StageRef) -> StageOutput:
    """With the training profile's base model and data settings; refuses a profile that cannot fit before any download."""
    from .model_io import resolve_base
    from .plan import check_fits

    check_fits(tp)
    base = resolve_base(tp.model, models_root=tp.models_root, samples_dir=tp.samples_dir)
    return run_tokenize(formatted, base, tp.tokenized_root, tp.tokenize)
