"""Eval, merge and publish of a tiny trained run: equivalence, idempotence, the gate, and a Hub round trip."""
import json
import os
import subprocess
import sys

import pytest

from culbot.pipeline_config.train_schema import EvalSpec, MergeSpec, PublishSpec, load_train_profile
from culbot.tasks import _store
from culbot.tasks.evaluate import run_eval
from culbot.tasks.merge_adapter import run_merge_adapter
from culbot.tasks.publish import PublishRefused, run_publish
from culbot.tasks.train import prepare_run, run_training
from tests.conftest import SAMPLES
from tests.servers.base import serve
from tests.servers.hub import HubApp, HubHandler

TOKEN = "hf_test_token_never_leak_0123456789"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_formatted, tiny_model):
    root = tmp_path_factory.mktemp("release")
    prof = load_train_profile("cpu-tiny", ["train.max_steps=8", "train.save_steps=8", "train.eval_steps=8"])
    cfg = prepare_run(prof, sample_formatted, runs_root=root / "runs", models_root=tiny_model.parent, tokenized_root=root / "tok", samples_dir=SAMPLES)
    run_training(cfg, prof)
    run_eval(cfg.parent, EvalSpec(probes=["도서관은 몇 시에 여나요?"], max_new_tokens=8))
    return cfg.parent


def test_eval_reports_loss_perplexity_and_probe_answers(run_dir):
    res = run_eval(run_dir, EvalSpec(probes=["도서관은 몇 시에 여나요?", "휴학은 어디서 신청해요?"], max_new_tokens=8))
    assert res["status"] == "passed" and res["label_tokens"] > 0
    assert res["perplexity"] == pytest.approx(2.718281828 ** res["eval_loss"], rel=1e-6)
    assert res["template"] == "cbnu2"
    assert res["probes"][0]["prompt"] == (
        "아래는 충북대학교와 관련한 작업을 설명하는 명령어입니다. 충북대학교의 공식 정보에 근거하여 요청을 적절히 완료하는 응답을 작성하세요."
        "\n\n### 명령어:\n도서관은 몇 시에 여나요?\n\n### 응답:\n")
    md = (run_dir / "eval" / "eval.md").read_text()
    assert "**PASSED**" in md and "도서관은 몇 시에 여나요?" in md
    failed = run_eval(run_dir, EvalSpec(probes=["x"], max_new_tokens=1, max_eval_loss=0.001))
    assert failed["status"] == "failed" and "> gate 0.001" in failed["reason"]
    run_eval(run_dir, EvalSpec(probes=["도서관은 몇 시에 여나요?"], max_new_tokens=8))   # leave a passing eval for the tests below


def test_merge_matches_base_plus_adapter_and_is_idempotent(run_dir, tmp_path):
    spec = MergeSpec(max_shard_size="200KB", atol=1e-4)
    m = run_merge_adapter(run_dir, spec, tmp_path / "models", ["도서관 운영 시간은?", "장학금 종류는?"])
    folder = tmp_path / "models" / m["content_hash"][:16]
    assert m["merge"]["max_logit_diff"] < 1e-4 and m["merge"]["saved_max_logit_diff"] < 1e-4
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2   # sharded
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    meta = json.loads((folder / "culbot.json").read_text())
    assert meta["merge"]["dtype"] == "fp32" and meta["eval"]["status"] == "passed" and meta["dataset_hash"]
    assert json.loads((folder / "culbot_template.json").read_text())["map"]["cbnu"] == "cbnu2"
    again = run_merge_adapter(run_dir, spec, tmp_path / "models", ["x"])
    assert again["created_at"] == m["created_at"]


def test_publish_local_writes_cards_and_refuses_failed_runs(run_dir, tmp_path):
    m = run_merge_adapter(run_dir, MergeSpec(), tmp_path / "models", ["도서관"])
    rec = run_publish(run_dir, m["path"], PublishSpec(target="local", local_dir=tmp_path / "pub"))
    merged = tmp_path / "pub" / rec["published"]["merged"].rsplit("/", 2)[-2] / "merged"
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- ko\n") and "| kullm |" in card and "## Prompt template `cbnu2`" in card
    assert "Intended use and limits" in card and "Validation loss" in card
    assert (merged / "config.json").is_file() and (merged.parent / "adapter" / "adapter_config.json").is_file()
    # a run whose eval failed is refused
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    (run_dir / "eval" / "eval.json").write_text(json.dumps({**ev, "status": "failed", "reason": "validation loss 9 > gate 1"}))
    try:
        with pytest.raises(PublishRefused, match="eval gate failed"):
            run_publish(run_dir, m["path"], PublishSpec(target="local", local_dir=tmp_path / "pub2"))
    finally:
        (run_dir / "eval" / "eval.json").write_text(json.dumps(ev))


def test_hub_round_trip_through_a_local_hub(run_dir, tmp_path):
    m = run_merge_adapter(run_dir, MergeSpec(), tmp_path / "models", ["도서관"])
    app = HubApp(token=TOKEN)
    with serve(HubHandler, app) as hub:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
               "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
        pub = subprocess.run([sys.executable, "-m", "culbot.flows.cli", "publish", "--run", str(run_dir), "--model", m["path"],
                              "--target", "hub", "--repo-id", "cbnu-lab/culbot-tiny", "--endpoint", hub, "--set", "publish.tag=v1"],
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
    everything = pub.stdout + pub.stderr + load.stdout + load.stderr
    assert TOKEN not in everything
    for f in list(repo["files"].values()) + list(app.repos["cbnu-lab/culbot-tiny-lora"]["files"].values()):
        assert TOKEN.encode() not in f
    assert TOKEN not in (run_dir / "publish" / "record.json").read_text()
    assert app.tokens_seen >= {f"Bearer {TOKEN}"}
