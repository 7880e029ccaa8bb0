"""GPT-NeoX (polyglot-ko), Llama (Llama-3) and Qwen2, each as a tiny model built in-process: labels decode to the
special tokens each family and template need, packed rows give the logits of each example alone, and a trained
adapter merges into the same logits."""
import json

import pytest
import torch

from culbot.pipeline_config.schema import ConfigError
from culbot.pipeline_config.train_schema import TokenizeConfig, MergeAdapterConfig
from culbot.tasks import _store
from culbot.tasks.contracts import BaseModelRef, TemplateSet
from culbot.tasks.special_tokens import encode_prompt
from culbot.tasks.templates import load_template, render_prompt
from culbot.tasks.tokenize import IGNORE, SPECIAL_TOKENS_FILE, run_tokenize, tokenize_rows
from tests.conftest import SAMPLES

TINY_IDS = {"gpt_neox": "culbot:tiny", "llama": "culbot:tiny-llama", "qwen2": "culbot:tiny-qwen2"}
FOLDERS = {"gpt_neox": "tiny", "llama": "tiny-llama", "qwen2": "tiny-qwen2"}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    from culbot.tasks.tiny_model import build_tiny_model, sample_corpus

    root = tmp_path_factory.mktemp("family-models")
    for family, folder in FOLDERS.items():
        build_tiny_model(root / folder, sample_corpus(SAMPLES), family=family)
    return root


def _base(models_root, family) -> BaseModelRef:
    return BaseModelRef(name=TINY_IDS[family], path=str(models_root / FOLDERS[family]))


def _tokenizer(models_root, family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_root / FOLDERS[family])


# (family, template) -> what the text starts with, the token every answer ends with, the pad and where it came from
CASES = {
    ("gpt_neox", "kullm"): ("아래는", "<|endoftext|>", "<|endoftext|>", "tokenizer"),
    ("llama", "kullm"): ("<|begin_of_text|>아래는", "<|end_of_text|>", "<|reserved_special_token_0|>", "family"),
    ("llama", "persona"): ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n당신은 충북대학교", "<|eot_id|>",
                           "<|reserved_special_token_0|>", "family"),
    ("qwen2", "kullm"): ("아래는", "<|im_end|>", "<|endoftext|>", "tokenizer"),
    ("qwen2", "persona"): ("<|im_start|>system\n당신은 충북대학교", "<|im_end|>", "<|endoftext|>", "tokenizer"),
}


@pytest.mark.parametrize("family,template", list(CASES))
def test_labels_decode_to_the_answer_and_the_end_token_of_the_family_and_template(family, template, models_root, sample_formatted, tmp_path):
    import datasets

    start, end, pad, pad_from = CASES[(family, template)]
    out = run_tokenize(sample_formatted, _base(models_root, family), tmp_path / "tok", TokenizeConfig(cutoff_len=1024, template=template))
    tokens = json.loads((out.path / SPECIAL_TOKENS_FILE).read_text())[template]
    assert (tokens["end_token"], tokens["pad_token"], tokens["pad_from"]) == (end, pad, pad_from)
    assert _store.read_model(out.path / "templates.json", TemplateSet).for_source("cbnu").name == template   # every source
    tok = _tokenizer(models_root, family)
    tok.pad_token = pad
    formatted = {r["id"]: r for r in datasets.Dataset.from_parquet(str(sample_formatted / "train.parquet")).to_list()}
    rows = datasets.Dataset.from_parquet(str(out.path / "train.parquet")).to_list()
    t = load_template(template)
    for row in [r for r in rows if not r["truncated"]][:5]:
        text = tok.decode(row["input_ids"])
        assert text.startswith(start), text[:80]
        assert tok.convert_tokens_to_ids(pad) not in row["input_ids"] or pad == end   # a pad is never trained on
        # the prompt's ids are exactly what serving encodes for the same question (render_prompt + encode_prompt)
        src = formatted[row["id"]]
        prompt_ids = encode_prompt(tok, render_prompt(t, src["instruction"], src["input"], tok), t)
        n = len(prompt_ids)
        assert row["input_ids"][:n] == prompt_ids and row["labels"][:n] == [IGNORE] * n
        learned = row["labels"][n:]
        assert IGNORE not in learned and learned == row["input_ids"][n:]
        assert tok.decode(learned, skip_special_tokens=False).startswith(src["response"].strip()[:20])
        assert learned[-1] == tokens["end_id"] or (family == "qwen2" and template == "persona" and tok.decode(learned[-2:]) == "<|im_end|>\n")


def test_a_chat_template_on_a_model_without_one_is_a_clear_error(models_root, sample_formatted, tmp_path):
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        run_tokenize(sample_formatted, _base(models_root, "gpt_neox"), tmp_path / "tok", TokenizeConfig(template="persona"))


