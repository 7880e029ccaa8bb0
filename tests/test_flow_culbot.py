"""The culbot flow under prefect_test_harness: data refresh -> train -> eval -> merge -> publish(local), cached on rerun."""
import pytest

from culbot.tasks import _store
from tests.conftest import SAMPLES
from tests.test_flow_data_refresh import _profile, _task_states


@pytest.mark.slow
def test_full_chain_then_fully_cached_rerun(tmp_path, prefect_harness, tiny_model):
    from culbot.flows.culbot import culbot

    profile = _profile(tmp_path)
    train_overrides = [f"artifacts_root={tmp_path / 'artifacts'}", f"samples_dir={SAMPLES}", "train.max_steps=4", "train.save_steps=4",
                       "eval.max_new_tokens=4", f"publish.local_dir={tmp_path / 'publish'}"]
    state = culbot(profile=profile, train_overrides=train_overrides, return_state=True)
    assert state.is_completed(), state
    out = state.result()
    assert out["run"]["counts"]["global_step"] == 4 and out["eval"]["counts"]["status"] == "passed"
    assert _store.is_complete(out["model"]["path"]) and _store.is_complete(out["run"]["path"])
    pub = tmp_path / "publish"
    folder = next(pub.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "manifest.json", "merged"]
    assert (folder / "merged" / "README.md").read_text().startswith("---\nlanguage:")
    cold = [x for x in _task_states(state.state_details.flow_run_id) if x[0] != "data-refresh"]   # the subflow's own run
    assert [n for n, _ in cold] == ["eval", "merge-adapter", "publish", "train"] and {s for _, s in cold} == {"Completed"}

    state2 = culbot(profile=profile, train_overrides=train_overrides, return_state=True)
    warm = [x for x in _task_states(state2.state_details.flow_run_id) if x[0] != "data-refresh"]
    assert warm == [(n, "Cached") for n, _ in cold]
    assert state2.result()["model"]["path"] == out["model"]["path"]
