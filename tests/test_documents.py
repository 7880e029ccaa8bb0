"""Documents as page records: main text without chrome, table rows whole, encodings, bad files set aside, the size cap."""
import json

from culbot.tasks.documents import extract_page, read_directory
from tests.conftest import SAMPLES


def test_extract_drops_boilerplate_by_class_and_keeps_links():
    html = ('<html><head><title>T</title></head><body><div class="lnb"><a href="/a">메뉴</a></div>'
            '<main><p>본문 내용</p><a href="b.do#x">링크</a><a href="javascript:void(0)">x</a></main></body></html>')
    ex = extract_page(html, "https://www.chungbuk.ac.kr/www/p.do")
    assert ex["text"] == "본문 내용\n링크\nx"
    assert ex["links"] == ["https://www.chungbuk.ac.kr/a", "https://www.chungbuk.ac.kr/www/b.do"]


def test_directory_source_reads_txt_and_html(tmp_path):
    pages, quarantine = read_directory(SAMPLES / "cbnu_pages", min_text_chars=50)
    titles = sorted(p["title"] for p in pages)
    assert len(titles) == 33 and {"생활관 입사 안내 | 충북대학교 생활관", "소프트웨어학과 소개", "장학금 안내", "중앙도서관 이용 안내",
                                  "학사일정 및 수강신청", "셔틀버스 시간표(학기 중) | 충북대학교", "휴학 및 복학 안내"} <= set(titles)
    leave = [p for p in pages if p["url"] == "file:휴학 및 복학 안내.html"][0]   # an EUC-KR CMS page: decoded, chrome gone, rows whole
    assert "일반휴학 | 1년 | 3년" in leave["text"].split("\n") and "사이트맵" not in leave["text"] and leave["headings"] == ["휴학 및 복학 안내"]
    dorm = [p for p in pages if p["url"] == "file:생활관 입사 안내.html"][0]
    assert "window.dataLayer" not in dorm["text"] and "Copyright" not in dorm["text"] and "공지사항" not in dorm["text"].split("\n")[0]
    assert quarantine == []
    (tmp_path / "짧은 문서.txt").write_text("짧다")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    pages, quarantine = read_directory(tmp_path, min_text_chars=10)
    assert pages == [] and sorted(q["reason"] for q in quarantine) == ["too_little_text", "unsupported file type '.png'"]


def _bad_pages_folder(tmp_path):
    import random

    folder = tmp_path / "pages"
    folder.mkdir()
    rng = random.Random(0)
    (folder / "사진.txt").write_bytes(bytes(rng.randrange(256) for _ in range(3000)))            # binary, named .txt
    (folder / "첨부.html").write_bytes(b"<html>" + bytes(rng.randrange(256) for _ in range(3000)))  # binary, named .html
    (folder / "학사 안내.txt").write_bytes(("충북대학교 학사 안내입니다. 수강신청은 2월에 합니다. " * 5).encode("cp949"))  # EUC-KR/CP949
    (folder / "큰 문서.txt").write_text("충북대학교 중앙도서관 안내 문장입니다.\n" * 250_000, encoding="utf-8")      # ~5 MB
    return folder


def test_bad_pages_are_quarantined_by_name_korean_encodings_read_and_huge_pages_capped(tmp_path):
    pages, quarantine = read_directory(_bad_pages_folder(tmp_path), min_text_chars=50, max_page_chars=20_000)
    by_url = {p["url"]: p for p in pages}
    assert sorted(by_url) == ["file:큰 문서.txt", "file:학사 안내.txt"]
    assert by_url["file:학사 안내.txt"]["text"].startswith("충북대학교 학사 안내입니다. 수강신청은 2월에 합니다.")
    big = by_url["file:큰 문서.txt"]
    assert len(big["text"]) <= 20_000 and big["truncated_from"] > 4_000_000
    reasons = {q["url"]: q["reason"] for q in quarantine}
    assert set(reasons) == {"file:사진.txt", "file:첨부.html", "file:큰 문서.txt"}
    assert reasons["file:사진.txt"].startswith(("undecodable", "mostly_non_text")) and reasons["file:첨부.html"].startswith(("undecodable", "mostly_non_text"))
    assert reasons["file:큰 문서.txt"].startswith("oversize_truncated")
    assert all(len(json.dumps(q, ensure_ascii=False)) < 3000 for q in quarantine)   # no megabytes of binary in the quarantine
