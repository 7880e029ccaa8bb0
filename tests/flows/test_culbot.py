"""The culbot flow under prefect_test_harness: data refresh -> train -> eval -> merge -> publish(local), then a rerun
on a "second host" (no local artifacts) served from the cache and the shared artifact root."""
import json
import shutil

import pytest

from culbot.tasks import _store
from culbot.tasks.contracts import short_hash
from culbot.pipeline_config.loader import overrides_dict
from tests.conftest import SAMPLES, flow_artifacts, sample_profile_file, task_states


@pytest.mark.slow
def test_full_chain_then_a_cached_rerun_on_a_host_without_the_artifacts(tmp_path, monkeypatch, prefect_harness, tiny_model):
    from prefect.client.orchestration import get_client
    from prefect.filesystems import LocalFileSystem
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    from culbot.flows.culbot import culbot

    monkeypatch.chdir(tmp_path)  # CULBOT_HOME: remote keys are paths relative to it
    remote = tmp_path / "remote"  # a local folder standing in for s3:// or gs://
    LocalFileSystem(basepath=str(remote / "prefect-results")).save("culbot-results-test", overwrite=True)
    profile = sample_profile_file(tmp_path)
    train_overrides = [f"artifacts_root={tmp_path / 'artifacts'}", f"samples_dir={SAMPLES}", "train.max_steps=4", "train.save_steps=4",
                       "eval.max_new_tokens=4", f"eval.retrieval_questions={SAMPLES / 'rag_questions.jsonl'}", f"publish.local_dir={tmp_path / 'publish'}"]
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: "local-file-system/culbot-results-test"}):
        state = culbot(data_profile_file=profile, train_overrides=overrides_dict(train_overrides), artifact_root=str(remote), return_state=True)
        assert state.is_completed(), state
        out = state.result()
        assert out.run.global_step == 4 and out.eval.passed
        assert out.run.packing.rows < out.run.packing.examples   # cpu-tiny packs, as the GPU profiles
        assert _store.is_complete(out.model.path) and _store.is_complete(out.run.path) and _store.is_complete(out.tokenized.path)
        pub = tmp_path / "publish"
        folder = next(p for p in pub.iterdir() if p.is_dir())
        # one output, one manifest (issue 25): the publish record is in the published folder, none in the run folder
        assert sorted(p.name for p in folder.iterdir()) == ["adapter", "manifest.json", "merged", "record.json"]
        assert out.publish.path == folder.resolve() and not (out.run.path / "publish").exists()
        card = (folder / "merged" / "README.md").read_text()
        assert card.startswith("---\n") and "language:\n- ko\n" in card and "model-index:" in card and "With retrieval, put the retrieved passages in `input`, each as `[참고 {n}] {title}\\n{text}`" in card
        assert "25% had none" in card and "Retrieval over the CBNU documents (" in card and "recall@5" in card
        report = (out.run.run_dir / "eval" / "eval.md").read_text()
        assert "## Retrieval" in report and "| paraphrase |" in report and "| validation QA |" in report   # hand-written and held-out questions
        # answer quality against the base model (the first release), reported (cpu-tiny: eval.gate=report), in the card too
        assert "compared with **base model culbot:tiny**" in report and "answers side by side" in report
        assert "## Chat with it" in card and f"Evaluated with the retrieval index `artifacts/indexes/{out.data.index.path.name}`" in card
        arts = flow_artifacts(state.state_details.flow_run_id)
        assert "## Answer quality" in arts["eval-report"]
        assert {r["metric"] for r in json.loads(arts["eval-metrics"])} >= {"validation loss", "perplexity", "retrieval recall@5", "answers chrf"}
        # the parent's summary links the artifacts of its subflow (data-refresh) and its stages, and says what ran
        summary = arts["culbot-summary"]
        for key in ("crawl-univ100", "qa-ledger", "dataset-stats", "data-refresh-summary", "training-curve", "training-curve-points",
                    "eval-report", "eval-metrics"):
            assert f"[{key}](" in summary and "/artifacts/artifact/" in summary, key
        assert f"| run | {out.run.run_dir.name} |" in summary and "| eval | passed, loss " in summary
        # a list, a line per artifact, each with its description; no keyless result records, no file:// links (issue 22)
        listed = [line for line in summary.splitlines() if line.startswith("- [")]
        assert len(listed) >= 8 and all(line.split(": ", 1)[1].strip() for line in listed), listed
        assert "file://" not in summary and "| flow run |" not in summary
        assert f"learning rate): `{out.run.run_dir / 'loss_curve.png'}`" in arts["training-curve"] and "file://" not in arts["training-curve"]
        assert (out.run.run_dir / "loss_curve.png").is_file()
        assert "![loss curve](data:image/png;base64," in arts["training-curve"]
        assert (pub / "registry.json").is_file()   # the next eval's baseline; it does not change this run's cache keys (below)
        cold = [x for x in task_states(state.state_details.flow_run_id) if x[0] != "data-refresh"]   # the subflow's own run
        assert [n for n, _ in cold] == ["eval", "merge-adapter", "publish", "tokenize", "train"] and {s for _, s in cold} == {"Completed"}
        with get_client(sync_client=True) as client:
            name = client.read_flow_run(state.state_details.flow_run_id).name
        assert name == f"culbot-flowtest-cpu-tiny-{short_hash(out.data.dataset.content_hash)}-to-publish"

        # Everything the next host needs is in the root, each folder with its manifest; checkpoints stay behind.
        run_name = out.run.run_dir.name
        for rel in (f"artifacts/datasets/{out.data.dataset.path.name}", f"artifacts/runs/{run_name}", f"artifacts/tokenized/{out.tokenized.path.name}",
                    f"artifacts/runs/{run_name}/adapter", f"artifacts/runs/{run_name}/eval", f"artifacts/models/{out.model.path.name}",
                    f"artifacts/indexes/{out.data.index.path.name}", "raw/univ100", "raw/cbnu_qa"):
            assert (remote / rel / "manifest.json").is_file(), rel
        assert not (remote / f"artifacts/runs/{run_name}/checkpoints").exists()
        assert any((remote / "prefect-results").iterdir())

        # A second host: same CULBOT_HOME, same server, no local artifacts. Nothing is rebuilt or retrained.
        shutil.rmtree(tmp_path / "artifacts")
        state2 = culbot(data_profile_file=profile, train_overrides=overrides_dict(train_overrides), artifact_root=str(remote), return_state=True)
        warm = [x for x in task_states(state2.state_details.flow_run_id) if x[0] != "data-refresh"]
        assert warm == [(n, "Cached") for n, _ in cold]
        out2 = state2.result()
        assert out2.model.path == out.model.path and _store.is_complete(out2.model.path)
        assert _store.is_complete(out2.run.path) and _store.is_complete(out2.data.formatted.path)
