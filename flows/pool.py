"""Prefect client plumbing of the `culbot` flow: the training deployment on a GPU pool (start, wait with progress, the
result pulled here), cancelling the children of a cancelled run, and naming a run once its dataset is known."""
from __future__ import annotations

import os
import time
from typing import Literal

from prefect import get_run_logger

from culbot.flows.params import TrainOn, profile_kwargs
from culbot.flows.runner import pulled, verified
from culbot.flows.summary import CHILD_TAG
from culbot.pipeline_config.train_schema import TrainProfile
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.contracts import RunOutput, StageRef, short_hash
from culbot.tasks.train import TrainingFailed


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


def rename_run(data_profile: str, train_profile: str, dataset_hash: str, to_stage: str) -> None:
    """Run names say what ran: training profile and dataset hash (known only after the data refresh)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=f"culbot-{data_profile}-{train_profile}-{short_hash(dataset_hash)}-to-{to_stage}")
