"""Single-stage flows, so any stage can be rerun from the Prefect UI against an existing dataset or run.

Deployed from deploy/prefect.yaml: train on each GPU pool, and eval, merge-adapter and publish
on the cpu pool. Each one takes folders (a formatted dataset, a run, a merged model) and a
training profile. With an artifact root, a folder this host does not have is pulled from it
first, and what the stage makes is pushed back (flows/runner.py).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow

from culbot.flows.runner import existing, existing_run, run_stage
from culbot.pipeline_config.train_schema import load_train_profile
from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import EvalOutput, PublishOutput, RunOutput, StageOutput, short_hash
from culbot.tasks.evaluate import eval_task, questions_hash, release_key
from culbot.tasks.merge_adapter import merge_adapter_task
from culbot.tasks.publish import publish_task
from culbot.tasks.run_folder import EVAL
from culbot.tasks.tokenize_data import tokenize_task
from culbot.tasks.train import train_task


def _setup(artifact_root: str | None, train_profile: str, train_overrides: list[str] | None, force: bool):
    """Every stage flow starts the same way: the resolved training profile and the stage runner with its root."""
    root = _artifact_root.configured(artifact_root)
    return root, load_train_profile(train_profile, train_overrides or []), partial(run_stage, force=force, root=root)


def _train_run_name() -> str:
    """train-<profile>-<dataset hash>: what ran, on what data."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    m = _store.read_manifest(Path(p["formatted"]))
    data = m.lineage.dataset if m and m.lineage.dataset else Path(p["formatted"]).name
    return f"train-{Path(p.get('train_profile', 'cpu-tiny')).stem}-{short_hash(data)}"


# persist_result: the parent `culbot` run reads this result, possibly from another host's result storage.
@flow(name="train-stage", flow_run_name=_train_run_name, persist_result=True)
def train_stage(formatted: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False,
                artifact_root: str | None = None) -> RunOutput:
    """Tokenize a formatted dataset folder (artifacts/formatted/<hash>) and train an adapter on it."""
    root, tp, stage = _setup(artifact_root, train_profile, train_overrides, force)
    tokenized = stage(tokenize_task, tp=tp, formatted=existing(formatted, root))
    return stage(train_task, tp=tp, tokenized=tokenized.ref())


@flow(name="eval-stage", flow_run_name="eval-{train_profile}")
def eval_stage(run_dir: str, index_dir: str | None = None, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None,
               force: bool = False, artifact_root: str | None = None, dataset_dir: str | None = None) -> EvalOutput:
    """Evaluate a finished run folder (artifacts/runs/<run>): loss, retrieval over an index folder (artifacts/indexes/<hash>) when
    given, and answer quality on the validation questions of a dataset version (artifacts/datasets/<hash>; default: the run's)."""
    root, tp, stage = _setup(artifact_root, train_profile, train_overrides, force)
    run = existing_run(run_dir, root)
    return stage(eval_task, spec=tp.eval, run=run, index=existing(index_dir, root) if index_dir else None,
                 questions=questions_hash(tp.eval), answer=tp.answer, dataset=existing(dataset_dir, root) if dataset_dir else None,
                 publish=tp.publish, baseline=release_key(tp.publish, run.run_dir.name))


@flow(name="merge-adapter-stage", flow_run_name="merge-adapter-{train_profile}")
def merge_adapter_stage(run_dir: str, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None, force: bool = False,
                        artifact_root: str | None = None) -> StageOutput:
    """Merge an evaluated run's adapter into its base model."""
    root, tp, stage = _setup(artifact_root, train_profile, train_overrides, force)
    return stage(merge_adapter_task, spec=tp.merge_adapter, run=existing_run(run_dir, root), evaluation=existing(Path(run_dir) / EVAL, root),
                 models_root=Path(tp.artifacts_root).resolve() / "models", probes=tp.eval.probes)


@flow(name="publish-stage", flow_run_name="publish-{train_profile}")
def publish_stage(run_dir: str, model_dir: str | None = None, train_profile: str = "cpu-tiny", train_overrides: list[str] | None = None,
                  force: bool = False, artifact_root: str | None = None) -> PublishOutput:
    """Publish a run (and its merged model) to the configured target; refused unless guards and eval passed."""
    root, tp, stage = _setup(artifact_root, train_profile, train_overrides, force)
    return stage(publish_task, spec=tp.publish, run=existing_run(run_dir, root), model=existing(model_dir, root) if model_dir else None,
                 evaluation=existing(Path(run_dir) / EVAL, root))
