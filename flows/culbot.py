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
import time
import os
from functools import partial
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from culbot.flows.deployed import check_version
from culbot.flows.params import DataOverrides, DataProfileName, Stage, TrainOn, TrainOverrides, TrainProfileName, profile_kwargs, profile_source

from culbot.flows.data_refresh import data_refresh
from culbot.flows.runner import exclusive, full_lock, pulled, run_stage, verified
from culbot.flows.summary import CHILD_TAG, write_summary
from culbot.pipeline_config.schema import load_data_profile
from culbot.pipeline_config.train_schema import TrainProfile, load_train_profile
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import ChainResult, RunOutput, StageRef, short_hash
from culbot.tasks.evaluate import eval_task
from culbot.tasks.merge_adapter import merge_adapter_task
from culbot.tasks.publish import publish_task
from culbot.tasks.tokenize_data import tokenize_task
from culbot.tasks.train import TrainingFailed, train_task


class EvalGateFailed(RuntimeError):
    """The trained model did not pass eval; nothing is merged or published."""




def train_deployment_name(tp: TrainProfile) -> str:
    return f"train-stage/train-{tp.name}"


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def choose_train_on(train_on: TrainOn, tp: TrainProfile) -> Literal["pool", "here"]:
    """'auto': the GPU pool's deployment when this run itself came from a deployment and that one exists."""
    from prefect.runtime import deployment

    if train_on != "auto":
        if train_on == "pool" and not _deployment_exists(train_deployment_name(tp)):
            raise RuntimeError(f"train_on='pool' but deployment {train_deployment_name(tp)!r} does not exist; run `culbot deploy`")
        return train_on
    return "pool" if deployment.id and _deployment_exists(train_deployment_name(tp)) else "here"


def train_on_pool(tp: TrainProfile, train_profile: str, train_overrides: dict, formatted: StageRef, force: bool,
                  root: str | None) -> RunOutput:
    """Start the training deployment on the profile's pool, wait, and return its output (pulled here if needed).

    The child names itself (train-<profile>-<dataset hash>, in flows/stages.py).
    """
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    log = get_run_logger()
    name = train_deployment_name(tp)
    # Flow-run job variables replace the pool's default env, so the shared settings are passed on too.
    shared = {k: os.environ[k] for k in (_artifact_root.ENV, "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK") if os.environ.get(k)}
    env = tp.run_env() | shared | ({_artifact_root.ENV: root} if root else {})
    log.info("training on pool %s through %s (job env %s)", tp.hardware.work_pool, name, sorted(env))
    child = run_deployment(
        name,
        parameters={"formatted": str(formatted.path), **profile_kwargs(train_profile=train_profile), "train_overrides": train_overrides,
                    "force": force, "artifact_root": root or ""},
        idempotency_key=f"{flow_run.id}:train",  # a retried parent finds its child instead of starting another
        tags=[f"{CHILD_TAG}{flow_run.id}"],
        job_variables={"env": env},
        timeout=0,   # start it and return: the wait below says how it goes
    )
    child = wait_for_training(child, log)
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise TrainingFailed(f"training run {child.name} ({child.id}) ended {state}: {child.state.message if child.state else ''}")
    run: RunOutput = child.state.result()
    if not verified(run) and not pulled(run, root):
        raise TrainingFailed(f"training run {child.name} completed, but its run {run.run_dir} is neither on this host nor in the artifact root")
    return run


def _newest_step_line(client, flow_run_id) -> str | None:
    """The training run's newest step line (with its elapsed time and ETA, tasks/train.py), as its logs have it."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_DESC, limit=50)
    return next((x.message for x in logs if x.name == "culbot.train" and x.message.startswith("step ")), None)


def wait_for_training(child, log, every_s: float = 60.0, poll_s: float = 2.0):
    """Wait for the training run to end; say where it is in the UI at once, then every ``every_s`` its state and newest
    step line, so the parent's log is not silent for the hours of a GPU run. Returns the ended run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    log.info("training run %s started: %s", child.name, f"{ui.rstrip('/')}/runs/flow-run/{child.id}" if ui else f"flow run id {child.id}")
    t0 = said = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            child = client.read_flow_run(child.id)
            if child.state is not None and child.state.is_final():
                return child
            if time.monotonic() - said >= every_s:
                said = time.monotonic()
                state = child.state.name if child.state else "not started"
                log.info("training run %s: %s after %.0f min; %s", child.name, state, (said - t0) / 60,
                         _newest_step_line(client, child.id) or "no step logged yet")
            time.sleep(poll_s)


