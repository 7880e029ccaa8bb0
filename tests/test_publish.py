"""Publishing a tiny trained run: local folders with model cards, the gate, and a round trip through a local Hub."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from culbot.pipeline_config.train_schema import MergeAdapterConfig, PublishConfig
from culbot.tasks import _store
from culbot.tasks.contracts import EvalReport, RunCard
from culbot.tasks.merge_adapter import run_merge_adapter
from culbot.tasks.publish import PublishRefused, run_publish
from tests.servers.base import serve
from tests.servers.hub import HubApp, HubHandler

TOKEN = "hf_test_token_never_leak_0123456789"


def test_publish_local_writes_cards_and_refuses_failed_runs(trained_run, tmp_path):
    m = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval")
    rec = run_publish(trained_run, m.path, PublishConfig(target="local", local_dir=tmp_path / "pub"))
    merged = tmp_path / "pub" / rec.published["merged"].where.rsplit("/", 2)[-2] / "merged"
    card = (merged / "README.md").read_text()
    assert "| kullm |" in card and "## Prompt template `cbnu2`" in card
    # Hub metadata through huggingface_hub's card classes: validated fields, and eval results as model-index entries
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data
    assert meta.language == ["ko"] and meta.library_name == "transformers" and "gpt_neox" in meta.tags and meta.pipeline_tag == "text-generation"
    evals = {r.metric_type: r for r in meta.eval_results}
    ev_report = _store.read_model(trained_run / "eval" / "eval.json", EvalReport)
    assert evals["loss"].metric_value == pytest.approx(ev_report.eval_loss, abs=1e-4) and evals["loss"].task_type == "text-generation"
    assert f"# {meta.model_name}\n" in card   # the model-index is named after the repo the card heads
    assert "Intended use and limits" in card and "Validation loss" in card
    # how to chat with it: the exact prompt of a question with a retrieved passage, and the commands
    assert "## Chat with it" in card and "culbot chat --model" in card and "### 명령어:\n기숙사 신청은 언제 해요?\n\n### 응답:\n" in card
    assert "apply_chat_template" in card and (merged / "chat_template.jinja").is_file()
    assert (merged / "config.json").is_file() and (merged.parent / "adapter" / "adapter_config.json").is_file()
    assert "base_model:" not in card.split("---")[1]   # the tiny base is not a Hub model
    # the copied run card still finds its local base
    adapter_card = _store.read_model(merged.parent / "adapter" / "culbot.json", RunCard)
    assert adapter_card.base.location(merged.parent / "adapter") == _store.read_model(trained_run / "adapter" / "culbot.json", RunCard).base.location(trained_run / "adapter")
    # a run whose eval failed is refused
    ev_file = trained_run / "eval" / "eval.json"
    ev = ev_file.read_text()
    failed = _store.read_model(ev_file, EvalReport).model_copy(update={"status": "failed", "reason": "validation loss 9 > gate 1"})
    _store.write_model(ev_file, failed)
    try:
        with pytest.raises(PublishRefused, match="eval gate failed"):
            run_publish(trained_run, m.path, PublishConfig(target="local", local_dir=tmp_path / "pub2"))
    finally:
        ev_file.write_text(ev)


def test_hub_round_trip_through_a_local_hub(trained_run, tmp_path):
    m = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval")
    app = HubApp(token=TOKEN)
    with serve(HubHandler, app) as hub:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
               "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
        pub = subprocess.run([sys.executable, "-m", "culbot.flows.cli", "publish", "--run", str(trained_run), "--model", str(m.path),
                              "--target", "hub", "--repo-id", "cbnu-lab/culbot-tiny", "--endpoint", hub, "--train-set", "publish.tag=v1"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert pub.returncode == 0, pub.stderr
        repo = app.repos["cbnu-lab/culbot-tiny"]
        assert repo["private"] and "README.md" in repo["files"] and "model.safetensors" in repo["files"]
        assert repo["commits"][-1]["summary"].startswith("culbot: dataset "), repo["commits"]
        assert repo["tags"]["v1"] == repo["commits"][-1]["oid"], (repo["tags"], repo["commits"])
        assert "adapter_model.safetensors" in app.repos["cbnu-lab/culbot-tiny-lora"]["files"]
        load = subprocess.run([sys.executable, "-c", (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained('cbnu-lab/culbot-tiny'); t = AutoTokenizer.from_pretrained('cbnu-lab/culbot-tiny')\n"
            "ids = t('### 명령어:\\n도서관은 몇 시에 여나요?\\n\\n### 응답:\\n', return_tensors='pt', add_special_tokens=False)\n"
            "out = m.generate(**ids, max_new_tokens=5, do_sample=False)\n"
            "print('GENERATED', out.shape[1] - ids['input_ids'].shape[1], m.generation_config.eos_token_id)\n")],
            capture_output=True, text=True, env={**env, "HF_TOKEN": TOKEN}, timeout=300)
        assert load.returncode == 0, load.stderr
        assert "GENERATED" in load.stdout and load.stdout.strip().endswith(" 2")
        assert "culbot_release.json" in repo["files"]
        # the next eval's baseline is read back from the Hub repo when there is no local registry
        prev = subprocess.run([sys.executable, "-c", (
            "from culbot.pipeline_config.train_schema import PublishConfig\nfrom culbot.tasks.releases import previous_release\n"
            f"r = previous_release(PublishConfig(target='hub', repo_id='cbnu-lab/culbot-tiny', endpoint={hub!r}, local_dir={str(tmp_path / 'none')!r}))\n"
            "print('PREVIOUS', r.run, r.target)\n")], capture_output=True, text=True, env=env, timeout=120)
        assert f"PREVIOUS {trained_run.name} hub" in prev.stdout, prev.stderr[-2000:]
    everything = pub.stdout + pub.stderr + load.stdout + load.stderr
    assert TOKEN not in everything
    for f in list(repo["files"].values()) + list(app.repos["cbnu-lab/culbot-tiny-lora"]["files"].values()):
        assert TOKEN.encode() not in f
        assert str(trained_run.parent).encode() not in f   # no path of the machine it was built on
    assert TOKEN not in (trained_run / "publish" / "record.json").read_text()
    assert app.tokens_seen >= {f"Bearer {TOKEN}"}


def test_a_published_folder_is_verified_on_a_cache_hit_and_rebuilt_when_broken(trained_run, tmp_path, prefect_harness):
    from prefect import flow

    from culbot.flows.runner import existing, run_stage
    from culbot.tasks.publish import publish_task
    from culbot.tasks.run_folder import run_output
    from tests.conftest import task_states

    model = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval")
    spec = PublishConfig(target="local", local_dir=tmp_path / "pub")

    @flow(name="publish-check")
    def publish_once():
        return run_stage(publish_task, spec=spec, run=run_output(trained_run).ref(), model=existing(model.path), evaluation=existing(trained_run / "eval"))

    first = publish_once()
    weights = next((tmp_path / "pub").glob("*/merged/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF                                               # one byte flipped
    weights.write_bytes(bytes(data))
    state = publish_once(return_state=True)
    assert [s for _, s in task_states(state.state_details.flow_run_id)] == ["Cached", "Completed"]   # the hit did not verify: rebuilt
    assert _store.is_complete(state.result().path) and state.result().path == first.path


def test_different_runs_never_publish_into_the_same_folder(trained_run, tmp_path):
    import shutil

    other = trained_run.parent / (trained_run.name + "-other-settings")
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints"))
    a = run_publish(trained_run, None, PublishConfig(target="local", what="adapter", local_dir=tmp_path / "pub"))
    b = run_publish(other, None, PublishConfig(target="local", what="adapter", local_dir=tmp_path / "pub"))
    assert a.published["adapter"].where != b.published["adapter"].where
    assert len([p for p in (tmp_path / "pub").iterdir() if p.is_dir()]) == 2
    # Both releases are in the registry, newest last: the next eval's baseline is the run published last.
    from culbot.tasks.releases import previous_release

    spec = PublishConfig(target="local", local_dir=tmp_path / "pub")
    assert previous_release(spec).run == other.name and (tmp_path / "pub" / "registry.json").is_file()
    assert (Path(b.published["adapter"].where) / "culbot_release.json").is_file()
    # A published folder corrupted later is no baseline: the release before it is (issue 22: it stayed the gate's baseline).
    (Path(b.published["adapter"].where) / "adapter_model.safetensors").write_bytes(b"not the weights")
    assert previous_release(spec).run == trained_run.name
    shutil.rmtree(a.folder)
    assert previous_release(spec) is None   # neither verifies: the base model is the baseline, never a broken release
