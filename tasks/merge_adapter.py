"""Stage 9: merge the adapter into its base model, verify, and save a self-describing model folder.

Run as: culbot merge-adapter --run artifacts/runs/<run> --out artifacts/models

The base model comes from the adapter's own culbot.json, not from arguments.
Before saving, the merged model's logits are compared with base + adapter on a
probe batch; after saving, the reloaded folder is compared again. The output
folder is addressed by the adapter's content hash and dtype, so a second merge
is a no-op.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from culbot.pipeline_config.train_schema import MergeSpec

from . import _store
from .evaluate import probe_template, read_meta
from .format_prompts import render_prompt

log = logging.getLogger("culbot.merge_adapter")

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class MergeMismatch(RuntimeError):
    """Merged logits differ from base + adapter beyond the tolerance."""


def merge_dtype(meta: dict, spec: MergeSpec) -> str:
    if spec.dtype:
        return spec.dtype
    hp = meta["hyperparameters"]
    return "fp32" if hp.get("model", {}).get("dtype") == "fp32" else hp["model"]["dtype"]


def run_merge_adapter(run_dir: Path, spec: MergeSpec, out_root: Path, probes: list[str]) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    run_dir, out_root = Path(run_dir), Path(out_root)
    adapter = run_dir / "adapter"
    meta = read_meta(adapter)
    dtype = merge_dtype(meta, spec)
    key = _store.hash_json({"adapter": _store.file_hashes(adapter), "dtype": dtype, "base": meta["base_model"], "rev": meta.get("base_revision")})
    final = out_root / key[:16]
    if _store.is_complete(final):
        log.info("merged model %s already exists; nothing to do", final)
        return _store.read_manifest(final) | {"path": str(final)}
    tdtype = getattr(torch, TORCH_DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], revision=meta.get("base_revision"), dtype=tdtype)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    template = probe_template(meta, "cbnu")
    tokenizer.padding_side = "left"
    batch = tokenizer([render_prompt(template, q) for q in probes], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = model(**batch).logits.float()
        merged = model.merge_and_unload()
        diff = (merged(**batch).logits.float() - ref).abs().max().item()
    atol = spec.atol or (1e-4 if dtype == "fp32" else 5e-2)
    if diff > atol:
        raise MergeMismatch(f"merged logits differ from base + adapter by {diff:.2e} > merge.atol={atol}")
    staging = _store.new_staging_dir(out_root, key[:16])
    merged.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, max_new_tokens=256)
    merged.save_pretrained(staging, max_shard_size=spec.max_shard_size)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(staging)
    eval_file = run_dir / "eval" / "eval.json"
    evaluation = _store.read_json(eval_file) if eval_file.is_file() else None
    _store.atomic_write_json(staging / "culbot_template.json", {"map": meta["template_map"], "default": meta["default_template"], "templates": meta["templates"]})
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=tdtype).eval()
    with torch.no_grad():
        saved_diff = (reloaded(**batch).logits.float() - ref).abs().max().item()
    if saved_diff > atol:
        raise MergeMismatch(f"the saved merged model differs from base + adapter by {saved_diff:.2e} > merge.atol={atol}")
    info = {"dtype": dtype, "max_logit_diff": diff, "saved_max_logit_diff": saved_diff, "adapter": str(adapter), "run": run_dir.name}
    _store.atomic_write_json(staging / "culbot.json", {**meta, "eval": evaluation, "merge": info})
    _store.write_manifest(staging, stage="merge_adapter", inputs={"adapter_hash": key, "run": str(run_dir)}, config=spec.model_dump(mode="json"),
                          counts={"parameters": sum(p.numel() for p in merged.parameters())}, timings={"merge": time.monotonic() - t0},
                          content_hash=key, extra={"merge": info})
    _store.promote(staging, final)
    log.info("merged %s -> %s (%s, max logit diff %.2e)", adapter, final, dtype, diff)
    return _store.read_manifest(final) | {"path": str(final)}
