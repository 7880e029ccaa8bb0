"""Extra datasets (KULLM-v2 and others) in alpaca, sharegpt, messages and completion form, through datasets: input kept,
conversations checked, unreadable rows quarantined, a dataset with no usable row refused, deterministic sampling."""
import json

import pytest

from culbot.pipeline_config.schema import ConfigError, DatasetEntry, load_data_profile
from culbot.tasks import _store
from culbot.tasks.load_dataset import NoUsableRows, run_load_dataset
from tests.conftest import SAMPLES


def _entry(tmp_path, **kw) -> DatasetEntry:
    return DatasetEntry(**{"name": "kullm", "file": SAMPLES / "kullm_sample.jsonl", "out_dir": tmp_path / "k", **kw})


def test_kullm_sample_keeps_input_and_quarantines_broken_rows(tmp_path):
    m = run_load_dataset(_entry(tmp_path))
    assert m.counts == {"loaded": 24, "sampled": 24, "rows": 22, "with_input": 10, "conversations": 0, "quarantined": 2}
    rows = _store.read_jsonl(tmp_path / "k" / "rows.jsonl")
    translate = [r for r in rows if r["id"] == "kullm:alpaca_2"][0]
    assert translate["input"] == "나는 도서관에서 공부하는 것을 좋아한다."   # upstream lost every input
    q = _store.read_jsonl(tmp_path / "k" / "quarantine.jsonl")
    assert [(x["item"]["id"], x["reason"]) for x in q] == [("alpaca_13", "empty_output"), ("broken_1", "output_missing_or_not_text")]


def test_kullm_v2_is_the_default_dataset_and_the_sample_profile_loads_it_from_a_file():
    from culbot.pipeline_config.schema import DataProfile

    default = DataProfile(name="x").datasets
    assert [(d.name, d.hub_id, d.type) for d in default] == [("kullm", "nlpai-lab/kullm-v2", "alpaca")]
    assert [(d.name, d.type, d.file.name) for d in load_data_profile("sample").datasets] == [("kullm", "alpaca", "kullm_sample.jsonl")]


def test_sharegpt_conversations_are_checked_and_a_two_turn_one_is_a_plain_row(tmp_path):
    m = run_load_dataset(DatasetEntry(name="chat", file=SAMPLES / "sharegpt_sample.jsonl", type="sharegpt", out_dir=tmp_path / "c"))
    assert m.counts["rows"] == 7 and m.counts["conversations"] == 4 and m.counts["quarantined"] == 3   # conv_2: one turn with a system message
    rows = {r["id"]: r for r in _store.read_jsonl(tmp_path / "c" / "rows.jsonl")}
    three = rows["chat:conv_3"]["messages"]
    assert [t["role"] for t in three] == ["user", "assistant"] * 3 and three[-1]["content"] == "개신누리 학사 시스템에서 신청합니다."
    assert rows["chat:conv_2"]["messages"][0] == {"role": "system", "content": "당신은 충북대학교 학생을 돕는 도우미입니다."}
    plain = rows["chat:conv_5"]
    assert "messages" not in plain and plain["instruction"] == "학생식당 메뉴는 어디서 봐요?" and plain["input"] == ""
    q = _store.read_jsonl(tmp_path / "c" / "quarantine.jsonl")
    assert [(x["item"]["id"], x["reason"]) for x in q] == [("conv_6", "ends_without_answer"), ("conv_7", "unknown_role: bot"),
                                                           ("conv_8", "empty_assistant_turn")]


