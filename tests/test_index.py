"""The index stage: content-addressed and cached, question keys from the train split only, gold passages of the
generated questions; train-as-you-serve formatting (exact strings); and `culbot index` / `culbot retrieve` on a
folder of Korean pages with navigation chrome, tables and EUC-KR."""
import json
import shutil

import pytest

from culbot.pipeline_config.schema import FormatConfig, RagConfig
from culbot.tasks import _store
from culbot.tasks.format import run_format
from culbot.tasks.index import build_index
from culbot.tasks.merge_data import COLUMNS
from tests.conftest import SAMPLES
from tests.flows.test_cli import culbot

DOCS = {
    "도서관.txt": "중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다.",
    "식당.txt": "학생식당은 학생회관 1층에서 평일 오전 11시부터 운영하며 점심은 5,000원입니다.",
    "주차.txt": "교내 주차는 정기권을 신청한 차량만 가능합니다.",
}
QA = [  # id, document, question, answer; q1 and q2 land in train, q3 in validation
    ("q1", "도서관.txt", "도서관은 평일 몇 시에 운영해요?", "중앙도서관은 평일 오전 9시부터 운영합니다."),
    ("q2", "식당.txt", "평일 점심값이 얼마예요?", "학생식당 점심은 5,000원입니다."),
    ("q3", "주차.txt", "학교에 차를 대려면?", "정기권을 신청한 차량만 주차할 수 있습니다."),
]


def _finished(folder, stage, files):
    folder.mkdir(parents=True)
    for name, write in files.items():
        write(folder / name)
    _store.write_manifest(folder, stage=stage, inputs={}, config={}, counts={})
    return folder


