"""Merge: one schema, dedup with source priority, deterministic stratified split, versions."""
import random

from culbot.pipeline_config.schema import MergeDataConfig
from culbot.tasks import _store
from culbot.tasks.contracts import short_hash
from culbot.tasks.merge_data import merge_sources, run_merge, split_rows, stats_markdown


def _rows(source, n, prefix="질문"):
    return [{"id": f"{source}:{i}", "source": source, "instruction": f"{prefix} {i}", "input": "", "output": f"{source} 답변 {i}"} for i in range(n)]


def test_dedup_uses_source_priority_and_normalisation():
    sources = {
        "kullm": [{"id": "k1", "instruction": "기숙사 신청은 언제 하나요?", "input": "", "output": "kullm 답"}],
        "cbnu": [{"id": "c1", "instruction": "기숙사  신청은\n언제 하나요?", "input": "", "output": "cbnu 답"},
                 {"id": "c2", "instruction": "빈 답", "input": "", "output": "   "},
                 {"id": "c3", "instruction": "깨진 행", "output": None}],
        "univ100": [{"id": "u1", "instruction": "ＮＦＣ 확인", "input": None, "output": "ok"}],
    }
    rows, dropped, reasons = merge_sources(sources, ["cbnu", "univ100", "kullm"])
    assert [(r["id"], r["output"]) for r in rows] == [("c1", "cbnu 답"), ("u1", "ok")]
    assert reasons == {"duplicate_of_cbnu": 1, "empty_output": 1, "broken_row": 1}
    assert rows[0]["instruction"] == "기숙사  신청은\n언제 하나요?"   # fields keep their spacing (code rows); the dedup key collapses it
    assert {d["row"]["id"] for d in dropped} == {"k1", "c2", "c3"}
    rows2, _, _ = merge_sources(sources, ["kullm", "cbnu"])
    assert rows2[0]["id"] == "k1"


def test_split_is_stratified_deterministic_and_order_independent():
    rows = _rows("kullm", 100) + _rows("cbnu", 30) + _rows("univ100", 10)
    train, val = split_rows(rows, seed=7, fraction=0.1, size=None)
    assert len(val) == 10 + 3 + 1 and len(train) + len(val) == 140
    assert {r["source"] for r in val} == {"kullm", "cbnu", "univ100"}
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert split_rows(shuffled, seed=7, fraction=0.1, size=None) == (train, val)
    assert split_rows(rows, seed=8, fraction=0.1, size=None)[1] != val
    _, val_sized = split_rows(rows, seed=7, fraction=None, size=14)
    assert len(val_sized) == 14 and sum(r["source"] == "kullm" for r in val_sized) == 10


def _stage(folder, rows):
    _store.atomic_write_jsonl(folder / "rows.jsonl", rows)
    _store.write_manifest(folder, stage="t", inputs={}, config={}, counts={}, content_hash=_store.sha256_file(folder / "rows.jsonl"))
    return folder


def test_version_folder_is_content_addressed_and_reused(tmp_path):
    inputs = {"kullm": _stage(tmp_path / "k", _rows("kullm", 20)), "cbnu": _stage(tmp_path / "c", _rows("cbnu", 10, "다른 질문"))}
    cfg = MergeDataConfig(validation_fraction=0.1, out_root=tmp_path / "ds")
    m = run_merge(inputs, cfg)
    folder = tmp_path / "ds" / short_hash(m.content_hash)
    assert m.path == folder and _store.is_complete(folder) and m.stage == "merge-data"
    assert sorted(p.name for p in folder.iterdir()) == ["dropped.jsonl", "manifest.json", "stats.json", "train.parquet", "validation.parquet"]
    assert m.counts["train"] == 27 and m.counts["validation"] == 3
    assert (tmp_path / "ds" / "LATEST").read_text().strip() == short_hash(m.content_hash)
    train = _store.read_table(folder / "train.parquet")
    assert set(train[0]) == {"id", "source", "instruction", "input", "output", "messages"} and train[0]["messages"] == ""   # single-turn
    again = run_merge(inputs, cfg)
    assert again.content_hash == m.content_hash
    assert len(_store.read_jsonl(tmp_path / "ds" / "versions.jsonl")) == 1   # no new version when nothing changed
    md = stats_markdown(m.content_hash, m.counts)
    assert "| kullm | 20 | 18 | 2 |" in md and "| cbnu | 10 | 9 | 1 |" in md


def test_merge_refuses_unfinished_inputs(tmp_path):
    (tmp_path / "k").mkdir()
    _store.atomic_write_jsonl(tmp_path / "k" / "rows.jsonl", _rows("kullm", 3))
    import pytest

    with pytest.raises(RuntimeError, match="not a finished stage output"):
        run_merge({"kullm": tmp_path / "k"}, MergeDataConfig(out_root=tmp_path / "ds"))


def test_code_keeps_its_indentation_and_blank_lines():
    code = "def f(x):\r\n    if x:   \r\n        return 1\r\n\r\n\r\n    return  0\n"
    rows, _, _ = merge_sources({"kullm": [{"id": "k1", "instruction": "이 코드를 설명하세요.", "input": code, "output": "x가 참이면 1을 돌려줍니다."}]}, ["kullm"])
    assert rows[0]["input"] == "def f(x):\n    if x:\n        return 1\n\n\n    return  0"
