"""Tokenization: EOS only when not truncated, prompt labels masked, cutoff handling, EOS agreement."""
from culbot.tasks.tokenize import IGNORE, build_example
from tests.conftest import tiny_base


def test_eos_appended_and_prompt_masked():
    ex, _ = build_example([5, 6, 7], [8, 9], eos_id=2, cutoff_len=10, train_on_inputs=False, overlength="truncate")
    assert ex["input_ids"] == [5, 6, 7, 8, 9, 2]
    assert ex["labels"] == [IGNORE, IGNORE, IGNORE, 8, 9, 2]
    assert ex["truncated"] is False


def test_train_on_inputs_keeps_prompt_labels():
    ex, _ = build_example([5, 6], [8], eos_id=2, cutoff_len=10, train_on_inputs=True, overlength="truncate")
    assert ex["labels"] == [5, 6, 8, 2]


def test_truncation_drops_eos_and_counts():
    ex, _ = build_example([5, 6, 7], [8, 9, 10, 11], eos_id=2, cutoff_len=5, train_on_inputs=False, overlength="truncate")
    assert ex["input_ids"] == [5, 6, 7, 8, 9] and ex["labels"] == [IGNORE, IGNORE, IGNORE, 8, 9] and ex["truncated"]
    assert build_example([5, 6, 7], [8, 9, 10], eos_id=2, cutoff_len=5, train_on_inputs=False, overlength="drop") == (None, "over_cutoff")
    assert build_example([1] * 6, [8], eos_id=2, cutoff_len=5, train_on_inputs=False, overlength="truncate") == (None, "prompt_fills_cutoff")
    ex, _ = build_example([5, 6, 7], [8], eos_id=2, cutoff_len=5, train_on_inputs=False, overlength="drop")
    assert ex["input_ids"] == [5, 6, 7, 8, 2]   # exactly at the cutoff, EOS included


def test_tokenize_formatted_sample_with_the_tiny_tokenizer(tmp_path, sample_formatted, tiny_model):
    import datasets
    from transformers import AutoTokenizer

    from culbot.pipeline_config.train_schema import TokenizeConfig
    from culbot.tasks import _store
    from culbot.tasks.contracts import TEMPLATES_FILE, TemplateSet, TokenCounts, short_hash
    from culbot.tasks.templates import load_template, render_prompt
    from culbot.tasks.tokenize import run_tokenize

    base = tiny_base(tiny_model)
    m = run_tokenize(sample_formatted, base, tmp_path / "tok", TokenizeConfig(cutoff_len=128))
    train = datasets.Dataset.from_parquet(str(tmp_path / "tok" / short_hash(m.content_hash) / "train.parquet")).to_list()
    counts = TokenCounts.model_validate(m.counts)
    n_train = len(_store.read_table(sample_formatted / "train.parquet", ["id"]))
    assert counts.train.rows == n_train and counts.train.kept + counts.train.over_cutoff + counts.train.prompt_fills_cutoff == n_train
    assert sum(counts.train.by_source.values()) == counts.train.kept and set(counts.train.by_source) == {"cbnu", "kullm", "univ100"}
    # the lineage and the templates travel forward, so training reads them from its own input
    manifest = _store.read_manifest(m.path)
    assert manifest.lineage.formatted == _store.read_manifest(sample_formatted).content_hash and manifest.lineage.dataset
    assert _store.read_model(m.path / TEMPLATES_FILE, TemplateSet) == _store.read_model(sample_formatted / TEMPLATES_FILE, TemplateSet)
    assert all(len(r["input_ids"]) <= 128 and len(r["labels"]) == len(r["input_ids"]) for r in train)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    formatted = {r["id"]: r for r in datasets.Dataset.from_parquet(str(sample_formatted / "train.parquet")).to_list()}
    ex = next(r for r in train if not r["truncated"])
    src = formatted[ex["id"]]
    # the prompt tokens are exactly those that inference gets from the same template code
    template = load_template(src["template"])
    assert src["prompt"] == render_prompt(template, *_instruction_input(src, template))
    n_prompt = len(tok(src["prompt"], add_special_tokens=False)["input_ids"])
    assert ex["input_ids"][:n_prompt] == tok(src["prompt"], add_special_tokens=False)["input_ids"]
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt and ex["input_ids"][-1] == 2 and ex["labels"][-1] == 2
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == src["response"]
    again = run_tokenize(sample_formatted, base, tmp_path / "tok", TokenizeConfig(cutoff_len=128, packing=True))   # packing does not shape tokens
    assert _store.read_manifest(again.path).created_at == manifest.created_at
    assert run_tokenize(sample_formatted, base, tmp_path / "tok", TokenizeConfig(cutoff_len=64)).content_hash != m.content_hash
    assert _store.is_complete(m.path)


def _instruction_input(formatted_row, template):
    """Recover instruction/input from a rendered prompt (test helper for the round trip)."""
    p = formatted_row["prompt"]
    if "### 입력:\n" in p:
        head, rest = p.split("### 명령어:\n", 1)[1].split("\n\n### 입력:\n", 1)
        return head, rest.split("\n\n### 응답:\n", 1)[0]
    return p.split("### 명령어:\n", 1)[1].split("\n\n### 응답:\n", 1)[0], ""


