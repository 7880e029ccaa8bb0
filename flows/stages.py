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

from culbot.flows.deployed import check_pool, check_version
from culbot.flows.params import TrainOverrides, TrainProfileName, profile_source
from culbot.flows.runner import existing, existing_run, run_stage
from culbot.pipeline_config.loader import DEFAULT_TRAIN_PROFILE
from culbot.pipeline_config.train_schema import load_train_profile
from culbot.tasks import _store
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import EvalOutput, PublishOutput, RunOutput, StageOutput, short_hash
from culbot.tasks.eval import eval_task
from culbot.tasks.merge_adapter import merge_adapter_task
from culbot.tasks.publish import publish_task
from culbot.tasks.run_folder import EVAL
from culbot.tasks.tokenize import tokenize_task
from culbot.tasks.train import train_task


TRAIN_ARGS = """
        train_overrides: Training profile fields to change for this run, field name to value, e.g. {"eval.max_new_tokens": 32}.
        force: Ignore the stage's cache and run it again.
        artifact_root: fsspec URL every host shares (empty: $CULBOT_ARTIFACT_ROOT, else local disk only); a folder
            this host lacks is pulled from it.
        train_profile_file: A custom training profile, as a YAML path on the worker; replaces train_profile when given.
"""


def _with_train_args(fn):
    """Append the arguments every stage flow shares to its docstring's Args, which Prefect shows in the run form."""
    fn.__doc__ = fn.__doc__.rstrip() + TRAIN_ARGS
    return fn


def _setup(artifact_root: str, train_profile: str, train_profile_file: str, train_overrides: dict, force: bool):
    """Every stage flow starts the same way: the version check, the resolved training profile and the stage runner with its root."""
    check_version()
    root = _artifact_root.configured(artifact_root)
    tp = load_train_profile(profile_source(train_profile, train_profile_file, "train_profile"), train_overrides)
    return root, tp, partial(run_stage, force=force, root=root)


def _train_run_name() -> str:
    """train-<profile>-<dataset hash>: what ran, on what data."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    m = _store.read_manifest(Path(p["formatted"]))
    data = m.lineage.dataset if m and m.lineage.dataset else Path(p["formatted"]).name
    return f"train-{Path(p.get('train_profile_file') or p.get('train_profile', 'cpu-tiny')).stem}-{short_hash(data)}"


# persist_result: the parent `culbot` run reads this result, possibly from another host's result storage.
@flow(name=f"{train_task.name}-stage", flow_run_name=_train_run_name, persist_result=True)
@_with_train_args
def train_stage(formatted: str, train_profile: TrainProfileName = DEFAULT_TRAIN_PROFILE, train_overrides: TrainOverrides = {}, force: bool = False,
                artifact_root: str = "", train_profile_file: str = "") -> RunOutput:
    """Tokenize a formatted dataset and train an adapter on it, on the profile's work pool.

    Args:
        formatted: A formatted dataset folder, artifacts/formatted/HASH (the data-refresh run's summary names it).
        train_profile: Training profile shipped in pipeline_config/profiles. A GPU deployment pins it: each pool has its own.
    """
    root, tp, stage = _setup(artifact_root, train_profile, train_profile_file, train_overrides, force)
    check_pool(tp.name, tp.hardware.work_pool)
    tokenized = stage(tokenize_task, tp=tp, formatted=existing(formatted, root))
    return stage(train_task, tp=tp, tokenized=tokenized.ref())


@flow(name=f"{eval_task.name}-stage", flow_run_name="eval-{train_profile}")
@_with_train_args
def eval_stage(run_dir: str, index_dir: str = "", train_profile: TrainProfileName = DEFAULT_TRAIN_PROFILE, train_overrides: TrainOverrides = {},
               force: bool = False, artifact_root: str = "", dataset_dir: str = "", train_profile_file: str = "") -> EvalOutput:
    """Evaluate a finished training run: loss, retrieval, answer quality against the last release, and the gate.

    Args:
        run_dir: The run folder to evaluate, artifacts/runs/PROFILE-ID (the training run's summary and logs name it).
        index_dir: A retrieval index folder, artifacts/indexes/HASH, for retrieval metrics and answers with retrieval (empty: none).
        train_profile: Training profile shipped in pipeline_config/profiles: its eval, merge and publish settings apply.
        dataset_dir: The dataset version whose validation questions are answered, artifacts/datasets/HASH (empty: the run's own).
    """
    root, tp, stage = _setup(artifact_root, train_profile, train_profile_file, train_overrides, force)
    run = existing_run(run_dir, root, tp.name, "eval")
    return stage(eval_task, spec=tp.eval, run=run, index=existing(index_dir, root) if index_dir else None,
                 answer=tp.answer, dataset=existing(dataset_dir, root) if dataset_dir else None, publish=tp.publish)


@flow(name=f"{merge_adapter_task.name}-stage", flow_run_name="merge-adapter-{train_profile}")
@_with_train_args
def merge_adapter_stage(run_dir: str, train_profile: TrainProfileName = DEFAULT_TRAIN_PROFILE, train_overrides: TrainOverrides = {}, force: bool = False,
                        artifact_root: str = "", train_profile_file: str = "") -> StageOutput:
    """Merge an evaluated run's adapter into its base model, checked against the unmerged model's logits.

    Args:
        run_dir: An evaluated run folder, artifacts/runs/PROFILE-ID.
        train_profile: Training profile shipped in pipeline_config/profiles: its eval, merge and publish settings apply.
    """
    root, tp, stage = _setup(artifact_root, train_profile, train_profile_file, train_overrides, force)
    return stage(merge_adapter_task, spec=tp.merge_adapter, run=existing_run(run_dir, root, tp.name, "merge-adapter"),
                 evaluation=existing(Path(run_dir) / EVAL, root), models_root=tp.models_root.resolve(), probes=tp.eval.probes)


@flow(name=f"{publish_task.name}-stage", flow_run_name="publish-{train_profile}")
@_with_train_args
def publish_stage(run_dir: str, model_dir: str = "", train_profile: TrainProfileName = DEFAULT_TRAIN_PROFILE, train_overrides: TrainOverrides = {},
                  force: bool = False, artifact_root: str = "", train_profile_file: str = "") -> PublishOutput:
    """Publish a run (and its merged model) to the profile's target; refused unless its guards and eval passed.

    Args:
        run_dir: An evaluated run folder, artifacts/runs/PROFILE-ID.
        model_dir: Its merged model, artifacts/models/NAME (empty: the adapter only).
        train_profile: Training profile shipped in pipeline_config/profiles: its eval, merge and publish settings apply.
    """
    root, tp, stage = _setup(artifact_root, train_profile, train_profile_file, train_overrides, force)
    return stage(publish_task, spec=tp.publish, run=existing_run(run_dir, root, tp.name, "publish"), model=existing(model_dir, root) if model_dir else None,
                 evaluation=existing(Path(run_dir) / EVAL, root))
