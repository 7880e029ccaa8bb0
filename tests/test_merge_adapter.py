"""Merging a tiny trained run: equal to base + adapter, sharded, idempotent, self-describing, right-padded."""
import json

from culbot.pipeline_config.train_schema import MergeAdapterConfig
from culbot.tasks import _store
from culbot.tasks.contracts import RunCard, TemplateSet, short_hash
from culbot.tasks.merge_adapter import run_merge_adapter


def test_merge_matches_base_plus_adapter_and_is_idempotent(trained_run, tmp_path):
    spec = MergeAdapterConfig(max_shard_size="200KB", atol=1e-4)
    m = run_merge_adapter(trained_run, spec, tmp_path / "models", ["도서관 운영 시간은?", "장학금 종류는?"], trained_run / "eval")
    folder = tmp_path / "models" / short_hash(m.content_hash)
    assert m.path == folder and m.counts["max_logit_diff"] < 1e-4 and m.counts["saved_max_logit_diff"] < 1e-4
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2   # sharded
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 2)
    card = _store.read_model(folder / "culbot.json", RunCard)
    assert card.merge.dtype == "fp32" and card.eval.status == "passed" and card.lineage.dataset
    assert _store.read_model(folder / "templates.json", TemplateSet).map["cbnu"] == "cbnu2"
    assert _store.read_manifest(folder).inputs["eval"] == _store.read_manifest(trained_run / "eval").content_hash   # an input in its key
    again = run_merge_adapter(trained_run, spec, tmp_path / "models", ["x"], trained_run / "eval")
    assert _store.read_manifest(again.path).created_at == _store.read_manifest(m.path).created_at


def test_the_merged_tokenizer_pads_on_the_right_as_trained(trained_run, tmp_path):
    from transformers import AutoTokenizer

    m = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관 운영 시간은?", "장학금 종류는?"])
    assert AutoTokenizer.from_pretrained(m.path).padding_side == "right"
    assert json.loads((m.path / "tokenizer.json").read_text())["padding"] is None   # no padding state saved from the probe batch


def test_the_eval_it_passed_is_part_of_the_merged_models_key(trained_run, tmp_path):
    without = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"])
    with_eval = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval")
    assert without.content_hash != with_eval.content_hash
    assert _store.read_model(without.path / "culbot.json", RunCard).eval is None


def test_an_eval_rerun_that_changed_only_timings_merges_to_the_same_folder(trained_run, tmp_path):
    """Issue 22: the merged model was keyed by the eval folder's hash, so a rerun whose eval.json differed only in its
    timings wrote a new model folder."""
    import shutil

    from culbot.tasks.contracts import EvalReport

    first = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], trained_run / "eval")
    rerun = tmp_path / "eval-rerun"
    shutil.copytree(trained_run / "eval", rerun)
    report = _store.read_model(rerun / "eval.json", EvalReport)
    _store.write_model(rerun / "eval.json", report.model_copy(update={"seconds": report.seconds + 7.5}))
    old = _store.read_manifest(trained_run / "eval")
    _store.write_manifest(rerun, stage=old.stage, inputs=old.inputs, config=old.config, counts=old.counts, lineage=old.lineage)
    assert _store.read_manifest(rerun).content_hash != old.content_hash
    again = run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], rerun)
    assert again.path == first.path and len(list((tmp_path / "models").iterdir())) == 1
    # a different verdict is a different model
    _store.write_model(rerun / "eval.json", report.model_copy(update={"eval_loss": report.eval_loss + 1}))
    _store.write_manifest(rerun, stage=old.stage, inputs=old.inputs, config=old.config, counts=old.counts, lineage=old.lineage)
    assert run_merge_adapter(trained_run, MergeAdapterConfig(), tmp_path / "models", ["도서관"], rerun).path != first.path
