"""Searching: Korean morphemes, reciprocal-rank fusion, question keys, and the retrieval metrics."""
import pytest

from culbot.pipeline_config.schema import RagConfig
from culbot.tasks.contracts import Hit
from culbot.tasks.index import build_index
from culbot.tasks.retrieval import Retriever, evaluate, fuse, morphemes, nearest, read_questions
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory):
    return build_index(SAMPLES / "cbnu_pages", RagConfig(), tmp_path_factory.mktemp("idx")).path


def test_morphemes_drop_particles_endings_and_generic_words():
    assert morphemes(["성적 장학금은 언제까지 신청해요?"]) == [["성적", "장학금", "신청"]]
    assert morphemes(["장학금을", "장학금이", "장학금"]) == [["장학금"]] * 3   # whitespace tokens would be three words
    assert morphemes(["김하늘 교수님에 대해 알려주세요"])[0][:2] == ["김하늘", "교수"]


def test_reciprocal_rank_fusion_is_exact():
    fused = dict(fuse({"lexical": ["a", "b"], "keys": ["b", "c"]}, {"lexical": 1.0, "keys": 0.5}, rrf_k=60))
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 0.5 / 61, "c": 0.5 / 62})
    assert [pid for pid, _ in fuse({"x": ["a"], "y": ["b"]}, {}, 60)] == ["a", "b"]   # ties break by id


def test_dense_search_is_exact_cosine_order():
    import numpy as np

    v = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"p{i}" for i in range(200)]
    q = v[7] + 0.1 * v[3]
    assert nearest(v, ids, q, 10) == [ids[i] for i in np.argsort(-(v @ q))[:10]] and nearest(v, ids, q, 10)[0] == "p7"
    assert sorted(nearest(v[:3], ids[:3], q, 10)) == ["p0", "p1", "p2"]   # fewer rows than k


def test_search_finds_the_page_and_reports_how_sure_it_is(sample_index):
    r = Retriever(sample_index)
    res = r.search("휴학은 몇 년까지 가능해요?", k=3)
    assert isinstance(res.hits[0], Hit) and res.hits[0].doc == "휴학 및 복학 안내" and "일반휴학 | 1년 | 3년" in res.hits[0].passage
    assert res.hits[0].url == "file:휴학 및 복학 안내.html" and res.hits[0].title == "휴학 및 복학 안내"
    assert res.confidence > r.search("화성 탐사선 발사일은?").confidence


def test_a_title_question_finds_its_document_through_the_keys(sample_index):
    res = Retriever(sample_index).search("김하늘 교수님에 대해 알려주세요")
    assert res.hits[0].doc == "김하늘 교수 소개" and res.rankings["keys"][0] == "김하늘 교수 소개#0"


def test_metrics_on_the_hand_written_questions(sample_index):
    qs = read_questions(SAMPLES / "rag_questions.jsonl")
    assert len(qs) >= 60 and sum(not q["gold"] for q in qs) == 10
    m = evaluate(Retriever(sample_index), qs)
    assert m.questions == len(qs) and m.unanswerable == 10
    assert m.by_set["direct"]["recall_at_1"] == 1.0 and m.recall_at_5 >= 0.85 and m.mrr >= 0.8
    assert m.answerable_top_score_median > m.unanswerable_top_score_median and m.threshold_accuracy >= 0.75


def test_metrics_are_exact_on_a_small_case(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "도서관.txt").write_text("중앙도서관은 평일 오전 9시부터 운영합니다. 열람실 좌석은 앱으로 예약합니다.")
    (folder / "식당.txt").write_text("학생식당은 학생회관 1층에 있으며 점심을 5,000원에 제공합니다.")
    r = Retriever(build_index(folder, RagConfig(question_keys=False), tmp_path / "idx").path)
    m = evaluate(r, [{"question": "도서관 운영 시간", "gold": ["도서관"]}, {"question": "점심 가격", "gold": ["식당"]},
                     {"question": "열람실 예약은 식당에서?", "gold": ["식당"]}, {"question": "우주 정거장", "gold": []}])
    assert (m.recall_at_1, m.mrr) == (pytest.approx(2 / 3, abs=1e-3), pytest.approx((1 + 1 + 0.5) / 3, abs=1e-3))
    assert m.unanswerable_top_score_median == 0.0 and m.no_answer_threshold > 0 and m.threshold_accuracy == 1.0


def test_a_student_word_reaches_the_page_and_clears_the_no_answer_threshold(sample_index):
    """"기숙사 신청은 언제 해요?" (the pages say 생활관): lexical-only retrieval found 성적 이의신청 안내 with confidence 0.96
    under its threshold 2.89, so Culbot refused. With rag.synonyms and the coverage-weighted confidence it answers from the page."""
    r = Retriever(sample_index)
    threshold = evaluate(r, read_questions(SAMPLES / "rag_questions.jsonl")).no_answer_threshold
    res = r.search("기숙사 신청은 언제 해요?")
    assert res.hits[0].doc == "생활관 입사 안내" and res.confidence >= threshold
    assert r.search("청주 시내버스 환승 요금은 얼마예요?").confidence < threshold   # one shared word (버스) is not an answer
