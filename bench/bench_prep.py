"""Data-prep and padding benchmarks: format + tokenize a KULLM-sized synthetic set, our path vs alpaca-lora's shape,
and how many computed tokens are real under each batching strategy.

Run as: python bench/bench_prep.py [--rows 160000] [--cutoff 1024] [--batch 8] [--out bench/results/prep.json]

1. Data prep: the same rows go through
   - ours: format_rows (registered templates) then run_tokenize (each split streamed in batches of rows: one
     fast-tokenizer call per batch in a background thread while the batch before is assembled on flat arrays and
     written to parquet; content-addressed, so a rerun is a cache hit), and
   - a baseline shaped like alpaca-lora's generate_and_tokenize_prompt over datasets.map: one row at a time,
     tokenizing the full prompt and then the user prompt again to find the label mask.
   The tokenizer is the tiny BPE tokenizer trained on raw/samples (fast, Rust).
2. Padding efficiency at the cutoff: real tokens / computed tokens for padding to the cutoff, to the longest in the
   batch, with length grouping (HF's megabatches of 50 batches), and with our packing (the split packed into rows of up
   to the cutoff, best-fit decreasing, rows shuffled into micro batches and padded to the longest row).
   Then how fast a DataLoader serves packed micro batches (PackedRows + PositionCollator, one process), and the
   check that packing keeps examples apart: on the tiny model, the loss of a packed row equals the
   token-weighted mean of the per-example losses.
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import write_results  # noqa: E402


def synthetic_rows(n: int, tokens_per_char: float, seed: int = 0) -> list[dict]:
    """KULLM-like rows from the shipped Korean samples: lognormal lengths (median ~180 tokens), ~4% past 1024."""
    from culbot.tasks import _store

    pieces = [r[k] for r in _store.read_jsonl(REPO / "raw" / "samples" / "kullm_sample.jsonl") for k in ("instruction", "output") if r[k]]
    rng = random.Random(seed)

    def text(tokens: float) -> str:
        want, out = max(8, int(tokens / tokens_per_char)), []
        while sum(map(len, out)) < want:
            out.append(rng.choice(pieces))
        return " ".join(out)[:want]

    rows = []
    for i in range(n):
        total = rng.lognormvariate(5.2, 0.85)  # tokens: median e^5.2 ≈ 180, mean ≈ 260, P(>1024) ≈ 2%
        if rng.random() < 0.02:
            total = rng.uniform(1024, 2500)  # and a deliberate tail of long documents
        inp = text(total * 0.3) if rng.random() < 0.35 else ""
        rows.append({"id": f"syn-{i}", "source": "kullm", "instruction": text(min(60, total * 0.2)), "input": inp,
                     "output": text(total * (0.5 if inp else 0.8))})
    return rows


def write_formatted(rows: list[dict], folder: Path, template) -> Path:
    """A formatted dataset folder, as the format stage writes it (parquet + templates + manifest last)."""
    from culbot.tasks import _store
    from culbot.tasks.contracts import TEMPLATES_FILE, TemplateSet
    from culbot.tasks.format import COLUMNS, format_rows

    templates = TemplateSet(map={}, default="kullm", templates={"kullm": template})
    formatted = format_rows(rows, templates)
    folder.mkdir(parents=True)
    cut = max(1, len(formatted) // 50)
    _store.write_text_table(folder / "train.parquet", formatted[cut:], COLUMNS)
    _store.write_text_table(folder / "validation.parquet", formatted[:cut], COLUMNS)
    _store.write_model(folder / TEMPLATES_FILE, templates)
    _store.write_manifest(folder, stage="format", inputs={"dataset": "synthetic"}, config={}, counts={"rows": len(formatted)})
    return folder


def baseline_map(rows: list[dict], tokenizer, template, cutoff: int):
    """alpaca-lora's generate_and_tokenize_prompt, one row at a time through datasets.map."""
    import datasets

    from culbot.tasks.templates import render_prompt

    def tokenize(prompt, add_eos=True):
        result = tokenizer(prompt, truncation=True, max_length=cutoff, padding=False, return_tensors=None)
        if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff and add_eos:
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(point):
        user = render_prompt(template, point["instruction"], point["input"])
        tokenized = tokenize(user + point["output"])
        n = len(tokenize(user, add_eos=False)["input_ids"])
        tokenized["labels"] = [-100] * n + tokenized["labels"][n:]
        return tokenized

    ds = datasets.Dataset.from_list(rows)
    return ds.map(generate_and_tokenize_prompt, remove_columns=ds.column_names)


