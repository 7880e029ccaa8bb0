"""The data-refresh flow for real under prefect_test_harness: cold run, fully cached rerun, rebuild of a corrupted output."""
import json
import shutil

import pytest

from culbot.tasks import _store
from culbot.tasks.contracts import short_hash
from tests.conftest import flow_artifacts, sample_profile_file, task_states


def _log_lines(flow_run_id, expect: str = "") -> list[str]:
    """The flow run's log messages. Prefect sends run logs to the API in the background, in batches: wait (up to 30 s)
    for a line starting with ``expect`` to arrive (under the whole suite they came after the flow had returned)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            lines = [x.message for x in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)]
        if any(m.startswith(expect) for m in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


@pytest.mark.slow
def test_data_refresh_cold_then_fully_cached_then_rebuilds_corruption(tmp_path, prefect_harness):
    from culbot.flows.data_refresh import data_refresh

    profile = sample_profile_file(tmp_path)
    state = data_refresh(data_profile_file=profile, return_state=True)
    assert state.is_completed()
    out = state.result()
    d = out.dataset
    assert d.counts["train"] + d.counts["validation"] == 111
    assert d.counts["rows_in"] == {"cbnu": 81, "kullm": 22, "univ100": 10}
    assert d.counts["dropped"] == {"duplicate_of_kullm": 1, "duplicate_of_univ100": 1}
    assert _store.is_complete(d.path) and _store.is_complete(out.formatted.path)
    assert list(out.stages) == ["crawl-univ100", "crawl-cbnu", "generate-qa", "load-dataset-kullm", "merge-data", "index", "format"]
    assert _store.is_complete(out.index.path) and out.index.counts["documents"] == 33 and out.index.counts["qa_keys"] > 0
    assert out.formatted.counts["with_context"]["train"] > 0   # CBNU rows trained with retrieved context
    cold = task_states(state.state_details.flow_run_id)
    assert [s for _, s in cold] == ["Completed"] * 7
    arts = flow_artifacts(state.state_details.flow_run_id)
    assert set(arts) >= {"crawl-univ100", "crawl-cbnu", "qa-ledger", "qa-generation-progress", "load-dataset-kullm", "dataset-stats", "data-refresh-summary"}
    # counts and the ledger are table artifacts; the ledger's quarantined figure is the quarantine file's (issue 15: 5 vs 4)
    ledger = {r["what"]: r["value"] for r in json.loads(arts["qa-ledger"])}
    assert ledger["replayed"] == 34 and {"count": "rows", "value": 10} in json.loads(arts["crawl-univ100"])
    qa_counts = {r["count"]: r["value"] for r in json.loads(arts["generate-qa"])}
    assert ledger["quarantined (quarantine.jsonl)"] == qa_counts["quarantined"] == len(_store.read_jsonl(tmp_path / "raw" / "cbnu_qa" / "quarantine.jsonl"))
    assert {r["count"]: r["value"] for r in json.loads(arts["merge-data"])}["rows_in.kullm"] == 22

    state2 = data_refresh(data_profile_file=profile, return_state=True)
    warm = task_states(state2.state_details.flow_run_id)
    assert [s for _, s in warm] == ["Cached"] * 7
    assert state2.result().dataset.content_hash == d.content_hash
    # a stage served from the cache says which folder and hash, and where the artifact of the run that made it is
    # (issue 22: the UI showed only "Finished in state Cached")
    lines = _log_lines(state2.state_details.flow_run_id, expect="merge-data: served from the cache: ")
    served = [m for m in lines if m.startswith("merge-data: served from the cache: ")]
    assert served and f"{d.path} (hash {short_hash(d.content_hash)}); its artifact: " in served[0], lines
    assert any(m.startswith("index: served from the cache: ") for m in lines)
    warm_arts = flow_artifacts(state2.state_details.flow_run_id)
    assert "merge-data-cached" in warm_arts and str(d.path) in warm_arts["merge-data-cached"]
    assert "the artifact of the run that made it: [merge-data](http" in warm_arts["merge-data-cached"]

    # A corrupted dataset version is detected by its manifest and rebuilt, never trusted.
    (tmp_path / "artifacts" / "datasets" / short_hash(d.content_hash) / "train.parquet").write_bytes(b"garbage")
    shutil.rmtree(out.formatted.path)
    state3 = data_refresh(data_profile_file=profile, return_state=True)
    states3 = dict(task_states(state3.state_details.flow_run_id))
    assert states3["merge-data"] == "Completed" and states3["format"] == "Completed" and states3["crawl-univ100"] == "Cached"
    assert _store.is_complete(d.path) and _store.is_complete(out.formatted.path)
    assert state3.result().dataset.content_hash == d.content_hash


@pytest.mark.slow
def test_force_rebuilds_every_stage(tmp_path, prefect_harness):
    from culbot.flows.data_refresh import data_refresh

    profile = sample_profile_file(tmp_path)
    data_refresh(data_profile_file=profile)
    state = data_refresh(data_profile_file=profile, force=True, return_state=True)
    assert [s for _, s in task_states(state.state_details.flow_run_id)] == ["Completed"] * 7


@pytest.mark.slow
def test_two_refreshes_at_once_take_turns_on_the_raw_lock(tmp_path, prefect_harness):
    """Two data refreshes started together (a weekly one and a full run's) never write raw/ at the same time: with the
    culbot-raw limit that `culbot deploy` creates, the second one's stages all start after the first one's end."""
    import threading

    from prefect.client.orchestration import get_client

    from culbot.flows.data_refresh import data_refresh
    from culbot.flows.deploy import ensure_locks

    assert "culbot-raw" in ensure_locks(log=lambda *_: None)
    profile = sample_profile_file(tmp_path)
    states = {}

    def refresh(name):
        states[name] = data_refresh(data_profile_file=profile, force=True, return_state=True)

    threads = [threading.Thread(target=refresh, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert {n: s.is_completed() for n, s in states.items()} == {"a": True, "b": True}
    spans = []
    with get_client(sync_client=True) as client:
        for s in states.values():
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[s.state_details.flow_run_id])))
            spans.append((min(r.start_time for r in runs), max(r.end_time for r in runs)))
    first, second = sorted(spans)
    assert second[0] >= first[1], spans   # no stage of the second began before the first's last one ended


@pytest.mark.slow
def test_approved_feedback_reaches_the_dataset_and_a_new_approval_reruns_its_stage(tmp_path, prefect_harness, monkeypatch):
    """Issue 26: with feedback.enabled, data-refresh runs feedback-data; an approved correction becomes a dataset row of
    source feedback, and the store says which version used it. A new approval reruns feedback-data and merge-data, and
    nothing upstream."""
    import yaml

    from culbot.flows.data_refresh import data_refresh
    from culbot.tasks.feedback_store import FeedbackStore

    monkeypatch.delenv("CULBOT_FEEDBACK_DB", raising=False)
    url = f"sqlite:///{tmp_path}/fb.db"
    store = FeedbackStore(url)
    for n, question in enumerate(["셔틀버스는 주말에도 다녀요?", "휴학 신청은 어디서 해요?"]):
        store.record_answer(id=f"chatcmpl-{n}", channel="demo", question=question, prompt=f"### 질문:\n{question}", answer="모르겠습니다.",
                            sources=[], confidence=0.1, refused=False, model="m", dataset=None, index=None)
    first = store.add("chatcmpl-0", rating="down", correction="주말에는 셔틀버스가 다니지 않습니다.")
    second = store.add("chatcmpl-1", rating="down", correction="휴학 신청은 개신누리 포털에서 합니다.")
    store.review([first], approve=True, reviewer="kim")
    profile = sample_profile_file(tmp_path)
    data = yaml.safe_load(open(profile))
    data["feedback"] = {"enabled": True, "store": url, "out_dir": str(tmp_path / "raw" / "feedback")}
    with open(profile, "w") as f:
        yaml.safe_dump(data, f, allow_unicode=True)

    state = data_refresh(data_profile_file=profile, return_state=True)
    out = state.result()
    assert "feedback-data" in out.stages and out.dataset.counts["rows_in"]["feedback"] == 1
    rows = _store.read_table(out.dataset.path / "train.parquet") + _store.read_table(out.dataset.path / "validation.parquet")
    assert [r["output"] for r in rows if r["source"] == "feedback"] == ["주말에는 셔틀버스가 다니지 않습니다."]
    assert {i["id"]: i["used_in"] for i in store.items()}[first] == out.dataset.content_hash

    store.review([second], approve=True, reviewer="kim")
    state2 = data_refresh(data_profile_file=profile, return_state=True)
    states = dict(task_states(state2.state_details.flow_run_id))
    assert states["feedback-data"] == "Completed" and states["merge-data"] == "Completed"
    assert states["crawl-cbnu"] == states["generate-qa"] == states["load-dataset"] == "Cached"
    assert state2.result().dataset.counts["rows_in"]["feedback"] == 2


@pytest.mark.slow
def test_a_refresh_pauses_for_review_in_the_ui_and_records_the_answer(tmp_path, prefect_harness, monkeypatch):
    """Issue 26: with feedback.review: pause and feedback pending, data-refresh pauses (Prefect's pause with a form of the
    pending items); resumed as the UI does it, with ids to approve and to reject, it records them and goes on with the
    approved correction in the dataset."""
    import threading
    import time

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.flow_runs import resume_flow_run

    from culbot.flows.data_refresh import data_refresh
    from culbot.tasks.feedback_store import FeedbackStore

    monkeypatch.delenv("CULBOT_FEEDBACK_DB", raising=False)
    monkeypatch.setattr("culbot.flows.review.REVIEW_POLL_S", 1)
    url = f"sqlite:///{tmp_path}/fb.db"
    store = FeedbackStore(url)
    for n, question in enumerate(["계절학기는 몇 학점까지 들을 수 있어요?", "기숙사 와이파이 비밀번호 알려줘"]):
        store.record_answer(id=f"chatcmpl-{n}", channel="serve", question=question, prompt=question, answer="모르겠습니다.",
                            sources=[], confidence=0.1, refused=False, model="m", dataset=None, index=None)
    keep = store.add("chatcmpl-0", rating="down", correction="계절학기는 최대 6학점까지 신청할 수 있습니다.")
    drop = store.add("chatcmpl-1", rating="down", correction="광고입니다")
    profile = sample_profile_file(tmp_path)
    data = yaml.safe_load(open(profile))
    data["feedback"] = {"enabled": True, "store": url, "out_dir": str(tmp_path / "raw" / "feedback"), "review": "pause"}
    with open(profile, "w") as f:
        yaml.safe_dump(data, f, allow_unicode=True)

    result = {}
    worker = threading.Thread(target=lambda: result.update(state=data_refresh(data_profile_file=profile, return_state=True)))
    worker.start()
    paused, deadline = [], time.monotonic() + 120
    while not paused:
        assert time.monotonic() < deadline and worker.is_alive(), "the refresh did not pause"
        time.sleep(0.5)
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["PAUSED"]))))
    assert store.items(status="pending") and not (tmp_path / "raw" / "univ100").exists()   # nothing ran, no lock held
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    form = read_flow_run_input(keyset_from_paused_state(paused[0].state)["description"], flow_run_id=paused[0].id)
    assert "2 feedback item(s) wait for review" in form and "계절학기는 몇 학점까지" in form and f"| {keep} | down |" in form
    resume_flow_run(paused[0].id, run_input={"approve": [keep], "reject": [drop], "reviewer": "park"})
    worker.join(300)
    out = result["state"].result()
    assert {i["id"]: (i["status"], i["reviewer"]) for i in store.items()} == {keep: ("approved", "park"), drop: ("rejected", "park")}
    rows = _store.read_table(out.dataset.path / "train.parquet") + _store.read_table(out.dataset.path / "validation.parquet")
    assert [r["output"] for r in rows if r["source"] == "feedback"] == ["계절학기는 최대 6학점까지 신청할 수 있습니다."]
