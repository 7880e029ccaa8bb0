"""KULLM loading through datasets: input kept, broken rows quarantined, deterministic sampling."""
import json

import pytest

from culbot.pipeline_config.schema import KullmConfig
from culbot.tasks import _store
from culbot.tasks.load_kullm import run_load
from tests.conftest import SAMPLES


def test_sample_file_keeps_input_and_quarantines_broken_rows(tmp_path):
    m = run_load(KullmConfig(source="file", file=SAMPLES / "kullm_sample.jsonl", out_dir=tmp_path / "k"))
    assert m.counts == {"loaded": 24, "sampled": 24, "rows": 22, "with_input": 10, "quarantined": 2}
    rows = _store.read_jsonl(tmp_path / "k" / "rows.jsonl")
    translate = [r for r in rows if r["id"] == "kullm:alpaca_2"][0]
    assert translate["input"] == "나는 도서관에서 공부하는 것을 좋아한다."   # upstream lost every input
    q = _store.read_jsonl(tmp_path / "k" / "quarantine.jsonl")
    assert [(x["item"]["id"], x["reason"]) for x in q] == [("alpaca_13", "empty_output"), ("broken_1", "output_missing_or_not_text")]


def test_sampling_is_deterministic_by_seed(tmp_path):
    def ids(seed, out):
        run_load(KullmConfig(source="file", file=SAMPLES / "kullm_sample.jsonl", max_rows=5, seed=seed, out_dir=tmp_path / out))
        return [r["id"] for r in _store.read_jsonl(tmp_path / out / "rows.jsonl")]

    a, b, c = ids(1, "a"), ids(1, "b"), ids(2, "c")
    assert a == b and len(a) <= 5 and a != c


def test_fraction_and_parquet_source(tmp_path):
    import datasets

    rows = [{"id": str(i), "instruction": f"명령 {i}", "input": "", "output": f"응답 {i}"} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "k.parquet"))
    m = run_load(KullmConfig(source="file", file=tmp_path / "k.parquet", fraction=0.25, out_dir=tmp_path / "k"))
    assert m.counts["rows"] == 10


def test_hub_source_goes_through_datasets_and_fails_clearly_offline(tmp_path):
    # HF_HUB_OFFLINE=1 in tests: the real load_dataset(hub id, revision) path runs and refuses to download.
    with pytest.raises(Exception, match="(?i)offline|couldn't find|connection|not found"):
        run_load(KullmConfig(source="hub", hub_id="nlpai-lab/kullm-v2", revision="main", out_dir=tmp_path / "k"))
    assert _store.read_manifest(tmp_path / "k") is None


def test_unsupported_file_type_is_named(tmp_path):
    p = tmp_path / "k.txt"
    p.write_text("x")
    with pytest.raises(ValueError, match=r"kullm.file: .*k.txt: unsupported type '.txt'"):
        run_load(KullmConfig(source="file", file=p, out_dir=tmp_path / "k"))


def _strict_json(line: str):
    def no_bare(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(line, parse_constant=no_bare)


def test_a_broken_jsonl_line_is_quarantined_with_file_and_line_and_the_rest_loads(tmp_path):
    src = tmp_path / "kullm.jsonl"
    good = [json.dumps({"id": f"a{i}", "instruction": f"명령 {i}", "input": "", "output": f"응답 {i}"}, ensure_ascii=False) for i in range(4)]
    src.write_text("\n".join([good[0], '{"id": "cut", "instruction": "잘린 줄', good[1], "",
                              '{"id": "nan", "instruction": "x", "input": NaN, "output": "y"}', good[2], "[1, 2]", good[3]]) + "\n")
    m = run_load(KullmConfig(source="file", file=src, out_dir=tmp_path / "k"))
    assert m.counts["rows"] == 4 and m.counts["quarantined"] == 3
    q = [_strict_json(line) for line in (tmp_path / "k" / "quarantine.jsonl").read_text().splitlines()]   # no bare NaN
    assert [(x["file"], x["line"], x["reason"].split(":")[0]) for x in q] == [
        (str(src), 2, "not_json"), (str(src), 5, "input_missing_or_not_text"), (str(src), 7, "not_an_object")]
    assert q[1]["item"]["input"] is None   # NaN written as null


def test_a_file_that_cannot_be_read_at_all_names_the_file(tmp_path):
    src = tmp_path / "kullm.parquet"
    src.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(Exception, match=str(src)):
        run_load(KullmConfig(source="file", file=src, out_dir=tmp_path / "k"))
