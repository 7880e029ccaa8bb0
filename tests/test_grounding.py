"""The grounding check: normalised facts, negation flips, and its measured quality on the labelled sets."""
import pytest

from culbot.tasks.grounding import check, facts, missing_facts, negated_word, negation_flip
from tests.conftest import REPO

SOURCE = ("중앙도서관은 학기 중 평일 오전 9시부터 오후 10시까지 운영합니다. 토요일은 오전 10시부터 오후 5시까지 운영하며 일요일과 공휴일은 휴관합니다. "
          "학부생은 도서를 최대 10권까지 14일 동안 대출할 수 있습니다. 대출 기간은 한 번 연장할 수 있습니다. 생활관비는 1,000원입니다. "
          "문의는 043-261-2114, sw@chungbuk.ac.kr, 사무실은 S4-1동입니다. 평점이 3.0 이상이어야 합니다.")


@pytest.mark.parametrize("answer", ["평일 9시에 엽니다.", "평일 09:00에 엽니다.", "토요일은 17시에 닫습니다.", "토요일 17:00까지 합니다.",
                                    "생활관비는 1000원입니다.", "평점 3 이상", "오후 10시까지", "밤 10시까지", "10권, 14일",
                                    "문의 043 261 2114", "SW@CHUNGBUK.AC.KR", "S4-1동"])
def test_the_same_fact_written_another_way_is_found(answer):
    assert missing_facts(answer, SOURCE) == []


@pytest.mark.parametrize("answer,missing", [("평일 오전 8시에 엽니다.", ["08:00"]), ("50권까지 90일", ["50:권", "90:일"]),
                                            ("생활관비는 1만 원입니다.", ["10000:원"]), ("043-261-9999로 문의", ["0432619999"]),
                                            ("사무실은 S4-2동", ["S4-2"]), ("평점 3.5 이상", ["3.5"]), ("24시간 운영", ["24:시간"])])
def test_a_changed_fact_is_named(answer, missing):
    assert missing_facts(answer, SOURCE) == missing


def test_facts_are_normalised_once():
    assert facts("오후 5시 30분, 9시 반, 21:05") == {"time:17:30", "time:9?:30", "time:21:05"}
    assert facts("3,800명과 3.0과 10만 원") == {"n:3800:명", "n:3", "n:100000:원"}


def test_a_flipped_negation_is_flagged_and_a_kept_one_is_not():
    assert negated_word("일요일에도 휴관하지 않습니다") == ("휴관하지", "휴관")
    assert negated_word("대출 기간은 연장할 수 없습니다") == ("연장할", "연장")
    assert negation_flip("중앙도서관은 일요일에도 휴관하지 않습니다.", SOURCE)
    assert negation_flip("대출 기간은 연장할 수 없습니다.", SOURCE)
    assert negation_flip("일요일과 공휴일에는 도서관이 휴관합니다.", SOURCE) is None
    assert negation_flip("공휴일에는 도서관 문을 열지 않습니다.", SOURCE) is None   # the same meaning, said negatively


def test_the_layers_report_their_reason_in_order():
    assert check("평일 오전 8시에 엽니다.", SOURCE, 0.35)[1] == "fact_not_in_source: 08:00"
    assert check("대출 기간은 연장할 수 없습니다.", SOURCE, 0.35)[1].startswith("negation_flip: ")
    assert check("오늘의 특선은 파스타와 스테이크입니다.", SOURCE, 0.35)[1].startswith("ungrounded: ")
    score, reason = check("학부생은 최대 10권까지 14일 동안 빌릴 수 있습니다.", SOURCE, 0.35)
    assert reason is None and score > 0.5


@pytest.mark.parametrize("name,precision,recall", [("grounding_labelled.jsonl", 1.0, 0.75), ("grounding_holdout.jsonl", 1.0, 0.6)])
def test_measured_quality_on_the_labelled_sets_does_not_regress(name, precision, recall, tmp_path):
    from bench.bench_grounding import main

    res = main(["--set", str(REPO / "tests" / "data" / name), "--out", str(tmp_path / "g.json")])
    after = res["after: facts + negation + overlap"]
    assert after["precision"] >= precision and after["recall"] >= recall
    assert after["recall"] > res["before: overlap only"]["recall"] + 0.5


@pytest.mark.parametrize("answer, source, reason", [
    ("계절학기는 최대 아홉 학점까지 신청할 수 있습니다.", "계절학기는 최대 6학점까지 신청할 수 있습니다.", "fact_not_in_source: 9:학점"),
    ("휴학 신청은 개강 후 3일 이내에 안 됩니다.", "휴학 신청은 개강 후 3일 이내에 가능합니다.", "negation_flip"),
    ("상담은 오후 두 시에 시작합니다.", "상담은 오후 3시에 시작합니다.", "fact_not_in_source: 14:00"),
    ("정원은 스물두 명입니다.", "정원은 20명입니다.", "fact_not_in_source: 22:명"),
])
def test_korean_numerals_and_an_rather_than_anh_negation_are_caught(answer, source, reason):
    """Issue 22: a Korean numeral (아홉 학점 against 6학점) and 안 됩니다 were accepted as grounded."""
    assert check(answer, source, 0.3)[1].startswith(reason)


def test_the_same_fact_in_korean_numerals_is_grounded():
    assert check("계절학기는 최대 여섯 학점, 하루 세 시간까지입니다.", "계절학기는 최대 6학점, 하루 3시간까지입니다.", 0.3)[1] is None
    assert check("학교 안 식당은 열 시에 엽니다.", "학교 안 식당은 오전 10시에 엽니다.", 0.3)[1] is None   # 안 (inside) is no negation
