"""The chat path end to end under prefect_test_harness: a tiny Llama-3-style model (no pad token, turns end with
<|eot_id|>) trained with the CBNU persona chat template on the samples plus a ShareGPT file, evaluated, merged and
published; the published tokenizer renders the persona prompt exactly as training did."""
import json

import pytest
import yaml

from culbot.tasks import _store
from culbot.tasks.run_folder import read_run_card
from culbot.pipeline_config.loader import overrides_dict
from tests.conftest import SAMPLES, sample_profile_file


@pytest.mark.slow
def test_a_persona_chat_model_on_alpaca_and_sharegpt_data_is_trained_merged_and_published(tmp_path, monkeypatch, prefect_harness):
    import datasets
    from transformers import AutoTokenizer

    from culbot.flows.culbot import culbot
    from culbot.tasks.special_tokens import encode_prompt
    from culbot.tasks.templates import EXAMPLE_QUESTION, render_prompt

    monkeypatch.chdir(tmp_path)
    profile = sample_profile_file(tmp_path)
    data = yaml.safe_load(open(profile))
    data["datasets"].append({"name": "chat", "file": str(SAMPLES / "sharegpt_sample.jsonl"), "type": "sharegpt",
                             "out_dir": str(tmp_path / "raw" / "chat")})
    open(profile, "w").write(yaml.safe_dump(data, allow_unicode=True))
    overrides = [f"artifacts_root={tmp_path / 'artifacts'}", f"samples_dir={SAMPLES}", "train.max_steps=4", "train.save_steps=4",
                 "eval.max_new_tokens=4", "eval.answer_questions=4", f"eval.retrieval_questions={SAMPLES / 'rag_questions.jsonl'}",
                 f"publish.local_dir={tmp_path / 'publish'}"]
    state = culbot(data_profile_file=profile, train_profile="cpu-tiny-llama", train_overrides=overrides_dict(overrides), return_state=True)
    assert state.is_completed(), state
    out = state.result()
    counts = out.data.dataset.counts
    assert counts["rows_in"]["chat"] == 7 and counts["dropped"]["duplicate_of_kullm"] == 2 and counts["conversations"] == 4

    # multi-turn rows learn every assistant turn, each ending with <|eot_id|>, and nothing else
    tok_dir = out.tokenized.path
    rows = {r["id"]: r for split in ("train", "validation")
            for r in datasets.Dataset.from_parquet(str(tok_dir / f"{split}.parquet")).to_list()}
    merged = out.model.path
    tok = AutoTokenizer.from_pretrained(merged)
    conv = rows["chat:conv_3"]
    learned = tok.decode([i for i in conv["labels"] if i != -100])
    assert learned == ("보통 2학년 1학기부터 신청할 수 있습니다.<|eot_id|>평점 기준이 있을 수 있으니 학사 공지의 복수전공 안내를 확인하세요.<|eot_id|>"
                       "개신누리 학사 시스템에서 신청합니다.<|eot_id|>")

    # the published model: its tokenizer's chat template is the training prompt, persona included
    folder = next(p for p in (tmp_path / "publish").iterdir() if p.is_dir())
    pub = AutoTokenizer.from_pretrained(folder / "merged")
    card = read_run_card(folder / "merged")
    persona = card.template_for("cbnu")
    assert persona.name == "persona" and persona.system.startswith("당신은 충북대학교(CBNU) 학생들을 돕는 캠퍼스 챗봇")
    prompt = pub.apply_chat_template([{"role": "user", "content": EXAMPLE_QUESTION}], tokenize=False, add_generation_prompt=True)
    assert prompt == card.prompt_example == render_prompt(persona, EXAMPLE_QUESTION, "", pub)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + persona.system + "<|eot_id|>")
    # a single-turn training row starts with exactly the ids serving encodes for its prompt
    single = next(r for i, r in rows.items() if i.startswith("kullm:") and not r["truncated"])
    n = next(k for k, x in enumerate(single["labels"]) if x != -100)
    assert tok.decode(single["input_ids"][:n]).startswith("<|begin_of_text|><|start_header_id|>system")
    assert encode_prompt(pub, tok.decode(single["input_ids"][:n]), persona) == single["input_ids"][:n]
    assert card.special_tokens.end_token == "<|eot_id|>" and card.special_tokens.pad_token == "<|reserved_special_token_0|>"
    gen = json.loads((folder / "merged" / "generation_config.json").read_text())
    assert card.special_tokens.end_id in gen["eos_token_id"]
    readme = (folder / "merged" / "README.md").read_text()
    assert "- llama\n" in readme and "gpt_neox" not in readme and "## Prompt template `persona`" in readme and persona.system in readme
    assert _store.is_complete(merged) and out.eval.passed
