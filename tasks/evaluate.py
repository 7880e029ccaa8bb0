"""Stage 8: evaluate a trained adapter: validation loss and perplexity, and answers to Korean probe questions.

Run as: culbot eval --run artifacts/runs/<run>

Probes are formatted with the same template code as training (format_prompts.render_prompt),
using the template recorded with the adapter. The result is <run>/eval/: eval.json
(with the gate's verdict), eval.md and a manifest.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from culbot.pipeline_config.train_schema import EvalSpec

from . import _store
from .format_prompts import Template, extract_response, render_prompt

log = logging.getLogger("culbot.eval")


class RunNotFinished(RuntimeError):
    """The run has no completed training result (failed, preempted or never run)."""


def read_meta(adapter_dir: Path) -> dict:
    p = Path(adapter_dir) / "culbot.json"
    if not p.is_file():
        raise RunNotFinished(f"{adapter_dir}: no culbot.json; is this a finished adapter?")
    return _store.read_json(p)


def probe_template(meta: dict, source: str) -> Template:
    name = meta["template_map"].get(source, meta["default_template"])
    t = meta["templates"][name]
    return Template(**{**t, "name": name})


def load_adapted(adapter_dir: Path):
    """Base model from the adapter's own metadata, plus the adapter; and the tokenizer saved with it.

    On a GPU host: bf16 on the GPU(s); on CPU: fp32.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(adapter_dir)
    gpu = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], revision=meta.get("base_revision"),
                                                dtype=torch.bfloat16 if gpu else torch.float32, device_map="auto" if gpu else None)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(adapter_dir)), meta


def eval_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over label tokens."""
    import torch

    from .collate import PadCollator

    collate, total, count = PadCollator(pad_id), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(model.device) for k, v in collate(rows[i:i + batch_size]).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return (total / count if count else float("nan")), count


def answer_probes(model, tokenizer, template: Template, probes: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    import torch

    out = []
    for q in probes:
        prompt = render_prompt(template, q, "", tokenizer)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({"question": q, "prompt": prompt, "answer": extract_response(template, text)})
    return out


def report_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Eval of `{res['run']}`", "", f"**{res['status'].upper()}**: {res['reason']}", "",
             "| metric | value |", "|---|---:|", f"| validation loss | {res['eval_loss']:.4f} |",
             f"| perplexity | {res['perplexity']:.2f} |", f"| label tokens | {res['label_tokens']} |", "",
             f"## Probes (template `{res['template']}`)", ""]
    for p in res["probes"]:
        lines += [f"**Q:** {p['question']}", "", f"**A:** {p['answer'] or '(empty)'}", ""]
    return "\n".join(lines)


def run_eval(run_dir: Path, spec: EvalSpec) -> dict:
    import datasets

    run_dir = Path(run_dir)
    t0 = time.monotonic()
    result_file = run_dir / "train_result.json"
    status = _store.read_json(result_file)["status"] if result_file.is_file() else "missing"
    if status != "completed":
        raise RunNotFinished(f"{run_dir}: training status is {status!r}; only a completed run can be evaluated")
    cfg = _store.read_json(run_dir / "config.json")
    model, tokenizer, meta = load_adapted(run_dir / "adapter")
    rows = datasets.Dataset.from_parquet(str(Path(cfg["data"]) / "validation.parquet")).select_columns(["input_ids", "labels"]).to_list()
    loss, n = eval_loss(model, rows, tokenizer.pad_token_id, spec.batch_size)
    template = probe_template(meta, spec.probe_source)
    probes = answer_probes(model, tokenizer, template, spec.probes, spec.max_new_tokens)
    ok = math.isfinite(loss) and (spec.max_eval_loss is None or loss <= spec.max_eval_loss)
    reason = (f"validation loss {loss:.4f}" + (f" ≤ gate {spec.max_eval_loss}" if spec.max_eval_loss else " is finite")) if ok else \
        (f"validation loss {loss} is not finite" if not math.isfinite(loss) else f"validation loss {loss:.4f} > gate {spec.max_eval_loss}")
    res = {"run": run_dir.name, "status": "passed" if ok else "failed", "reason": reason, "eval_loss": loss,
           "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"), "label_tokens": n,
           "template": template.name, "probes": probes, "seconds": round(time.monotonic() - t0, 2)}
    out = run_dir / "eval"
    (out / _store.MANIFEST).unlink(missing_ok=True)
    _store.atomic_write_json(out / "eval.json", res)
    _store.atomic_write_text(out / "eval.md", report_markdown(res))
    _store.write_manifest(out, stage="eval", inputs={"adapter": _store.tree_hash(run_dir / "adapter")}, config=spec.model_dump(mode="json"),
                          counts={"eval_loss": loss, "label_tokens": n, "status": res["status"]}, timings={"eval": res["seconds"]})
    log.info("eval %s: loss %.4f, perplexity %.2f (%s)", res["status"], loss, res["perplexity"], reason)
    return res
