"""The tiny GPT-NeoX: built in-process, saved, and loaded back through from_pretrained."""
from culbot.tasks import _store
from culbot.tasks.tiny_model import build_tiny_model, sample_corpus
from tests.conftest import SAMPLES


def test_tiny_model_round_trip_and_polyglot_special_tokens(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = build_tiny_model(tmp_path / "tiny", sample_corpus(SAMPLES))
    assert _store.is_complete(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    cfg = AutoConfig.from_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert cfg.model_type == "gpt_neox" and cfg.rope_parameters["partial_rotary_factor"] == 0.5   # polyglot-ko rotary_pct
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 2) == (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    ids = tok("충북대학교 중앙도서관은 평일 오전 9시부터 운영합니다.")["input_ids"]
    assert tok.decode(ids) == "충북대학교 중앙도서관은 평일 오전 9시부터 운영합니다."
    assert len(ids) < 40   # the BPE learned Korean merges, not one token per byte
    out = model(**tok("충북대학교", return_tensors="pt"))
    assert out.logits.shape[-1] == cfg.vocab_size
    again = build_tiny_model(tmp_path / "tiny", sample_corpus(SAMPLES))
    assert again.created_at == m.created_at   # a second build is a no-op
