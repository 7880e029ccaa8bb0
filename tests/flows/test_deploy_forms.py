"""What a deployment's run form offers (the flows' parameter schemas), the pinned training profile, the version a worker
checks, and the git pull steps. The real server's side is in tests/flows/test_deploy_smoke.py."""
import subprocess
import sys

import pytest

from culbot.pipeline_config.loader import ConfigError, overrides_dict
from culbot.pipeline_config.schema import data_profiles
from culbot.pipeline_config.train_schema import train_profiles


def _schema(flow) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow).model_dump()


def test_every_parameter_of_every_deployed_flow_is_described_and_profiles_are_choices():
    from culbot.flows.culbot import culbot
    from culbot.flows.data_refresh import data_refresh
    from culbot.flows.stages import eval_stage, merge_adapter_stage, publish_stage, train_stage

    for flow in (culbot, data_refresh, train_stage, eval_stage, merge_adapter_stage, publish_stage):
        props = _schema(flow)["properties"]
        for name, p in props.items():
            assert p.get("description"), (flow.name, name)
            assert "<" not in p["description"], (flow.name, name)   # the UI's markdown swallowed "<name>"
            assert "anyOf" not in p, (flow.name, name)                # no value/None toggles
        for name in ("data_profile", "train_profile"):
            if name in props:
                shipped = [x.stem for x in (data_profiles() if name == "data_profile" else train_profiles())]
                assert props[name]["enum"] == shipped and f"{name}_file" in props
    refresh = _schema(data_refresh)["properties"]
    assert set(refresh) == {"data_profile", "data_overrides", "force", "artifact_root", "data_profile_file"}   # nothing of training
    over = _schema(culbot)["properties"]["train_overrides"]
    assert over["type"] == "object" and {"train.max_steps", "publish.target", "eval.max_eval_loss"} <= set(over["propertyNames"]["enum"])
    assert "train" not in over["propertyNames"]["enum"]   # fields, not sections


def test_a_misspelt_override_fails_before_any_stage_and_a_bad_value_names_the_field(prefect_harness, tmp_path):
    from culbot.flows.data_refresh import data_refresh

    state = data_refresh(data_overrides={"qa.max_inflight": 4}, return_state=True)
    assert state.is_failed() and "qa.max_inflight" in state.message
    with pytest.raises(ConfigError, match=r"override qa.max_in_flight: field 'qa.max_in_flight': Input should be greater than or equal to 1"):
        data_refresh(data_overrides={"qa.max_in_flight": 0})
    assert overrides_dict(["qa.max_in_flight=8", "cbnu.seeds=[a, b]"]) == {"qa.max_in_flight": 8, "cbnu.seeds": ["a", "b"]}


def test_a_training_deployment_pins_its_profile():
    from culbot.flows.deploy import pin_parameters
    from culbot.flows.stages import train_stage

    schema = pin_parameters(_schema(train_stage), {"train_profile": "a6000x4"}, ("train_profile",))
    assert schema["properties"]["train_profile"]["enum"] == ["a6000x4"] and schema["properties"]["train_profile"]["default"] == "a6000x4"
    assert "train_profile_file" not in schema["properties"] and "Pinned to a6000x4" in schema["properties"]["train_profile"]["description"]
    assert "train_profile_file" in _schema(train_stage)["properties"]   # the flow's own schema is not changed


def test_the_version_is_the_same_for_the_same_files_and_changes_with_any_of_them(tmp_path, monkeypatch):
    """One code identity: deployments, manifests and the chain record all use _store.code_version."""
    import culbot.flows.deployed as deployed
    from culbot.tasks import _store

    v = deployed.culbot_version()
    assert v.startswith("0.1.0+src.") and len(v.split("+src.")[1]) == 12 and v == _store.code_version()
    # a copy of the package's files (what a wheel installs) has the same version; an edited profile changes it
    import shutil

    dirs = []
    for d in _store.package_dirs():
        shutil.copytree(d, tmp_path / d.name, ignore=shutil.ignore_patterns("__pycache__"))
        dirs.append(tmp_path / d.name)
    monkeypatch.setattr(_store, "package_dirs", lambda: dirs)
    monkeypatch.setattr(_store, "_CODE_VERSION", None)
    assert deployed.culbot_version() == v
    (tmp_path / "pipeline_config" / "profiles" / "a6000x4.yaml").write_text("# edited\n", encoding="utf-8")
    monkeypatch.setattr(_store, "_CODE_VERSION", None)
    assert deployed.culbot_version() != v


def test_git_pull_steps_check_out_the_deployed_commit_and_install_it(tmp_path):
    """The steps `culbot deploy --git-clone` sets, run by Prefect's own step runner against a local repository."""
    from prefect.deployments.steps.core import run_steps

    from culbot.flows.deploy import git_head, pull_steps

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True, capture_output=True)

    git("init", "-q")
    (repo / "version.txt").write_text("deployed\n")
    git("add", "-A")
    git("commit", "-qm", "deployed")
    deployed = git_head(repo)
    (repo / "version.txt").write_text("later\n")
    with pytest.raises(ConfigError, match="uncommitted changes"):
        git_head(repo)
    git("commit", "-qam", "a later commit the workers must not run")
    home = tmp_path / "home"
    home.mkdir()
    installed = tmp_path / "installed.txt"
    steps = pull_steps(str(repo), deployed, str(home), install=f"{sys.executable} -c \"import shutil; shutil.copy('version.txt', r'{installed}')\"")
    import asyncio
    import os

    cwd = os.getcwd()
    (tmp_path / "worker").mkdir()
    try:
        os.chdir(tmp_path / "worker")   # a worker clones into its working directory
        asyncio.run(run_steps(steps))
        assert os.getcwd() == str(home)   # the flow then works in CULBOT_HOME
    finally:
        os.chdir(cwd)
    assert installed.read_text() == "deployed\n"   # the install step ran in the clone, at the deployed commit