@pytest.mark.parametrize("family,template", [("llama", "persona"), ("qwen2", "persona"), ("gpt_neox", "kullm")])
def test_a_multi_turn_conversation_learns_every_assistant_turn_and_nothing_else(family, template, models_root):
    from culbot.tasks.special_tokens import special_tokens

    tok = _tokenizer(models_root, family)
    t = load_template(template)
    tokens = {template: special_tokens(tok, t, family)}
    convo = [{"role": "user", "content": "기숙사 신청은 언제 해요?"}, {"role": "assistant", "content": "합격자 발표 후에 해요."},
             {"role": "user", "content": "어디서 해요?"}, {"role": "assistant", "content": "생활관 홈페이지에서 해요."}]
    rows = [{"id": "c1", "source": "sharegpt", "template": template, "instruction": "", "input": "", "prompt": "", "response": "",
             "messages": json.dumps(convo, ensure_ascii=False)}]
    out, counts = tokenize_rows(rows, tok, TemplateSet(map={}, default=template, templates={template: t}), tokens,
                                cutoff_len=512, train_on_inputs=False, overlength="truncate")
    ex = out.to_pylist()[0]
    spans, cur = [], []
    for i, lab in zip(ex["input_ids"], ex["labels"]):
        if lab == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(i)
    spans.append(cur) if cur else None
    learned = [tok.decode(s) for s in spans]
    end = tokens[template].end_token
    assert [x.replace("\n", "") for x in learned] == [f"합격자 발표 후에 해요.{end}", f"생활관 홈페이지에서 해요.{end}"]
    assert counts["label_tokens"] == sum(len(s) for s in spans)


def _tiny(family):
    from transformers import AutoModelForCausalLM

    from culbot.tasks.tiny_model import build_tokenizer, tiny_config

    cfg = tiny_config(family, build_tokenizer([], 300, family), vocab_size=100, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", list(TINY_IDS))
def test_packed_rows_give_each_examples_own_logits(family):
    import datasets

    from culbot.tasks.collate import PackedRows, PositionCollator

    model = _tiny(family)
    g = torch.Generator().manual_seed(1)
    ex = [{"input_ids": (ids := torch.randint(3, 100, (n,), generator=g).tolist()), "labels": ids} for n in (12, 7, 20, 5, 9)]
    rows = PackedRows(datasets.Dataset.from_list(ex), max_len=32)
    assert len(rows) < len(ex)
    batch = PositionCollator(pad_id=0)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        packed = model(**batch).logits
        for r, members in enumerate(rows.rows):
            start = 0
            for i in members:
                k = len(ex[i]["input_ids"])
                alone = model(input_ids=torch.tensor([ex[i]["input_ids"]])).logits[0]
                assert (packed[r, start:start + k] - alone).abs().max().item() < 1e-4, (family, r, i)
                start += k


@pytest.mark.slow
@pytest.mark.parametrize("family,template,targets", [("llama", "persona", "all-linear"), ("qwen2", "persona", None)])
def test_a_trained_adapter_of_each_family_merges_into_the_same_logits(family, template, targets, models_root, sample_formatted, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from culbot.pipeline_config.train_schema import load_train_profile
    from culbot.tasks.merge_adapter import run_merge_adapter
    from culbot.tasks.run_folder import read_run_card
    from culbot.tasks.train import prepare_run, run_training

    sets = [f"model.base={TINY_IDS[family]}", f"tokenize.template={template}", "train.max_steps=2", "train.save_steps=2", "train.eval_steps=2"]
    sets += [f"lora.target_modules={targets}"] if targets else []
    prof = load_train_profile("cpu-tiny", sets)
    tokenized = run_tokenize(sample_formatted, _base(models_root, family), tmp_path / "tok", prof.tokenize).path
    cfg = prepare_run(prof, tokenized, runs_root=tmp_path / "runs", models_root=models_root, samples_dir=SAMPLES)
    assert run_training(cfg, prof).status == "completed"
    card = read_run_card(cfg.parent / "adapter")
    expected = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] if targets else ["q_proj", "v_proj"]
    assert card.lora_targets == expected and card.model_type == family
    m = run_merge_adapter(cfg.parent, MergeAdapterConfig(), tmp_path / "models", ["도서관은 몇 시에 여나요?", "장학금 종류는?"])
    assert m.counts["max_logit_diff"] < 1e-4 and m.counts["saved_max_logit_diff"] < 1e-4
    gen = GenerationConfig.from_pretrained(m.path)
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert card.special_tokens.end_id in stops   # generation stops on the token the answers learned (Llama: <|eot_id|> too)
    assert (len(stops), card.special_tokens.end_token) == ((2, "<|eot_id|>") if family == "llama" else (1, "<|im_end|>"))
    tok = AutoTokenizer.from_pretrained(m.path)
    assert tok.pad_token_id is not None
    question = "기숙사 신청은 언제 해요?"
    assert tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True) == \
        card.prompt_example == render_prompt(card.template_for("cbnu"), question, "", tok)