@pytest.fixture()
def small(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    rows = [{"id": i, "source": "cbnu", "url": f"file:{doc}", "instruction": q, "input": "", "output": a} for i, doc, q, a in QA]
    qa = _finished(tmp_path / "qa", "generate-qa", {"rows.jsonl": lambda p: _store.atomic_write_jsonl(p, rows)})
    table = [{c: r.get(c, "") for c in COLUMNS} for r in rows] + [
        {"id": "k1", "source": "kullm", "instruction": "인사해 주세요", "input": "", "output": "안녕하세요", "messages": ""}]
    dataset = _finished(tmp_path / "dataset", "merge-data", {
        "train.parquet": lambda p: _store.write_text_table(p, [r for r in table if r["id"] != "q3"], COLUMNS),
        "validation.parquet": lambda p: _store.write_text_table(p, [r for r in table if r["id"] == "q3"], COLUMNS)})
    return docs, qa, dataset


def test_keys_come_from_the_train_split_only_and_gold_names_each_question_s_passage(tmp_path, small):
    docs, qa, dataset = small
    out = build_index(docs, RagConfig(), tmp_path / "idx", qa=qa, dataset=dataset)
    keys = _store.read_jsonl(out.path / "keys.jsonl")
    assert [(k["key"], k["passage"], k["kind"]) for k in keys] == [
        ("도서관에 대해 알려주세요", "도서관#0", "title"), ("식당에 대해 알려주세요", "식당#0", "title"), ("주차에 대해 알려주세요", "주차#0", "title"),
        ("도서관은 평일 몇 시에 운영해요?", "도서관#0", "qa"), ("평일 점심값이 얼마예요?", "식당#0", "qa")]   # q3 is validation: not a key
    gold = _store.read_jsonl(out.path / "gold.jsonl")
    assert [(g["row"], g["split"], g["doc"], g["passage"]) for g in gold] == [
        ("q1", "train", "도서관", "도서관#0"), ("q2", "train", "식당", "식당#0"), ("q3", "validation", "주차", "주차#0")]
    assert out.counts == {"documents": 3, "passages": 3, "title_keys": 3, "qa_keys": 2, "gold_validation": 1, "dense": "none", "no_answer_threshold": 0.01}


def test_an_unchanged_folder_is_a_cache_hit_and_a_changed_page_or_setting_is_a_new_index(tmp_path):
    pages = tmp_path / "pages"
    shutil.copytree(SAMPLES / "cbnu_pages", pages)
    first = build_index(pages, RagConfig(), tmp_path / "idx")
    created = _store.read_manifest(first.path).created_at
    again = build_index(pages, RagConfig(), tmp_path / "idx")
    assert again.path == first.path and _store.read_manifest(again.path).created_at == created
    assert build_index(pages, RagConfig(passage_tokens=120), tmp_path / "idx").path != first.path
    (pages / "예비군 안내.txt").write_text("예비군 훈련은 5월에 있습니다.", encoding="utf-8")
    changed = build_index(pages, RagConfig(), tmp_path / "idx")
    assert changed.path != first.path and changed.counts["documents"] == 33
    (first.path / "passages.jsonl").write_text("[]")   # a damaged index is not trusted: it is rebuilt
    assert _store.verify(first.path) and _store.is_complete(build_index(SAMPLES / "cbnu_pages", RagConfig(), tmp_path / "idx2").path)


PREAMBLE = "아래는 충북대학교와 관련한 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 충북대학교의 공식 정보에 근거하여 요청을 적절히 완료하는 응답을 작성하세요."


def test_cbnu_rows_are_formatted_with_the_gold_passage_and_distractors_exactly_as_serving_will(tmp_path, small):
    docs, qa, dataset = small
    index = build_index(docs, RagConfig(), tmp_path / "idx", qa=qa, dataset=dataset)
    rag = RagConfig(context_k=2, no_context_share=0.0)
    out = run_format(dataset, FormatConfig(), tmp_path / "fmt", rag=rag, index=index.path)
    train = {r["id"]: r for r in _store.read_table(out.path / "train.parquet")}
    library = "[참고 {}] 도서관\n중앙도서관은 평일 오전 9시부터 오후 10시까지 운영합니다."
    cafeteria = "[참고 {}] 식당\n학생식당은 학생회관 1층에서 평일 오전 11시부터 운영하며 점심은 5,000원입니다."
    assert train["q1"]["prompt"] == (f"{PREAMBLE}\n\n### 명령어:\n도서관은 평일 몇 시에 운영해요?\n\n### 입력:\n"
                                     f"{library.format(1)}\n\n{cafeteria.format(2)}\n\n### 응답:\n")
    assert train["q2"]["prompt"] == (f"{PREAMBLE}\n\n### 명령어:\n평일 점심값이 얼마예요?\n\n### 입력:\n"
                                     f"{library.format(1)}\n\n{cafeteria.format(2)}\n\n### 응답:\n")   # the gold passage second: shuffled
    validation = _store.read_table(out.path / "validation.parquet")   # nothing else matches: the gold passage alone, as serving would find
    assert validation[0]["prompt"].endswith("### 입력:\n[참고 1] 주차\n교내 주차는 정기권을 신청한 차량만 가능합니다.\n\n### 응답:\n")
    assert "### 입력:" not in train["k1"]["prompt"]   # KULLM rows keep their own input
    assert out.counts["with_context"] == {"train": 2, "validation": 1}
    saved = json.loads((out.path / "templates.json").read_text())
    assert saved["context"] == {"passage": "[참고 {n}] {title}\n{text}", "joiner": "\n\n", "k": 2, "no_context_share": 0.0, "sources": ["cbnu"]}
    assert _store.read_manifest(out.path).config["context"]["k"] == 2 and _store.read_manifest(out.path).inputs["index"] == index.content_hash

    none = run_format(dataset, FormatConfig(), tmp_path / "fmt", rag=rag.model_copy(update={"no_context_share": 1.0}), index=index.path)
    assert none.path != out.path and none.counts["with_context"] == {"train": 0, "validation": 0}
    plain = {r["id"]: r for r in _store.read_table(none.path / "train.parquet")}
    assert plain["q1"]["prompt"] == ("아래는 충북대학교와 관련한 작업을 설명하는 명령어입니다. 충북대학교의 공식 정보에 근거하여 요청을 적절히 완료하는 "
                                     "응답을 작성하세요.\n\n### 명령어:\n도서관은 평일 몇 시에 운영해요?\n\n### 응답:\n")


EUC_KR_PAGE = """<html><head><meta charset="euc-kr"><title>기숙사 식당 | 충북대학교</title></head><body>
<div id="gnb"><a href="/">홈</a> <a href="/login">로그인</a> <a href="/sitemap">사이트맵</a></div>
<h1>기숙사 식당</h1><p>기숙사 식당은 양성재 지하 1층에 있습니다.</p>
<table><tr><th>구분</th><th>시간</th></tr><tr><td>아침</td><td>07:30~09:00</td></tr><tr><td>저녁</td><td>17:30~19:00</td></tr></table>
<footer>Copyright 충북대학교</footer></body></html>"""


def test_culbot_index_and_retrieve_on_a_folder_of_html_with_chrome_tables_and_euc_kr(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "기숙사 식당.html").write_bytes(EUC_KR_PAGE.encode("euc-kr"))
    shutil.copy(SAMPLES / "cbnu_pages" / "셔틀버스 시간표 학기중.html", pages)
    shutil.copy(SAMPLES / "cbnu_pages" / "셔틀버스 시간표 방학중.html", pages)
    (pages / "도서관.txt").write_text(DOCS["도서관.txt"], encoding="utf-8")
    r = culbot("index", "--pages", str(pages), "--out", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    index = next(p for p in (tmp_path / "idx").iterdir() if _store.is_complete(p))
    passages = _store.read_jsonl(index / "passages.jsonl")
    assert not any("로그인" in p["text"] or "Copyright" in p["text"] for p in passages)   # navigation chrome is not indexed
    assert any("저녁 | 17:30~19:00" in p["text"] for p in passages)

    queries = tmp_path / "q.jsonl"
    _store.atomic_write_jsonl(queries, [{"id": "a", "question": "기숙사 저녁 식사 시간"}, {"id": "b", "question": "방학 때 셔틀버스 몇 번 다녀요?"}])
    r = culbot("retrieve", "--index", str(index), "--queries", str(queries), "--out", str(tmp_path / "hits.jsonl"), "--k", "2")
    assert r.returncode == 0, r.stderr
    hits = _store.read_jsonl(tmp_path / "hits.jsonl")
    assert [h["id"] for h in hits] == ["a", "b"] and [len(h["hits"]) for h in hits] == [2, 2]
    assert set(hits[0]["hits"][0]) == {"doc", "title", "url", "passage", "score"}
    # the title without the site's name (issue 23: "…| 학사공지 | 대학교" in keys and sources)
    assert hits[0]["hits"][0]["doc"] == "기숙사 식당" and hits[0]["hits"][0]["title"] == "기숙사 식당"
    # every line carries the confidence, its parts and the verdict at the index's own threshold (issue 23)
    threshold = json.loads((index / "index.json").read_text())["calibration"]["threshold"]
    assert all({"confidence", "lexical_score", "coverage", "answerable"} <= set(h) for h in hits)
    assert all(h["answerable"] == (h["confidence"] >= threshold) for h in hits) and hits[0]["confidence"] > 0.5
    assert f"below the index's no-answer threshold {threshold}" in r.stdout
    assert [h["doc"] for h in hits[1]["hits"]] == ["셔틀버스 시간표 방학중", "셔틀버스 시간표 학기중"]   # near-duplicates, in order

    r = culbot("retrieve", "--index", str(index), "--query", "도서관 몇 시까지 해요?", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["hits"][0]["doc"] == "도서관"
    r = culbot("retrieve", "--index", str(tmp_path / "nowhere"), "--query", "도서관")
    assert r.returncode != 0 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_two_builds_of_the_same_pages_are_byte_identical(tmp_path):
    """Two processes (other hash seeds) build the same bytes; the folder name is the hash culbot prints and later stages
    record (issue 22: the BM25 arrays and vocabulary followed set order, and a rebuilt index retrained the model)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from culbot.pipeline_config.schema import RagConfig; "
            "from culbot.tasks.index import build_index; "
            "o = build_index(Path(sys.argv[1]), RagConfig(), Path(sys.argv[2])); print(o.path.name, o.content_hash)")
    built = []
    for seed in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "cbnu_pages"), str(tmp_path / seed)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        name, content_hash = r.stdout.split()[-2:]
        assert name == content_hash[:12]
        built.append((name, _store.file_hashes(tmp_path / seed / name)))
    assert built[0] == built[1]
