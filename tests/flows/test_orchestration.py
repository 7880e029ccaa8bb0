"""Dispatch of training and cancellation of child runs, against the Prefect API of the test harness."""
import pytest


def test_cancelling_the_parent_cancels_only_its_live_training_runs(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed, Running, Scheduled

    from culbot.flows.culbot import culbot
    from culbot.flows.pool import CHILD_TAG, cancel_child_runs

    @flow(name="culbot-hook-test")
    def stand_in():
        pass

    assert cancel_child_runs in culbot.on_cancellation_hooks
    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(stand_in, name="parent")
        mine = [f"{CHILD_TAG}{parent.id}"]
        running = client.create_flow_run(stand_in, name="train-running", tags=mine, state=Running())
        waiting = client.create_flow_run(stand_in, name="train-scheduled", tags=mine, state=Scheduled())
        finished = client.create_flow_run(stand_in, name="train-done", tags=mine, state=Completed())
        someone_elses = client.create_flow_run(stand_in, name="other", tags=[f"{CHILD_TAG}00000000-0000-0000-0000-000000000000"], state=Running())

        cancel_child_runs(culbot, parent, None)

        def state(run):
            return client.read_flow_run(run.id).state

        assert state(running).type == StateType.CANCELLING  # its worker stops the process
        assert state(waiting).type == StateType.CANCELLED  # nothing started yet
        assert "parent flow run parent was cancelled" in state(waiting).message
        assert state(finished).type == StateType.COMPLETED
        assert state(someone_elses).type == StateType.RUNNING


def test_training_runs_here_without_a_deployment_and_pool_needs_one(prefect_harness):
    from culbot.flows.pool import choose_train_on, train_deployment_name
    from culbot.pipeline_config.train_schema import load_train_profile

    tp = load_train_profile("cpu-tiny")
    assert train_deployment_name(tp) == "train-stage/train-cpu-tiny"
    assert choose_train_on("auto", tp) == "here"  # not started from a deployment
    assert choose_train_on("here", tp) == "here"
    with pytest.raises(RuntimeError, match="deployment 'train-stage/train-cpu-tiny' does not exist; run `culbot deploy`"):
        choose_train_on("pool", tp)


def test_job_environment_names_devices_cache_and_project_but_no_secret(monkeypatch):
    from culbot.pipeline_config.train_schema import load_train_profile

    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-never-forwarded")
    env = load_train_profile("runpod-a100x2").run_env()
    assert env == {"WANDB_PROJECT": "culbot", "CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/workspace/hf-cache"}
    assert load_train_profile("a6000x4").run_env()["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert load_train_profile("cpu-tiny").run_env() == {"WANDB_PROJECT": "culbot"}
