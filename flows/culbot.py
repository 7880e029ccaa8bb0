"""The `culbot` flow: data refresh -> train -> eval gate -> merge -> publish.

Run as: culbot run full [--profile sample] [--train-profile cpu-tiny] [--set ...] [--train-set ...] [--force]

With the defaults it is the embedded end-to-end run: shipped samples, the tiny
GPT-NeoX on CPU, and a local publish folder, with no keys and no network.

On a Prefect server, training goes to the GPU pool of the training profile: the flow
starts the deployment `train-stage/train-<profile>` with `run_deployment`, waits for
it and goes on with its outputs. Cancelling this flow run cancels that child run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from culbot.flows.data_refresh import data_refresh, ref, run_stage
from culbot.pipeline_config.train_schema import TrainProfile, load_train_profile
from culbot.tasks import artifact_root as _artifact_root
from culbot.tasks.release_tasks import eval_task, merge_adapter_task, publish_task, train_task
from culbot.tasks.train import TrainingFailed


class EvalGateFailed(RuntimeError):
    """The trained model did not pass eval; nothing is merged or published."""


Stage = Literal["format", "train", "eval", "merge", "publish"]
TrainOn = Literal["auto", "pool", "here"]
CHILD_TAG = "culbot-parent:"  # + parent flow run id; how the cancellation hook finds the children


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


def train_on_pool(tp: TrainProfile, train_profile: str, train_overrides: list[str], formatted: dict, force: bool,
                  root: str | None) -> dict:
    """Start the training deployment on the profile's pool, wait, and return its result (pulled here if needed).

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
        parameters={"formatted": formatted["path"], "train_profile": train_profile, "train_overrides": train_overrides,
                    "force": force, "artifact_root": root},
        idempotency_key=f"{flow_run.id}:train",  # a retried parent finds its child instead of starting another
        tags=[f"{CHILD_TAG}{flow_run.id}"],
        job_variables={"env": env},
        poll_interval=2,
    )
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise TrainingFailed(f"training run {child.name} ({child.id}) ended {state}: {child.state.message if child.state else ''}")
    result = child.state.result()
    if root and not Path(result["path"]).is_dir():
        _artifact_root.pull_run(Path(result["run_dir"]), root)
    return result


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


def _rename_run(profile: str, train_profile: str, dataset_hash: str, to_stage: str) -> None:
    """Run names say what ran: training profile and dataset hash prefix (known only after the data refresh)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=f"culbot-{profile}-{train_profile}-{dataset_hash[:8]}-to-{to_stage}")


@flow(name="culbot", flow_run_name="culbot-{profile}-{train_profile}-to-{to_stage}", on_cancellation=[cancel_child_runs])
def culbot(profile: str = "sample", train_profile: str = "cpu-tiny", overrides: list[str] | None = None,
           train_overrides: list[str] | None = None, to_stage: Stage = "publish", force: bool = False,
           train_on: TrainOn = "auto", artifact_root: str | None = None) -> dict:
    """The whole chain, or its beginning up to `to_stage`.

    Args:
        profile: data profile (pipeline_config/<name>.yaml or a path).
        train_profile: training profile (pipeline_config/profiles/<name>.yaml or a path): a6000x4, runpod-a100x2, gcp-l4, cpu-tiny.
        overrides: `section.field=value` settings for the data profile.
        train_overrides: `section.field=value` settings for the training profile (e.g. publish.target=hub).
        to_stage: last stage to run: format (the data refresh only), train, eval, merge or publish.
        force: ignore every cache and rebuild each stage (training still resumes from its checkpoints).
        train_on: 'pool': the training deployment on the profile's work pool; 'here': in this process;
            'auto': the pool when this run came from a deployment and the training deployment exists.
        artifact_root: fsspec URL shared by all hosts (default $CULBOT_ARTIFACT_ROOT; unset: local disk only).
    """
    log = get_run_logger()
    root = _artifact_root.configured(artifact_root)
    tp = load_train_profile(train_profile, train_overrides or [])
    data = data_refresh(profile=profile, overrides=overrides, force=force, artifact_root=root)
    dataset_hash = data["dataset"]["content_hash"]
    _rename_run(Path(profile).stem, tp.name, dataset_hash, to_stage)
    result: dict = {"data": data, "run": None, "eval": None, "model": None, "publish": None}
    if to_stage == "format":
        return result
    if choose_train_on(train_on, tp) == "pool":
        run = train_on_pool(tp, train_profile, train_overrides or [], data["formatted"], force, root)
    else:
        run = run_stage(train_task, force, root, profile=tp.model_dump(mode="json"), formatted=ref(data["formatted"]))
        if root:
            _artifact_root.push_run(Path(run["run_dir"]), root)
    result["run"] = run
    run_ref = {**ref(run), "run_dir": run["run_dir"]}
    if to_stage == "train":
        return result
    ev = result["eval"] = run_stage(eval_task, force, root, run=run_ref, spec=tp.eval.model_dump(mode="json"))
    if ev["counts"]["status"] != "passed":
        raise EvalGateFailed(f"eval gate failed for {run['run_dir']}: validation loss {ev['counts']['eval_loss']}; not merging or publishing")
    if to_stage == "eval":
        return result
    model = None
    if tp.publish.what in ("merged", "both") or to_stage == "merge":
        model = result["model"] = run_stage(merge_adapter_task, force, root, run=run_ref, spec=tp.merge.model_dump(mode="json"),
                                            models_root=str(Path(tp.artifacts_root).resolve() / "models"), probes=tp.eval.probes)
    if to_stage == "merge":
        return result
    pub = result["publish"] = run_stage(publish_task, force, root, run=run_ref, model=ref(model) if model else None,
                                        spec=tp.publish.model_dump(mode="json"), evaluation=ref(ev))
    if root:  # eval report, merged model and publish record, for whoever reruns a stage elsewhere
        _artifact_root.push_run(Path(run["run_dir"]), root)
        if model:
            _artifact_root.push(Path(model["path"]), root)
    log.info("run %s: eval loss %.4f; published %s", Path(run["run_dir"]).name, ev["counts"]["eval_loss"], pub["path"])
    return result
