"""Prefect tasks for the training half: thin wrappers that add caching, retries on preemption, and artifacts.

Kept apart from train.py/evaluate.py/merge_adapter.py/publish.py so those cores (and the
training entrypoint) stay importable without Prefect.
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from culbot.pipeline_config.train_schema import EvalSpec, MergeSpec, PublishSpec, TrainProfile

from . import _store
from ._prefect import stage_cache
from .train import Preempted, log_line, prepare_run, run_training

_TRAIN_CORE = ("culbot.tasks.train", "culbot.tasks.train_entry", "culbot.tasks.collate", "culbot.tasks.tokenize_data", "culbot.tasks.tiny_model")


def _retry_if_preempted(task, task_run, state) -> bool:
    """Retry (and so resume from the newest checkpoint) only when the run was preempted."""
    try:
        state.result()
    except Preempted:
        return True
    except Exception:
        return False
    return False


def curve_markdown(result: dict, run_dir: Path) -> str:
    losses = [(h["step"], h["loss"]) for h in result.get("log_history", []) if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in result.get("log_history", []) if "eval_loss" in h]
    lines = [f"# Training `{run_dir.name}`", "", f"{result['global_step']} optimizer steps, train loss {result['metrics'].get('train_loss', float('nan')):.4f}", "",
             "| step | loss |", "|---:|---:|"]
    if result.get("packing"):
        pk = result["packing"]
        lines[4:4] = [f"Packed {pk['examples']:,} examples into {pk['rows']:,} rows of up to {pk['max_len']} tokens: "
                      f"{pk['real_token_share']:.1%} real tokens, {pk['examples_per_row']} examples per row.", ""]
    pick = losses if len(losses) <= 12 else [losses[i * (len(losses) - 1) // 11] for i in range(12)]
    lines += [f"| {s} | {v:.4f} |" for s, v in pick]
    if evals:
        lines += ["", "| step | eval loss |", "|---:|---:|"] + [f"| {s} | {v:.4f} |" for s, v in evals]
    return "\n".join(lines) + "\n"


@task(name="train", cache_policy=stage_cache(*_TRAIN_CORE), persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=_retry_if_preempted)
def train_task(profile: dict, formatted: dict) -> dict:
    """Tokenize, launch the training subprocess, stream it; a retry after preemption resumes."""
    prof = TrainProfile.model_validate(profile)
    cfg = prepare_run(prof, Path(formatted["path"]))
    result = run_training(cfg, prof, on_line=log_line, env=prof.run_env())
    adapter = cfg.parent / "adapter"
    create_markdown_artifact(curve_markdown(result, cfg.parent), key="training-curve", description="Training curve summary")
    return {"path": str(adapter), "run_dir": str(cfg.parent), "content_hash": _store.read_manifest(adapter)["content_hash"],
            "counts": {"global_step": result["global_step"], "packing": result.get("packing")}}


@task(name="eval", cache_policy=stage_cache("culbot.tasks.evaluate", "culbot.tasks.format_prompts"), persist_result=True)
def eval_task(run: dict, spec: dict) -> dict:
    from .evaluate import run_eval

    res = run_eval(Path(run["run_dir"]), EvalSpec.model_validate(spec))
    out = Path(run["run_dir"]) / "eval"
    create_markdown_artifact((out / "eval.md").read_text(encoding="utf-8"), key="eval-report", description="Eval report")
    return {"path": str(out), "run_dir": run["run_dir"], "content_hash": _store.read_manifest(out)["content_hash"],
            "counts": {"status": res["status"], "eval_loss": res["eval_loss"]}}


@task(name="merge-adapter", cache_policy=stage_cache("culbot.tasks.merge_adapter"), persist_result=True)
def merge_adapter_task(run: dict, spec: dict, models_root: str, probes: list[str]) -> dict:
    from .merge_adapter import run_merge_adapter

    m = run_merge_adapter(Path(run["run_dir"]), MergeSpec.model_validate(spec), Path(models_root), probes)
    return {"path": m["path"], "content_hash": m["content_hash"], "counts": {"max_logit_diff": m["merge"]["max_logit_diff"]}}


@task(name="publish", cache_policy=stage_cache("culbot.tasks.publish"), persist_result=True, retries=2, retry_delay_seconds=30)
def publish_task(run: dict, model: dict | None, spec: dict, evaluation: dict) -> dict:
    """Network stage for the Hub target, so retried. ``evaluation`` ties the cache to the eval verdict."""
    from .publish import run_publish

    rec = run_publish(Path(run["run_dir"]), Path(model["path"]) if model else None, PublishSpec.model_validate(spec))
    for kind, where in rec["published"].items():
        if isinstance(where, dict):
            create_link_artifact(where["url"], link_text=f"{kind}: {where['repo']}", key=f"published-{kind}")
        else:
            create_markdown_artifact(f"# Published {kind}\n\n`{where}`\n", key=f"published-{kind}")
    out = Path(run["run_dir"]) / "publish"
    return {"path": str(out), "content_hash": _store.read_manifest(out)["content_hash"], "counts": {"published": len(rec["published"])},
            "published": rec["published"]}
