"""Passages by structure: headings start one, table rows stay whole (with their header), overlap, and names."""
from culbot.tasks.passages import doc_name, split_passages, subject

PAGE = {"url": "file:sub/셔틀버스 시간표.html", "title": "셔틀버스 시간표 | 충북대학교", "headings": ["학기 중", "방학 중"],
        "text": "학기 중\n셔틀버스는 평일에만 운행합니다.\n출발지 | 출발 시각 | 도착지\n정문 | 08:10 | 오창캠퍼스\n정문 | 12:30 | 오창캠퍼스\n"
                "오창캠퍼스 | 17:40 | 정문\n방학 중\n방학에는 하루 두 번 운행합니다."}


def test_headings_start_passages_and_table_rows_stay_whole_with_their_header():
    ps = split_passages(PAGE, max_tokens=64, overlap_tokens=0)   # the estimate gives the lines 26, 20, 18, 18, 18 tokens
    assert [p.text for p in ps] == [
        "학기 중\n셔틀버스는 평일에만 운행합니다.\n출발지 | 출발 시각 | 도착지\n정문 | 08:10 | 오창캠퍼스",
        "학기 중\n출발지 | 출발 시각 | 도착지\n정문 | 12:30 | 오창캠퍼스\n오창캠퍼스 | 17:40 | 정문",
        "방학 중\n방학에는 하루 두 번 운행합니다."]
    assert [(p.id, p.doc, p.position, p.heading) for p in ps] == [
        ("sub/셔틀버스 시간표#0", "sub/셔틀버스 시간표", 0, "학기 중"), ("sub/셔틀버스 시간표#1", "sub/셔틀버스 시간표", 1, "학기 중"),
        ("sub/셔틀버스 시간표#2", "sub/셔틀버스 시간표", 2, "방학 중")]
    assert {p.title for p in ps} == {"셔틀버스 시간표"} and {p.url for p in ps} == {PAGE["url"]}   # the site's name dropped


def test_the_last_lines_of_a_passage_open_the_next_one():
    page = {"url": "https://www.chungbuk.ac.kr/a.do", "title": "안내", "text": "\n".join(f"{i}번째 문장은 충북대학교 안내입니다." for i in range(6))}
    ps = split_passages(page, max_tokens=3 * 28, overlap_tokens=28)   # 28 tokens a line: three lines a passage, one shared
    assert [[line[0] for line in p.text.split("\n")] for p in ps] == [["0", "1", "2"], ["2", "3", "4"], ["4", "5"]]
    assert all(p.doc == "https://www.chungbuk.ac.kr/a.do" and p.heading == "" for p in ps)


def test_a_long_sentence_is_cut_and_a_long_row_is_kept_whole():
    row = " | ".join(["셀"] * 40)
    ps = split_passages({"url": "file:a.txt", "title": "a", "text": "가" * 300 + "\n" + row}, max_tokens=50, overlap_tokens=0)
    assert row in [p.text for p in ps] and all(len(p.text) <= 300 for p in ps)


def test_names_for_keys_and_hits():
    assert doc_name("file:장학금 안내.txt") == "장학금 안내" and doc_name("https://x/y.do") == "https://x/y.do"
    assert subject("김하늘 교수 소개") == "김하늘 교수" and subject("중앙도서관 이용 안내") == "중앙도서관"
    assert subject("셔틀버스 시간표(학기 중) | 충북대학교") == "셔틀버스 시간표(학기 중)"
