"""The data-refresh flow for real under prefect_test_harness: cold run, fully cached rerun, rebuild of a corrupted output."""
import shutil
import time

import pytest
import yaml

from culbot.tasks import _store
from tests.conftest import SAMPLES


def _profile(tmp_path):
    raw = tmp_path / "raw"
    data = {
        "name": "flowtest",
        "univ100": {"source": "snapshot", "snapshot_dir": str(SAMPLES / "univ100"), "out_dir": str(raw / "univ100")},
        "cbnu": {"source": "directory", "pages_dir": str(SAMPLES / "cbnu_pages"), "out_dir": str(raw / "cbnu")},
        "qa": {"backend": "replay", "replay_dir": str(SAMPLES / "qa_replay"), "chunk_tokens": 400,
               "cache_dir": str(raw / "qa_cache"), "out_dir": str(raw / "cbnu_qa")},
        "kullm": {"source": "file", "file": str(SAMPLES / "kullm_sample.jsonl"), "out_dir": str(raw / "kullm")},
        "merge": {"validation_fraction": 0.1, "out_root": str(tmp_path / "artifacts" / "datasets")},
        "format": {"out_root": str(tmp_path / "artifacts" / "formatted")},
    }
    p = tmp_path / "flowtest.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True))
    return str(p)


def _task_states(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Task-run states reach the API asynchronously: wait until every run has one.
    for _ in range(60):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if runs and all(r.state is not None and r.state.is_final() for r in runs):
            break
        time.sleep(0.5)
    return sorted((r.name.rsplit("-", 1)[0], r.state.name if r.state else "None") for r in runs)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: str(a.data) for a in arts if a.key}


@pytest.mark.slow
def test_data_refresh_cold_then_fully_cached_then_rebuilds_corruption(tmp_path, prefect_harness):
    from culbot.flows.data_refresh import data_refresh

    profile = _profile(tmp_path)
    state = data_refresh(profile=profile, return_state=True)
    assert state.is_completed()
    out = state.result()
    d = out["dataset"]
    assert d["counts"]["train"] + d["counts"]["validation"] == 55
    assert d["counts"]["rows_in"] == {"cbnu": 25, "kullm": 22, "univ100": 10}
    assert d["counts"]["dropped"] == {"duplicate_of_kullm": 1, "duplicate_of_univ100": 1}
    assert _store.is_complete(d["path"]) and _store.is_complete(out["formatted"]["path"])
    cold = _task_states(state.state_details.flow_run_id)
    assert [s for _, s in cold] == ["Completed"] * 6
    arts = _artifacts(state.state_details.flow_run_id)
    assert set(arts) >= {"crawl-univ100", "crawl-cbnu", "qa-ledger", "qa-generation-progress", "load-kullm", "dataset-stats", "data-refresh-summary"}
    assert '"replayed": 6' in arts["qa-ledger"] and "| rows | 10 |" in arts["crawl-univ100"]

    state2 = data_refresh(profile=profile, return_state=True)
    warm = _task_states(state2.state_details.flow_run_id)
    assert [s for _, s in warm] == ["Cached"] * 6
    assert state2.result()["dataset"]["content_hash"] == d["content_hash"]

    # A corrupted dataset version is detected by its manifest and rebuilt, never trusted.
    (tmp_path / "artifacts" / "datasets" / d["content_hash"][:16] / "train.parquet").write_bytes(b"garbage")
    shutil.rmtree(out["formatted"]["path"])
    state3 = data_refresh(profile=profile, return_state=True)
    states3 = dict(_task_states(state3.state_details.flow_run_id))
    assert states3["merge"] == "Completed" and states3["format"] == "Completed" and states3["crawl-univ100"] == "Cached"
    assert _store.is_complete(d["path"]) and _store.is_complete(out["formatted"]["path"])
    assert state3.result()["dataset"]["content_hash"] == d["content_hash"]


@pytest.mark.slow
def test_force_rebuilds_every_stage(tmp_path, prefect_harness):
    from culbot.flows.data_refresh import data_refresh

    profile = _profile(tmp_path)
    data_refresh(profile=profile)
    state = data_refresh(profile=profile, force=True, return_state=True)
    assert [s for _, s in _task_states(state.state_details.flow_run_id)] == ["Completed"] * 6
