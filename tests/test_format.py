"""The format stage: templates per source, their full text saved with the data, chat templates through a tokenizer."""
from culbot.pipeline_config.schema import FormatConfig, MergeDataConfig
from culbot.tasks import _store
from culbot.tasks.contracts import TEMPLATES_FILE, TemplateSet, short_hash
from culbot.tasks.format import run_format
from culbot.tasks.merge_data import run_merge
from tests.test_templates import KULLM_INPUT, tiny_chat_tokenizer


def _dataset(tmp_path):
    def stage(name, rows):
        folder = tmp_path / name
        _store.atomic_write_jsonl(folder / "rows.jsonl", rows)
        _store.write_manifest(folder, stage="t", inputs={}, config={}, counts={})
        return folder

    inputs = {
        "kullm": stage("k", [{"id": "k1", "instruction": "요약하세요", "input": "긴 글", "output": "요약"}, {"id": "k2", "instruction": "인사", "input": "", "output": "안녕"}]),
        "cbnu": stage("c", [{"id": "c1", "instruction": "도서관 시간?", "input": "", "output": "9시"}]),
        "univ100": stage("u", [{"id": "u1", "instruction": "학식 어때요?", "input": "", "output": "맛있어요"}]),
    }
    return run_merge(inputs, MergeDataConfig(validation_fraction=0.01, out_root=tmp_path / "ds"))


def test_format_picks_templates_per_source_and_saves_their_text(tmp_path):
    import datasets

    d = _dataset(tmp_path)
    m = run_format(d.path, FormatConfig(out_root=tmp_path / "fmt"))
    folder = tmp_path / "fmt" / short_hash(m.content_hash)
    rows = {r["id"]: r for s in ("train", "validation") for r in datasets.Dataset.from_parquet(str(folder / f"{s}.parquet")).to_list()}
    assert {k: r["template"] for k, r in rows.items()} == {"k1": "kullm", "k2": "kullm", "c1": "cbnu2", "u1": "cbnu"}
    assert rows["k1"]["prompt"] == KULLM_INPUT.replace("{instruction}", "요약하세요").replace("{input}", "긴 글")
    assert rows["k1"]["response"] == "요약"
    saved = _store.read_model(folder / TEMPLATES_FILE, TemplateSet)
    assert saved.templates["kullm"].prompt_input == KULLM_INPUT
    assert saved.map == {"kullm": "kullm", "cbnu": "cbnu2", "univ100": "cbnu", "feedback": "cbnu2"} and set(saved.templates) == {"kullm", "cbnu", "cbnu2"}
    assert m.stage == "format" and m.counts["by_template"] == {"kullm": 2, "cbnu2": 1, "cbnu": 1}
    assert _store.read_manifest(folder).lineage.dataset == d.content_hash   # the lineage travels forward
    m2 = run_format(d.path, FormatConfig(template_map={"cbnu": "koalpaca"}, out_root=tmp_path / "fmt"))
    assert m2.content_hash != m.content_hash and m2.counts["by_template"] == {"kullm": 3, "koalpaca": 1}


def test_format_with_chat_template(tmp_path):
    d = _dataset(tmp_path)
    tok_dir = tiny_chat_tokenizer(tmp_path / "tok")
    m = run_format(d.path, FormatConfig(template_map={"cbnu": "persona"}, chat_tokenizer=tok_dir, out_root=tmp_path / "fmt"))
    assert m.counts["by_template"]["persona"] == 1
