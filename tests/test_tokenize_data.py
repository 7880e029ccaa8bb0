"""Tokenization: EOS only when not truncated, prompt labels masked, cutoff handling, EOS agreement."""
from culbot.tasks.tokenize_data import IGNORE, build_example
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

    from culbot.pipeline_config.train_schema import DataSpec
    from culbot.tasks import _store
    from culbot.tasks.contracts import TEMPLATES_FILE, TemplateSet, TokenCounts, short_hash
    from culbot.tasks.templates import load_template, render_prompt
    from culbot.tasks.tokenize_data import run_tokenize

    base = tiny_base(tiny_model)
    m = run_tokenize(sample_formatted, base, tmp_path / "tok", DataSpec(cutoff_len=128))
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
    again = run_tokenize(sample_formatted, base, tmp_path / "tok", DataSpec(cutoff_len=128, packing=True))   # packing does not shape tokens
    assert _store.read_manifest(again.path).created_at == manifest.created_at
    assert run_tokenize(sample_formatted, base, tmp_path / "tok", DataSpec(cutoff_len=64)).content_hash != m.content_hash
    assert _store.is_complete(m.path)


def _instruction_input(formatted_row, template):
    """Recover instruction/input from a rendered prompt (test helper for the round trip)."""
    p = formatted_row["prompt"]
    if "### 입력:\n" in p:
        head, rest = p.split("### 명령어:\n", 1)[1].split("\n\n### 입력:\n", 1)
        return head, rest.split("\n\n### 응답:\n", 1)[0]
    return p.split("### 명령어:\n", 1)[1].split("\n\n### 응답:\n", 1)[0], ""