def test_messages_completion_and_alpaca_history_with_field_mappings(tmp_path):
    src = tmp_path / "m.jsonl"
    msgs = [{"chat": [{"who": "user", "text": "수강신청은 어디서 해요?"}, {"who": "assistant", "text": "개신누리에서 해요."},
                      {"who": "user", "text": "언제요?"}, {"who": "assistant", "text": "학사일정의 수강신청 기간에요."}]}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in msgs) + "\n")
    m = run_load_dataset(DatasetEntry(name="oai", file=src, type="messages", fields={"messages": "chat", "role": "who", "content": "text"},
                                      out_dir=tmp_path / "o"))
    assert m.counts["conversations"] == 1 and _store.read_jsonl(tmp_path / "o" / "rows.jsonl")[0]["messages"][2]["content"] == "언제요?"
    comp = tmp_path / "c.jsonl"
    comp.write_text(json.dumps({"text": "충북대학교는 청주시에 있습니다."}, ensure_ascii=False) + "\n")
    run_load_dataset(DatasetEntry(name="corpus", file=comp, type="completion", out_dir=tmp_path / "cc"))
    assert _store.read_jsonl(tmp_path / "cc" / "rows.jsonl")[0]["messages"] == [{"role": "completion", "content": "충북대학교는 청주시에 있습니다."}]
    hist = tmp_path / "h.jsonl"
    hist.write_text(json.dumps({"q": "장학금 종류는?", "a": "성적장학금이 있어요.", "history": [["안녕하세요", "안녕하세요!"]]}, ensure_ascii=False) + "\n")
    run_load_dataset(DatasetEntry(name="lf", file=hist, type="alpaca", fields={"instruction": "q", "output": "a"}, out_dir=tmp_path / "h"))
    row = _store.read_jsonl(tmp_path / "h" / "rows.jsonl")[0]
    assert [t["content"] for t in row["messages"]] == ["안녕하세요", "안녕하세요!", "장학금 종류는?", "성적장학금이 있어요."]


def test_a_dataset_with_no_usable_row_fails_loudly_and_keeps_the_rows(tmp_path):
    # sharegpt rows read as alpaca: every row lacks instruction/output
    with pytest.raises(NoUsableRows, match=r"datasets\[chat\] .*type alpaca\): none of 10 rows could be read \(instruction_missing_or_not_text ×10\)"):
        run_load_dataset(DatasetEntry(name="chat", file=SAMPLES / "sharegpt_sample.jsonl", type="alpaca", out_dir=tmp_path / "c"))
    assert len(_store.read_jsonl(tmp_path / "c" / "quarantine.jsonl")) == 10 and _store.read_manifest(tmp_path / "c") is None


def test_entry_mistakes_are_config_errors_naming_the_dataset_and_field(tmp_path):
    bad = [({"name": "x", "hub_id": "a/b"}, "hub_id needs a revision"),
           ({"name": "x", "file": "f.jsonl", "hub_id": "a/b", "revision": "main"}, "exactly one of hub_id and file"),
           ({"name": "x", "file": "f.jsonl", "type": "sharegpt", "fields": {"instruction": "q"}}, r"fields \['instruction'\] do not apply to type sharegpt"),
           ({"name": "cbnu", "file": "f.jsonl"}, r"names \['cbnu'\] are used twice or by a built-in source")]
    for entry, message in bad:
        p = tmp_path / "p.yaml"
        p.write_text(json.dumps({"name": "p", "datasets": [entry]}))
        with pytest.raises(ConfigError, match=message):
            load_data_profile(p)


def test_sampling_is_deterministic_by_seed(tmp_path):
    def ids(seed, out):
        run_load_dataset(_entry(tmp_path, max_rows=5, seed=seed, out_dir=tmp_path / out))
        return [r["id"] for r in _store.read_jsonl(tmp_path / out / "rows.jsonl")]

    a, b, c = ids(1, "a"), ids(1, "b"), ids(2, "c")
    assert a == b and len(a) <= 5 and a != c


def test_fraction_and_parquet_source(tmp_path):
    import datasets

    rows = [{"id": str(i), "instruction": f"명령 {i}", "input": "", "output": f"응답 {i}"} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "k.parquet"))
    m = run_load_dataset(_entry(tmp_path, file=tmp_path / "k.parquet", fraction=0.25))
    assert m.counts["rows"] == 10


def test_hub_source_goes_through_datasets_and_fails_clearly_offline(tmp_path):
    # HF_HUB_OFFLINE=1 in tests: the real load_dataset(hub id, revision) path runs and refuses to download.
    with pytest.raises(Exception, match="(?i)offline|couldn't find|connection|not found"):
        run_load_dataset(DatasetEntry(name="kullm", hub_id="nlpai-lab/kullm-v2", revision="main", out_dir=tmp_path / "k"))
    assert _store.read_manifest(tmp_path / "k") is None


def test_unsupported_file_type_is_named(tmp_path):
    p = tmp_path / "k.txt"
    p.write_text("x")
    with pytest.raises(ValueError, match=r"datasets\[kullm\].file: .*k.txt: unsupported type '.txt'"):
        run_load_dataset(_entry(tmp_path, file=p))