@pytest.mark.parametrize("family,template", [("llama", "kullm"), ("llama", "persona"), ("gpt_neox", "kullm")])
def test_tokenizing_a_split_in_batches_gives_what_one_batch_and_each_example_alone_give(family, template, models_root, tmp_path):
    """run_tokenize streams a split through write_examples in batches (rows rendered, encoded in a background thread,
    assembled on flat arrays): the file must hold what tokenize_rows makes of all rows at once, and each example what
    build_from_pieces makes of its own pieces, with the BOS the tokenizer adds (llama), plain-text rows, multi-turn
    conversations, truncation and drops; an empty split is a valid empty file."""
    import random

    import pyarrow.parquet as pq

    from culbot.tasks import tokenize as td
    from culbot.tasks.special_tokens import prefix_ids, special_tokens

    tok, t = _tokenizer(models_root, family), load_template(template)
    tokens = {template: special_tokens(tok, t, family)}
    templates = TemplateSet(map={}, default=template, templates={template: t})
    rng = random.Random(5)
    words = ["기숙사", "신청", "충북대학교", "도서관", "학생", "언제", "어디서", "합니다", "오전", "9시", "{input}", " ", "\n"]
    say = lambda k: "".join(rng.choices(words, k=rng.randrange(1, k)))  # noqa: E731
    rows = []
    for i in range(120):
        kind = rng.choice(["single", "single", "completion", "turns"])
        messages = ([{"role": "completion", "content": say(40)}] if kind == "completion" else
                    [{"role": r, "content": say(15)} for _ in range(rng.randrange(1, 3)) for r in ("user", "assistant")] if kind == "turns" else [])
        ins, inp = say(12), say(20) if rng.random() < 0.4 else ""
        rows.append({"id": f"r{i}", "source": rng.choice(["kullm", "cbnu"]), "template": template, "instruction": ins, "input": inp,
                     "messages": json.dumps(messages, ensure_ascii=False) if messages else "",
                     "prompt": render_prompt(t, ins, inp, tok) if not messages and t.kind != "chat" else "", "response": say(30)})
    for cutoff, overlength in ((512, "truncate"), *((c, "truncate") for c in (12, 17, 24, 31)), (24, "drop")):
        settings = {"cutoff_len": cutoff, "train_on_inputs": False, "overlength": overlength}
        whole, counts = tokenize_rows(rows, tok, templates, tokens, **settings)
        path = tmp_path / f"{cutoff}-{overlength}.parquet"
        streamed = td.write_examples((rows[i:i + 7] for i in range(0, len(rows), 7)), path, tok, templates, tokens, **settings)
        assert pq.read_table(path).to_pylist() == whole.to_pylist()
        assert streamed.model_dump() == {**counts, "by_source": td.count_sources(whole)}
        want, dropped = [], 0
        for r in rows:   # each example alone, from its own pieces
            completion, segs = td.row_segments(r, t, tok, True)
            end = [tok.eos_token_id] if completion or t.kind != "chat" else []
            bos = prefix_ids(tok) if completion else tokens[template].bos
            pieces = ([(bos, False)] if bos else []) + [(ids + (end if learned else []), learned)
                                                         for ids, (_, learned) in zip(td.encode_texts(tok, [s for s, _ in segs]), segs)]
            if not completion and t.kind != "chat":
                assert pieces[len(bos) > 0][0] == td.encode_texts(tok, [render_prompt(t, r["instruction"], r["input"], tok)])[0] or r["messages"]
            ex, reason = td.build_from_pieces(pieces, **settings)
            if ex is None:
                dropped += 1
            else:
                want.append({"id": r["id"], "source": r["source"], **ex})
        assert whole.to_pylist() == want and counts["kept"] == len(want) and dropped == counts["over_cutoff"] + counts["prompt_fills_cutoff"]
        if cutoff < 512:
            assert counts["truncated"] or counts["over_cutoff"]
    if family == "llama" and template == "kullm":
        assert tokens[template].bos and all(r["input_ids"][0] == tokens[template].bos[0] for r in whole.to_pylist())
    empty = tmp_path / "empty.parquet"
    assert td.write_examples(iter([]), empty, tok, templates, tokens, **settings).kept == 0
    assert pq.read_table(empty).num_rows == 0 and pq.read_table(empty).schema == td.examples_schema()