def cancel_child_runs(flow, flow_run, state) -> None:
    """on_cancellation hook: cancel the training runs this flow run started (Prefect does not cascade it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"{CHILD_TAG}{flow_run.id}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))))
        for child in children:
            # A run not yet started has no process to stop; a running one is stopped by its worker.
            new = Cancelling if child.state and child.state.type in (StateType.RUNNING, StateType.PAUSED) else Cancelled
            client.set_flow_run_state(child.id, new(message=f"parent flow run {flow_run.name} was cancelled"), force=True)


def _rename_run(data_profile: str, train_profile: str, dataset_hash: str, to_stage: str) -> None:
    """Run names say what ran: training profile and dataset hash (known only after the data refresh)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=f"culbot-{data_profile}-{train_profile}-{short_hash(dataset_hash)}-to-{to_stage}")


@flow(name="culbot", flow_run_name="culbot-{data_profile}-{train_profile}-to-{to_stage}", on_cancellation=[cancel_child_runs])
def culbot(data_profile: DataProfileName = "sample", train_profile: TrainProfileName = "cpu-tiny", data_overrides: DataOverrides = {},
           train_overrides: TrainOverrides = {}, to_stage: Stage = "publish", force: bool = False, train_on: TrainOn = "auto",
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
           to_stage: Stage, force: bool, train_on: TrainOn, artifact_root: str) -> ChainResult:
    root = _artifact_root.configured(artifact_root)
    stage = partial(run_stage, force=force, root=root)
    data = data_refresh(data_profile=data_profile, data_profile_file=data_profile_file, data_overrides=data_overrides, force=force,
                        artifact_root=root or "")
    _rename_run(Path(data_profile_file or data_profile).stem, tp.name, data.dataset.content_hash, to_stage)
    if to_stage == "format":
        return ChainResult(data=data)
    tokenized = None
    if choose_train_on(train_on, tp) == "pool":
        run = train_on_pool(tp, train_profile, train_overrides, data.formatted.ref(), force, root)
    else:
        tokenized = stage(tokenize_task, tp=tp, formatted=data.formatted.ref())
        run = stage(train_task, tp=tp, tokenized=tokenized.ref())
    if to_stage == "train":
        return ChainResult(data=data, tokenized=tokenized, run=run)
    ev = stage(eval_task, spec=tp.eval, run=run.ref(), index=data.index.ref() if data.index else None, answer=tp.answer,
               dataset=data.dataset.ref(), publish=tp.publish)
    if not ev.passed:
        raise EvalGateFailed(f"eval gate failed for {run.run_dir}: {ev.reason}; not merging or publishing")
    if to_stage == "eval":
        return ChainResult(data=data, tokenized=tokenized, run=run, eval=ev)
    model = None
    if tp.publish.what in ("merged", "both") or to_stage == "merge-adapter":
        model = stage(merge_adapter_task, spec=tp.merge_adapter, run=run.ref(), evaluation=ev.ref(),
                      models_root=Path(tp.artifacts_root).resolve() / "models", probes=tp.eval.probes)
    if to_stage == "merge-adapter":
        return ChainResult(data=data, tokenized=tokenized, run=run, eval=ev, model=model)
    pub = stage(publish_task, spec=tp.publish, run=run.ref(), model=model.ref() if model else None, evaluation=ev.ref())
    get_run_logger().info("run %s: eval loss %.4f; published %s", run.run_dir.name, ev.eval_loss, pub.path)
    return ChainResult(data=data, tokenized=tokenized, run=run, eval=ev, model=model, publish=pub)
