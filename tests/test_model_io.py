"""Base models: the EOS check, resolving a base (the tiny model, a local folder), loading base + adapter from the run card."""
import pytest

from culbot.pipeline_config.train_schema import ModelConfig
from culbot.tasks.model_io import EosMismatch, check_eos, load_adapted, resolve_base
from tests.conftest import SAMPLES


def test_eos_mismatch_is_a_clear_error():
    class Tok:
        eos_token_id = 2

    class Cfg:
        eos_token_id = 0

    with pytest.raises(EosMismatch, match="tokenizer eos_token_id=2 but model config eos_token_id=0"):
        check_eos(Tok(), Cfg())
    Cfg.eos_token_id = 2
    assert check_eos(Tok(), Cfg()) == 2


def test_the_tiny_base_is_built_once_and_a_local_base_keeps_the_name_it_was_given(tmp_path, tiny_model):
    tiny = resolve_base(ModelConfig(base="culbot:tiny"), models_root=tmp_path / "models", samples_dir=SAMPLES)
    assert tiny.name == "culbot:tiny" and tiny.revision is None and tiny.path == str((tmp_path / "models" / "tiny").resolve())
    local = resolve_base(ModelConfig(base=str(tiny_model)), models_root=tmp_path / "models", samples_dir=SAMPLES)
    assert local.name == str(tiny_model) and local.path == str(tiny_model)


def test_load_adapted_takes_the_base_from_the_run_card(trained_run):
    model, tokenizer, card = load_adapted(trained_run / "adapter")
    assert card.base.name == "culbot:tiny" and tokenizer.eos_token_id == 2
    assert type(model).__name__ == "PeftModelForCausalLM" and not model.training


def test_an_edited_local_base_is_refused_by_training_and_by_loading_its_adapter(tiny_model, trained_run, tmp_path):
    """Issue 22: a local base whose files no longer matched its manifest was used without a word."""
    import json
    import shutil

    from culbot.tasks.model_io import BaseModelChanged

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1.0}))
    with pytest.raises(BaseModelChanged, match=r"base model .*base changed since it was written: .*config.json: content hash mismatch"):
        resolve_base(ModelConfig(base=str(base)), models_root=tmp_path / "models", samples_dir=SAMPLES)
    # the run's own base, edited after training: eval, merge and chat load it through load_adapted
    run = tmp_path / "run"
    shutil.copytree(trained_run / "adapter", run / "adapter")
    from culbot.tasks import _store
    from culbot.tasks.contracts import RunCard

    card = _store.read_model(run / "adapter" / "culbot.json", RunCard)
    _store.write_model(run / "adapter" / "culbot.json", card.model_copy(update={"base": card.base.model_copy(update={"path": str(base)})}))
    with pytest.raises(BaseModelChanged):
        load_adapted(run / "adapter")