def bench_data_prep(rows_n: int, cutoff: int, tmp: Path) -> tuple[dict, list[int]]:
    import datasets
    from transformers import AutoTokenizer

    from culbot.pipeline_config.train_schema import TokenizeConfig
    from culbot.tasks.contracts import BaseModelRef
    from culbot.tasks.templates import load_template
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus
    from culbot.tasks.tokenize import run_tokenize

    datasets.disable_progress_bars()
    model = tmp / "tiny"
    build_tiny_model(model, sample_corpus(REPO / "raw" / "samples"))
    tok = AutoTokenizer.from_pretrained(str(model))
    probe = " ".join(r["output"] for r in synthetic_rows(50, 1.0, seed=1))
    tokens_per_char = len(tok(probe)["input_ids"]) / len(probe)
    rows = synthetic_rows(rows_n, tokens_per_char)
    template = load_template("kullm")

    t0 = time.perf_counter()
    formatted = write_formatted(rows, tmp / "formatted", template)
    base, data = BaseModelRef(name="tiny", path=str(model)), TokenizeConfig(cutoff_len=cutoff)
    m = run_tokenize(formatted, base, tmp / "tokenized", data)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_tokenize(formatted, base, tmp / "tokenized", data)
    cached = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = baseline_map(rows, tok, template, cutoff)
    baseline = time.perf_counter() - t0

    lengths = datasets.Dataset.from_parquet(str(m.path / "train.parquet"))["length"]
    raw_lengths = [len(x) for x in base["input_ids"]]
    over = sum(1 for r in rows if len(tok(render_for_count(template, r))["input_ids"]) > cutoff) if rows_n <= 2000 else None
    res = {"rows": rows_n, "cutoff": cutoff, "tokenizer": "tiny BPE (vocab 1024), fast",
           "ours_s": round(ours, 2), "ours_rows_per_s": round(rows_n / ours), "baseline_s": round(baseline, 2),
           "baseline_rows_per_s": round(rows_n / baseline), "speedup": round(baseline / ours, 2), "cached_rerun_s": round(cached, 3),
           "mean_tokens": round(sum(lengths) / len(lengths), 1), "median_tokens": sorted(lengths)[len(lengths) // 2],
           "truncated_at_cutoff": m.counts["train"]["truncated"], "share_truncated": round(m.counts["train"]["truncated"] / len(lengths), 4),
           "baseline_mean_tokens": round(sum(raw_lengths) / len(raw_lengths), 1)}
    if over is not None:
        res["rows_over_cutoff_checked"] = over
    res["tokenized_path"] = str(m.path)
    return res, list(lengths)


def loader_throughput(tokenized: Path, cutoff: int, batch: int, max_batches: int = 2000) -> dict:
    """Packed micro batches per second out of a DataLoader (one process), against what a GPU consumes."""
    import datasets
    import torch

    from culbot.tasks.collate import PackedRows, PositionCollator

    t0 = time.perf_counter()
    rows = PackedRows(datasets.Dataset.from_parquet(str(tokenized / "train.parquet")).select_columns(["input_ids", "labels", "length"]), cutoff)
    build_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, collate_fn=PositionCollator(0), num_workers=0)
    t0, n, tokens = time.perf_counter(), 0, 0
    for b in loader:
        n += 1
        tokens += b["input_ids"].numel()
        if n >= max_batches:
            break
    s = time.perf_counter() - t0
    return {"batches": n, "micro_batch": batch, "tokens_per_s": round(tokens / s), "batches_per_s": round(n / s, 1),
            "pack_and_open_s": round(build_s, 2)}


def render_for_count(template, r):
    from culbot.tasks.templates import render_prompt

    return render_prompt(template, r["instruction"], r["input"]) + r["output"]


def padding_efficiency(lengths: list[int], cutoff: int, batch: int, seed: int = 0) -> dict:
    """Real / computed tokens per strategy, over one epoch of shuffled batches."""
    from culbot.tasks.collate import pack_examples

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    lengths = [min(x, cutoff) for x in lengths]
    real = sum(lengths)
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    to_cutoff = sum(len(b) * cutoff for b in batches)
    longest = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    mega = batch * 50  # transformers' LengthGroupedSampler: megabatches of 50 batches, sorted within
    grouped_order = []
    for i in range(0, len(order), mega):
        grouped_order += sorted(order[i:i + mega], key=lambda j: -lengths[j])
    grouped = sum(len(b) * max(lengths[i] for i in b) for b in (grouped_order[i:i + batch] for i in range(0, len(grouped_order), batch)))
    t0 = time.perf_counter()
    rows = pack_examples(lengths, cutoff)  # what PackedRows does at the start of training
    pack_s = time.perf_counter() - t0
    row_len = [sum(lengths[i] for i in row) for row in rows]
    rng.shuffle(row_len)  # the Trainer's random sampler over rows; PositionCollator pads to the longest row
    packed = sum(len(b) * max(b) for b in (row_len[i:i + batch] for i in range(0, len(row_len), batch)))
    return {"batch": batch, "cutoff": cutoff, "real_tokens": real,
            "pad_to_cutoff": round(real / to_cutoff, 4), "pad_to_longest": round(real / longest, 4),
            "length_grouped": round(real / grouped, 4), "packing": round(real / packed, 4),
            "packing_static_width": round(real / (len(rows) * cutoff), 4),
            "packed_rows": len(rows), "examples_per_row": round(len(lengths) / len(rows), 2), "pack_s": round(pack_s, 3)}


