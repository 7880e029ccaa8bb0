"""The `culbot` flow: data refresh (with the retrieval index) -> tokenize -> train -> eval gate -> merge-adapter -> publish.

Run as: culbot run full [--data-profile sample] [--train-profile cpu-tiny] [--set ...] [--train-set ...] [--force]

With the defaults it is the embedded end-to-end run: shipped samples, the tiny
GPT-NeoX on CPU, and a local publish folder, with no keys and no network.

On a Prefect server, tokenize and train go to the GPU pool of the training profile: the flow
starts the deployment `train-stage/train-<profile>` with `run_deployment`, waits for it and
goes on with its outputs. Cancelling this flow run cancels that child run.
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from culbot.flows.data_refresh import data_refresh
from culbot.flows.deployed import check_version
from culbot.flows.params import DataOverrides, DataProfileName, TrainOn, TrainOverrides, TrainProfileName, profile_source
from culbot.flows.pool import cancel_child_runs, choose_train_on, rename_run, train_on_pool
from culbot.flows.runner import exclusive, full_lock, run_stage
from culbot.flows.summary import write_summary
from culbot.pipeline_config.loader import DEFAULT_DATA_PROFILE, DEFAULT_TRAIN_PROFILE
from culbot.pipeline_config.schema import load_data_profile
from culbot.pipeline_config.train_schema import TrainProfile, load_train_profile
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks import eval as eval_stage, format as format_stage, merge_adapter, publish as publish_stage, train as train_stage
from culbot.tasks.contracts import ChainResult
from culbot.tasks.eval import eval_task
from culbot.tasks.merge_adapter import merge_adapter_task
from culbot.tasks.publish import publish_task
from culbot.tasks.tokenize import tokenize_task
from culbot.tasks.train import train_task

# Where the chain can stop, in order: the data refresh ends with format (tokenize goes with train).
STAGES = tuple(m.STAGE.name for m in (format_stage, train_stage, eval_stage, merge_adapter, publish_stage))
ToStage = Literal[STAGES]   # type: ignore[valid-type]   # the to_stage dropdown of the deployment form


class EvalGateFailed(RuntimeError):
    """The trained model did not pass eval; nothing is merged or published."""


@flow(name="culbot", flow_run_name="culbot-{data_profile}-{train_profile}-to-{to_stage}", on_cancellation=[cancel_child_runs])
def culbot(data_profile: DataProfileName = DEFAULT_DATA_PROFILE, train_profile: TrainProfileName = DEFAULT_TRAIN_PROFILE, data_overrides: DataOverrides = {},
           train_overrides: TrainOverrides = {}, to_stage: ToStage = "publish", force: bool = False, train_on: TrainOn = "auto",
           artifact_root: str = "", data_profile_file: str = "", train_profile_file: str = "") -> ChainResult:
    """The whole chain, or its beginning up to `to_stage`.

    Args:
        data_profile: Data profile shipped in pipeline_config: sample (the shipped samples, no network), sample-mixed
            (plus ShareGPT conversations) or production (univ100, the CBNU site, gpt-3.5-turbo, KULLM-v2 from the Hub).
        train_profile: Training profile shipped in pipeline_config/profiles; its hardware names the GPU work pool that trains.
        data_overrides: Data profile fields to change for this run, field name to value, e.g. {"qa.max_in_flight": 4}
            (`culbot config docs` lists every field).
        train_overrides: Training profile fields to change for this run, e.g. {"train.max_steps": 200, "publish.target": "hub"}.
        to_stage: Last stage to run: format (the data refresh only), train, eval, merge-adapter or publish.
        force: Ignore every cache and rebuild each stage (training still resumes from its checkpoints).
        train_on: Where training runs. pool: the training deployment on the profile's work pool; here: in this flow
            run's process; auto: the pool when this run came from a deployment and the training deployment exists.
        artifact_root: fsspec URL every host shares, e.g. s3://bucket/culbot (empty: $CULBOT_ARTIFACT_ROOT, else local disk only).
        data_profile_file: A custom data profile, as a YAML path on the worker; replaces data_profile when given.
        train_profile_file: A custom training profile, as a YAML path on the worker; replaces train_profile when given.
    """
    check_version()
    train_source = profile_source(train_profile, train_profile_file, "train_profile")
    tp = load_train_profile(train_source, train_overrides)
    load_data_profile(profile_source(data_profile, data_profile_file, "data_profile"), data_overrides)   # bad values fail here, before any stage
    result = error = None
    try:
        with exclusive(full_lock(tp.name)) if to_stage != "format" else contextlib.nullcontext():
            result = _chain(tp, data_profile, data_profile_file, train_source, data_overrides, train_overrides, to_stage, force,
                            train_on, artifact_root)
        return result
    except Exception as e:
        error = e
        raise
    finally:   # what ran and where each stage's artifacts are, on this run's page, also when it failed
        write_summary("culbot-summary", f"culbot {Path(data_profile_file or data_profile).stem} → {tp.name}, to {to_stage}", result, error)


def _chain(tp: TrainProfile, data_profile: str, data_profile_file: str, train_profile: str, data_overrides: dict, train_overrides: dict,
           to_stage: ToStage, force: bool, train_on: TrainOn, artifact_root: str) -> ChainResult:
    """One line per stage, each taking the chain so far and returning it with its output; to_stage ends it."""
    root = _artifact_root.configured(artifact_root)
    stage = partial(run_stage, force=force, root=root)

    def data(c: ChainResult) -> ChainResult:
        refreshed = data_refresh(data_profile=data_profile, data_profile_file=data_profile_file, data_overrides=data_overrides,
                                 force=force, artifact_root=root or "")
        rename_run(Path(data_profile_file or data_profile).stem, tp.name, refreshed.dataset.content_hash, to_stage)
        return ChainResult(data=refreshed)

    def train(c: ChainResult) -> ChainResult:
        if choose_train_on(train_on, tp) == "pool":
            return c.model_copy(update={"run": train_on_pool(tp, train_profile, train_overrides, c.data.formatted.ref(), force, root)})
        tokenized = stage(tokenize_task, tp=tp, formatted=c.data.formatted.ref())
        return c.model_copy(update={"tokenized": tokenized, "run": stage(train_task, tp=tp, tokenized=tokenized.ref())})

    def evaluate(c: ChainResult) -> ChainResult:
        ev = stage(eval_task, spec=tp.eval, run=c.run.ref(), index=c.data.index.ref() if c.data.index else None, answer=tp.answer,
                   dataset=c.data.dataset.ref(), publish=tp.publish)
        if not ev.passed:
            raise EvalGateFailed(f"eval gate failed for {c.run.run_dir}: {ev.reason}; not merging or publishing")
        return c.model_copy(update={"eval": ev})

    def merge(c: ChainResult) -> ChainResult:
        if tp.publish.what == "adapter" and to_stage != "merge-adapter":
            return c
        return c.model_copy(update={"model": stage(merge_adapter_task, spec=tp.merge_adapter, run=c.run.ref(), evaluation=c.eval.ref(),
                                                   models_root=tp.models_root.resolve(), probes=tp.eval.probes)})

    def publish(c: ChainResult) -> ChainResult:
        pub = stage(publish_task, spec=tp.publish, run=c.run.ref(), model=c.model.ref() if c.model else None, evaluation=c.eval.ref())
        get_run_logger().info("run %s: eval loss %.4f; published %s", c.run.run_dir.name, c.eval.eval_loss, pub.path)
        return c.model_copy(update={"publish": pub})

    chain = None
    for name, step in zip(STAGES, (data, train, evaluate, merge, publish)):
        chain = step(chain)
        if name == to_stage:
            break
    return chain
