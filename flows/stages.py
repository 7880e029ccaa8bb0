"""Single-stage flows, so any stage can be rerun from the Prefect UI against an existing dataset version or run.

Deployed from deploy/prefect.yaml: train on each GPU pool, and eval, merge and publish on the cpu pool.
Each one takes paths (a formatted dataset, a run folder, a merged model) and a training profile.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from culbot.flows.data_refresh import run_stage
from culbot.pipeline_config.train_schema import load_train_profile
from culbot.tasks import _store
from culbot.tasks.release_tasks import eval_task, merge_adapter_task, publish_task, train_task


def _ref(path: str) -> dict:
    m = _store.read_manifest(Path(path))
    if m is None:
        raise FileNotFoundError(f"{path}: not a finished stage output (no manifest.json)")
    return {"path": str(Path(path).resolve()), "content_hash": m["content_hash"]}


def _run_ref(run_dir: str) -> dict:
    return {**_ref(str(Path(run_dir) / "adapter")), "run_dir": str(Path(run_dir).resolve())}


@flow(name="train-stage", flow_run_name="train-{train_profile}")
def train_stage(formatted: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False) -> dict:
    """Train an adapter on a formatted dataset folder (artifacts/formatted/<hash>)."""
    tp = load_train_profile(train_profile, train_overrides or [])
    return run_stage(train_task, force, profile=tp.model_dump(mode="json"), formatted=_ref(formatted))


@flow(name="eval-stage", flow_run_name="eval-{train_profile}")
def eval_stage(run_dir: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False) -> dict:
    """Evaluate a finished run folder (artifacts/runs/<run>)."""
    tp = load_train_profile(train_profile, train_overrides or [])
    return run_stage(eval_task, force, run=_run_ref(run_dir), spec=tp.eval.model_dump(mode="json"))


@flow(name="merge-stage", flow_run_name="merge-{train_profile}")
def merge_stage(run_dir: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False) -> dict:
    """Merge a run's adapter into its base model."""
    tp = load_train_profile(train_profile, train_overrides or [])
    return run_stage(merge_adapter_task, force, run=_run_ref(run_dir), spec=tp.merge.model_dump(mode="json"),
                     models_root=str(Path(tp.artifacts_root).resolve() / "models"), probes=tp.eval.probes)


@flow(name="publish-stage", flow_run_name="publish-{train_profile}")
def publish_stage(run_dir: str, model_dir: str | None = None, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None,
                  force: bool = False) -> dict:
    """Publish a run (and its merged model) to the configured target; refused unless guards and eval passed."""
    tp = load_train_profile(train_profile, train_overrides or [])
    return run_stage(publish_task, force, run=_run_ref(run_dir), model=_ref(model_dir) if model_dir else None,
                     spec=tp.publish.model_dump(mode="json"), evaluation=_ref(str(Path(run_dir) / "eval")))