def packing_parity(tmp: Path) -> dict:
    """Loss of one packed row vs the token-weighted mean of per-example losses, on the tiny model."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from culbot.tasks.collate import PackedRows, PadCollator, PositionCollator

    model_dir = tmp / "tiny"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as in training: position_ids restarts then separate the examples
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = ["충북대학교 도서관은 평일 오전 9시에 엽니다.", "학생회관 식당의 점심 메뉴는 매일 바뀝니다.",
             "수강 신청은 학기 시작 전 두 주 동안 진행됩니다.", "기숙사 입사 신청서는 학생지원과에 제출하세요."]
    feats = []
    for t in texts:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        feats.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    rows = PackedRows(datasets.Dataset.from_list(feats), 1024)
    assert len(rows) == 1, "all four fit in one row"
    with torch.no_grad():
        packed_loss = model(**PositionCollator(tok.pad_token_id)([rows[0]])).loss.item()
        total, count = 0.0, 0
        for f in feats:
            b = PadCollator(tok.pad_token_id)([f])
            n = sum(1 for x in f["labels"][1:] if x != -100)
            total += model(**b).loss.item() * n
            count += n
        # The packed row also drops each example's first label (it would predict across the boundary): same as alone.
    mean = total / count
    return {"packed_loss": round(packed_loss, 6), "per_example_mean": round(mean, 6), "abs_diff": abs(packed_loss - mean),
            "within_1e-4": abs(packed_loss - mean) < 1e-4}


def table(title: str, rows: list[tuple]) -> str:
    w = max(len(str(r[0])) for r in rows)
    return "\n".join([title] + [f"  {str(k):<{w}}  {v}" for k, v in rows])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=160_000)
    ap.add_argument("--cutoff", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="micro batch for the padding comparison")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prep.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="culbot-bench-prep-"))
    try:
        prep, lengths = bench_data_prep(args.rows, args.cutoff, tmp)
        pad = padding_efficiency(lengths, args.cutoff, args.batch)
        loader = loader_throughput(Path(prep.pop("tokenized_path")), args.cutoff, args.batch)
        parity = packing_parity(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"data_prep": prep, "padding_efficiency": pad, "loader": loader, "packing_parity": parity}
    print(table(f"data prep: format + tokenize {prep['rows']:,} rows (mean {prep['mean_tokens']} tokens, "
                f"{prep['share_truncated']:.1%} over the cutoff {prep['cutoff']})", [
        ("ours (batched fast tokenizer, parquet, cached)", f"{prep['ours_rows_per_s']:>9,} rows/s  {prep['ours_s']:>7.2f} s"),
        ("baseline (alpaca-lora per row, datasets.map)", f"{prep['baseline_rows_per_s']:>9,} rows/s  {prep['baseline_s']:>7.2f} s"),
        ("speed-up", f"{prep['speedup']:>9}×"),
        ("ours, cached rerun", f"{prep['cached_rerun_s']:>9} s")]))
    print()
    print(table(f"padding efficiency (real / computed tokens), micro batch {pad['batch']}, cutoff {pad['cutoff']}", [
        ("pad to cutoff", f"{pad['pad_to_cutoff']:.1%}"), ("pad to longest in batch", f"{pad['pad_to_longest']:.1%}"),
        ("length grouping", f"{pad['length_grouped']:.1%}"),
        (f"packing (ours: {pad['packed_rows']:,} rows, {pad['examples_per_row']} examples per row, packed in {pad['pack_s']} s)",
         f"{pad['packing']:.1%}"),
        ("packing, rows padded to the cutoff (static shapes, torch.compile)", f"{pad['packing_static_width']:.1%}")]))
    print()
    print(table("data loader, packed rows (one process, no workers; training adds dataloader_num_workers)", [
        ("open the split and pack it", f"{loader['pack_and_open_s']} s"),
        (f"micro batches of {loader['micro_batch']} rows", f"{loader['batches_per_s']:,} per s"),
        ("tokens out of the loader", f"{loader['tokens_per_s']:,} per s (12.8b LoRA trains ~10^3-10^4 tokens/s per GPU: culbot plan)")]))
    print()
    print(table("packing keeps examples apart (tiny model)", [
        ("loss of the packed row", parity["packed_loss"]), ("token-weighted mean of per-example losses", parity["per_example_mean"]),
        ("|difference|", f"{parity['abs_diff']:.2e}")]))
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
