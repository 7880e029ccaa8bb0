"""Evaluate a trained adapter: validation loss and perplexity, answers to Korean probe questions, and the gate.

Run as: culbot eval --run artifacts/runs/<run>

Probes are formatted with the training template code (templates.render_prompt) and the
template recorded in the adapter's run card. The result is <run>/eval/: eval.json (an
EvalReport with the gate's verdict), eval.md and a manifest.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from prefect import task

from culbot.pipeline_config.train_schema import EvalSpec

from . import _store
from ._prefect import stage_cache
from .contracts import EVAL_REPORT_FILE, EvalOutput, EvalReport, ProbeAnswer, RunRef, Template
from .model_io import load_adapted
from .run_folder import ADAPTER, EVAL, read_config, require_completed
from .templates import extract_response, render_prompt

log = logging.getLogger("culbot.eval")

REPORT_MD = "eval.md"

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


def answer_probes(model, tokenizer, template: Template, probes: list[str], max_new_tokens: int) -> list[ProbeAnswer]:
    import torch

    out = []
    for q in probes:
        prompt = render_prompt(template, q, "", tokenizer)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(ProbeAnswer(question=q, prompt=prompt, answer=extract_response(template, text)))
    return out


def report_markdown(res: EvalReport) -> str:
    lines = [f"# Eval of `{res.run}`", "", f"**{res.status.upper()}**: {res.reason}", "",
             "| metric | value |", "|---|---:|", f"| validation loss | {res.eval_loss:.4f} |",
             f"| perplexity | {res.perplexity:.2f} |", f"| label tokens | {res.label_tokens} |", "",
             f"## Probes (template `{res.template}`)", ""]
    for p in res.probes:
        lines += [f"**Q:** {p.question}", "", f"**A:** {p.answer or '(empty)'}", ""]
    return "\n".join(lines)


def gate(loss: float, spec: EvalSpec) -> tuple[bool, str]:
    """The eval gate: a finite validation loss, at most ``max_eval_loss`` when set."""
    if not math.isfinite(loss):
        return False, f"validation loss {loss} is not finite"
    if spec.max_eval_loss is not None and loss > spec.max_eval_loss:
        return False, f"validation loss {loss:.4f} > gate {spec.max_eval_loss}"
    return True, f"validation loss {loss:.4f}" + (f" ≤ gate {spec.max_eval_loss}" if spec.max_eval_loss else " is finite")


def run_eval(run_dir: Path, spec: EvalSpec) -> EvalReport:
    import datasets

    run_dir = Path(run_dir).resolve()
    t0 = time.monotonic()
    require_completed(run_dir)
    config = read_config(run_dir)
    model, tokenizer, card = load_adapted(run_dir / ADAPTER)
    rows = datasets.Dataset.from_parquet(str(config.data_dir(run_dir) / "validation.parquet")).select_columns(["input_ids", "labels"]).to_list()
    loss, n = eval_loss(model, rows, tokenizer.pad_token_id, spec.batch_size)
    template = card.template_for(spec.probe_source)
    probes = answer_probes(model, tokenizer, template, spec.probes, spec.max_new_tokens)
    ok, reason = gate(loss, spec)
    res = EvalReport(run=run_dir.name, status="passed" if ok else "failed", reason=reason, eval_loss=loss,
                     perplexity=math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf"), label_tokens=n,
                     template=template.name, probes=probes, seconds=round(time.monotonic() - t0, 2))
    out = run_dir / EVAL
    (out / _store.MANIFEST).unlink(missing_ok=True)
    _store.write_model(out / EVAL_REPORT_FILE, res)
    _store.atomic_write_text(out / REPORT_MD, report_markdown(res))
    _store.write_manifest(out, stage="eval", inputs={"adapter": _store.read_manifest(run_dir / ADAPTER).content_hash},
                          lineage=card.lineage, config=spec.model_dump(mode="json"),
                          counts={"eval_loss": loss, "label_tokens": n, "status": res.status}, timings={"eval": res.seconds})
    log.info("eval %s: loss %.4f, perplexity %.2f (%s); report %s", res.status, loss, res.perplexity, reason, out / REPORT_MD)
    return res


def eval_output(run_dir: Path) -> EvalOutput:
    """The eval stage's output for a run folder that has an eval report."""
    out = Path(run_dir).resolve() / EVAL
    m = _store.read_manifest(out)
    if m is None:
        raise FileNotFoundError(f"{out}: no finished eval; run `culbot eval --run {run_dir}` first")
    res = _store.read_model(out / EVAL_REPORT_FILE, EvalReport)
    return EvalOutput(path=out, content_hash=m.content_hash, stage="eval", counts=m.counts, passed=res.passed,
                      reason=res.reason, eval_loss=res.eval_loss)


@task(name="eval", cache_policy=stage_cache(__name__), persist_result=True)
def eval_task(spec: EvalSpec, run: RunRef) -> EvalOutput:
    from prefect.artifacts import create_markdown_artifact

    run_eval(run.run_dir, spec)
    create_markdown_artifact((run.run_dir / EVAL / REPORT_MD).read_text(encoding="utf-8"), key="eval-report", description="Eval report")
    return eval_output(run.run_dir)
