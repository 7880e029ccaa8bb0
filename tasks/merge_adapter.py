"""Merge a run's adapter into its base model, verify it, and save a self-describing model folder.

Run as: culbot merge-adapter --run artifacts/runs/<run> --out artifacts/models

The base model comes from the adapter's run card, not from arguments. Before saving, the
merged model's logits are compared with base + adapter on a probe batch; after saving, the
reloaded folder is compared again. The folder holds the model, its tokenizer (right
padding, as trained), its generation config, templates.json and culbot.json: the run card
with the eval it passed and how it was merged. It is addressed by the adapter, the dtype
and the eval report's verdict (without its timings), all three in its key, so a second merge,
or one after an eval rerun that changed only timings, is a no-op.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path


from culbot.pipeline_config.train_schema import MergeAdapterConfig

from . import _store
from ._prefect import stage_task
from .contracts import Stage, EVAL_REPORT_FILE, RUN_CARD_FILE, TEMPLATES_FILE, EvalReport, MergeInfo, RunCard, RunRef, StageOutput, StageRef, short_hash
from .model_io import load_adapted, torch_dtype
from .run_folder import ADAPTER, read_run_card, require_completed
from .special_tokens import check_end
from .templates import render_prompt

log = logging.getLogger("culbot.merge_adapter")


class MergeMismatch(RuntimeError):
    """Merged logits differ from base + adapter beyond the tolerance."""


def merge_dtype(card: RunCard, spec: MergeAdapterConfig) -> str:
    """The configured dtype, else the dtype the base was trained in."""
    return spec.dtype or card.hyperparameters.model.dtype


def run_merge_adapter(run_dir: Path, spec: MergeAdapterConfig, out_root: Path, probes: list[str], eval_dir: Path | None = None) -> StageOutput:
    """Merge, verify before and after saving, and write <out_root>/<short hash>/. ``eval_dir``: the eval it passed, if any."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    run_dir, out_root = Path(run_dir).resolve(), Path(out_root)
    require_completed(run_dir)
    adapter = run_dir / ADAPTER
    card = read_run_card(adapter)
    evaluation = _store.read_model(Path(eval_dir) / EVAL_REPORT_FILE, EvalReport) if eval_dir else None
    eval_hash = _store.read_manifest(eval_dir).content_hash if eval_dir else None
    dtype = merge_dtype(card, spec)
    adapter_hash = _store.read_manifest(adapter).content_hash
    # the eval's verdict, not its folder's hash: a rerun of eval that only took another time is the same model
    key = _store.hash_json({"adapter": adapter_hash, "dtype": dtype, "eval": evaluation.verdict() if evaluation else None})
    final = out_root / short_hash(key)
    if _store.is_complete(final):
        log.info("merged model %s already exists; nothing to do", final)
        return StageOutput.of(final, _store.read_manifest(final))
    model, tokenizer, _ = load_adapted(adapter, dtype)
    template = card.template_for("cbnu")
    # The probe batch is padded by its own tokenizer: padding a batch leaves its direction in the fast
    # tokenizer's backend, which save_pretrained writes to tokenizer.json. The saved one never pads.
    probe_tokenizer = AutoTokenizer.from_pretrained(str(adapter), padding_side="left")
    batch = probe_tokenizer([render_prompt(template, q, "", probe_tokenizer) for q in probes], return_tensors="pt", padding=True,
                            add_special_tokens=False)
    with torch.no_grad():
        ref = model(**batch).logits.float()
        merged = model.merge_and_unload()
        diff = (merged(**batch).logits.float() - ref).abs().max().item()
    atol = spec.atol or (1e-4 if dtype == "fp32" else 5e-2)
    if diff > atol:
        raise MergeMismatch(f"merged logits differ from base + adapter by {diff:.2e} > merge_adapter.atol={atol}")
    staging = _store.new_staging_dir(out_root, short_hash(key))
    if (adapter / "generation_config.json").is_file():   # written by training: stops on every end token the run learned
        merged.generation_config = GenerationConfig.from_pretrained(str(adapter))
    else:
        merged.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id)
    merged.generation_config.max_new_tokens = 256
    if card.special_tokens is not None:
        check_end(card.special_tokens, merged.generation_config.eos_token_id)
    merged.save_pretrained(staging, max_shard_size=spec.max_shard_size)
    tokenizer.save_pretrained(staging)
    _store.write_model(staging / TEMPLATES_FILE, card.templates)
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch_dtype(dtype)).eval()
    with torch.no_grad():
        saved_diff = (reloaded(**batch).logits.float() - ref).abs().max().item()
    if saved_diff > atol:
        raise MergeMismatch(f"the saved merged model differs from base + adapter by {saved_diff:.2e} > merge_adapter.atol={atol}")
    info = MergeInfo(dtype=dtype, max_logit_diff=diff, saved_max_logit_diff=saved_diff, run=run_dir.name)
    _store.write_model(staging / RUN_CARD_FILE, card.model_copy(update={"base": card.base.relocated(adapter, final), "eval": evaluation, "merge": info}))
    inputs = {"adapter": adapter_hash, **({"eval": eval_hash} if eval_hash else {})}
    m = _store.write_manifest(staging, stage="merge-adapter", inputs=inputs, lineage=card.lineage, config=spec.model_dump(mode="json"),
                              counts={"parameters": sum(p.numel() for p in merged.parameters()), **info.model_dump()},
                              timings={"merge": time.monotonic() - t0}, content_hash=key)
    _store.promote(staging, final)
    log.info("merged %s -> %s (%s, max logit diff %.2e)", adapter, final, dtype, diff)
    return StageOutput.of(final, m)


STAGE = Stage(name="merge-adapter", module=__name__, profile="train", section="merge_adapter")


@stage_task(STAGE)
def merge_adapter_task(spec: MergeAdapterConfig, run: RunRef, evaluation: StageRef, models_root: Path, probes: list[str]) -> StageOutput:
    return run_merge_adapter(run.run_dir, spec, models_root, probes, evaluation.path)