def _strict_json(line: str):
    def no_bare(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(line, parse_constant=no_bare)


def test_a_broken_jsonl_line_is_quarantined_with_file_and_line_and_the_rest_loads(tmp_path):
    src = tmp_path / "kullm.jsonl"
    good = [json.dumps({"id": f"a{i}", "instruction": f"명령 {i}", "input": "", "output": f"응답 {i}"}, ensure_ascii=False) for i in range(4)]
    src.write_text("\n".join([good[0], '{"id": "cut", "instruction": "잘린 줄', good[1], "",
                              '{"id": "nan", "instruction": "x", "input": NaN, "output": "y"}', good[2], "[1, 2]", good[3]]) + "\n")
    m = run_load_dataset(_entry(tmp_path, file=src))
    assert m.counts["rows"] == 4 and m.counts["quarantined"] == 3
    q = [_strict_json(line) for line in (tmp_path / "k" / "quarantine.jsonl").read_text().splitlines()]   # no bare NaN
    assert [(x["file"], x["line"], x["reason"].split(":")[0]) for x in q] == [
        (str(src), 2, "not_json"), (str(src), 5, "input_missing_or_not_text"), (str(src), 7, "not_an_object")]
    assert q[1]["item"]["input"] is None   # NaN written as null


def test_a_file_that_cannot_be_read_at_all_names_the_file(tmp_path):
    src = tmp_path / "kullm.parquet"
    src.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(Exception, match=str(src)):
        run_load_dataset(_entry(tmp_path, file=src))


def test_a_mixed_profile_dedups_across_sources_and_exports_for_axolotl_and_llama_factory(tmp_path):
    from culbot.pipeline_config.schema import MergeDataConfig
    from culbot.tasks.export_dataset import export_dataset
    from culbot.tasks.merge_data import run_merge

    kullm = run_load_dataset(_entry(tmp_path))
    chat = run_load_dataset(DatasetEntry(name="chat", file=SAMPLES / "sharegpt_sample.jsonl", type="sharegpt", out_dir=tmp_path / "c"))
    d = run_merge({"kullm": kullm.ref(), "chat": chat.ref()}, MergeDataConfig(validation_fraction=0.2, out_root=tmp_path / "ds"))
    assert d.counts["dropped"] == {"duplicate_of_kullm": 2}   # the KULLM sample's own duplicate, and conv_4 (the same question)
    assert d.counts["train"] + d.counts["validation"] == 22 - 1 + 7 - 1
    rows = _store.read_table(d.path / "train.parquet") + _store.read_table(d.path / "validation.parquet")
    conv3 = next(r for r in rows if r["id"] == "chat:conv_3")
    assert len(json.loads(conv3["messages"])) == 6 and next(r for r in rows if r["id"] == "kullm:alpaca_2")["messages"] == ""
    for fmt in ("sharegpt", "alpaca"):
        counts = export_dataset(d.path, fmt, tmp_path / fmt, name="culbot")
        assert counts["train"] == d.counts["train"] and counts["validation"] == d.counts["validation"]
        out = [json.loads(x) for split in ("train", "validation") for x in (tmp_path / fmt / f"{split}.jsonl").read_text().splitlines()]
        info = json.loads((tmp_path / fmt / "dataset_info.json").read_text())
        assert info["culbot_train"]["formatting"] == fmt and info["culbot_train"]["file_name"] == "train.jsonl"
        card = (tmp_path / fmt / "README.md").read_text()
        from huggingface_hub import DatasetCard

        meta = DatasetCard(card).data
        assert meta.language == ["ko"] and meta.configs[0]["data_files"][0] == {"split": "train", "path": "train.jsonl"}
        assert "axolotl" in card and "| chat |" in card
        if fmt == "sharegpt":
            c3 = next(x for x in out if x["conversations"][0]["value"].startswith("복수전공"))
            assert [t["from"] for t in c3["conversations"]] == ["human", "gpt"] * 3
        else:
            c3 = next(x for x in out if x.get("history") and x["history"][0][0].startswith("복수전공"))
            assert c3["instruction"] == "신청은 어디서 하죠?" and len(c3["history"]) == 2