def test_the_columnar_tokenizer_makes_exactly_what_build_from_pieces_makes(tiny_model):
    """tokenize_rows builds ids and labels on flat arrays (for speed); every kept example, every drop and every count
    must be what the per-example rule gives, with and without truncation, dropping and train_on_inputs."""
    import random

    from transformers import AutoTokenizer

    from culbot.tasks.contracts import TemplateSet
    from culbot.tasks.special_tokens import special_tokens
    from culbot.tasks.templates import load_template, render_prompt
    from culbot.tasks.tokenize import build_from_pieces, encode_texts, tokenize_rows

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    t = load_template("kullm")
    tokens = {"kullm": special_tokens(tok, t, "gpt_neox")}
    rng = random.Random(3)
    words = ["기숙사", "신청", "충북대학교", "도서관", "학생", "언제", "어디서", "합니다", "오전", "9시"]
    rows = []
    for i in range(300):
        ins, inp, out = (" ".join(rng.choices(words, k=rng.randrange(1, n))) for n in (12, 30, 60))
        inp = inp if rng.random() < 0.4 else ""
        rows.append({"id": f"r{i}", "source": "kullm", "template": "kullm", "instruction": ins, "input": inp, "messages": "",
                     "prompt": render_prompt(t, ins, inp), "response": out})
    templates = TemplateSet(map={}, default="kullm", templates={"kullm": t})
    for cutoff, train_on_inputs, overlength in ((1024, False, "truncate"), (40, False, "truncate"), (40, True, "truncate"), (40, False, "drop")):
        table, counts = tokenize_rows(rows, tok, templates, tokens, cutoff_len=cutoff, train_on_inputs=train_on_inputs, overlength=overlength)
        got = table.to_pylist()
        want, reasons = [], {"over_cutoff": 0, "prompt_fills_cutoff": 0}
        enc = encode_texts(tok, [x for r in rows for x in (r["prompt"], r["response"])])
        for i, r in enumerate(rows):
            pieces = ([(tokens["kullm"].bos, False)] if tokens["kullm"].bos else []) + [(enc[2 * i], False), (enc[2 * i + 1] + [tokens["kullm"].end_id], True)]
            ex, reason = build_from_pieces(pieces, cutoff_len=cutoff, train_on_inputs=train_on_inputs, overlength=overlength)
            if ex is None:
                reasons[reason] += 1
            else:
                want.append({"id": r["id"], "source": "kullm", **ex})
        assert got == want, (cutoff, train_on_inputs, overlength)
        assert counts["over_cutoff"] == reasons["over_cutoff"] and counts["prompt_fills_cutoff"] == reasons["prompt_fills_cutoff"]
        assert counts["kept"] == len(want) and counts["truncated"] == sum(e["truncated"] for e in want)
        assert counts["label_tokens"] == sum(sum(1 for x in e["labels"] if x != IGNORE) for e in want)
        if cutoff == 40:
            assert counts["truncated"] or counts["over_cutoff"]   # the short cutoff does cut
    assert reasons["over_cutoff"] > 0


def test_a_tokenizer_json_that_sets_truncation_or_padding_still_encodes_every_text_whole(tiny_model):
    """Some Hub tokenizer.json files enable truncation or padding; transformers turns them off on every call, and the
    batched encoder (which calls the Rust tokenizer directly) must too, without changing the caller's tokenizer."""
    from transformers import AutoTokenizer

    from culbot.tasks.tokenize import encode_texts

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    texts = ["충북대학교 도서관은 평일 오전 9시에 엽니다. 학생증을 꼭 가져오세요.", "기숙사"]
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(want[0]) > 8
    tok.backend_tokenizer.enable_truncation(8)
    tok.backend_tokenizer.enable_padding(length=16, pad_id=0)
    assert encode_texts(tok, texts) == want
    assert tok.backend_tokenizer.truncation["max_length"] == 8 and tok.backend_tokenizer.padding["length"] == 16


def test_tokenize_logs_its_progress(tmp_path, sample_formatted, tiny_model, monkeypatch, caplog):
    import logging

    from culbot.pipeline_config.train_schema import TokenizeConfig
    from culbot.tasks import _store, tokenize as tokenize_stage

    monkeypatch.setattr(tokenize_stage, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(tokenize_stage, "BATCH_ROWS", 16)
    with caplog.at_level(logging.INFO, logger="culbot.tokenize"):
        tokenize_stage.run_tokenize(sample_formatted, tiny_base(tiny_model), tmp_path / "tok", TokenizeConfig(cutoff_len=128))
    n = _store.count_rows(sample_formatted / "train.parquet")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenize train:")]
    assert n > 16 and len(lines) == -(-n // 16)
    assert lines[0].startswith(f"tokenize train: 16/{n:,} (") and lines[-1].startswith(f"tokenize train: {n:,}/{n:,} (100%) rows")
