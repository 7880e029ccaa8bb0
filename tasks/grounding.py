"""Is a generated answer supported by its source chunk? A layered check, each layer's reason recorded.

1. Facts: every number, date, time, amount, phone number, e-mail, URL and code (S4-1, W) in the
   answer must appear in the source, compared after normalising (9시 = 09:00 = 오전 9시,
   오후 5시 = 17시, 1,000원 = 1000원, 3.0 = 3, 아홉 학점 = 9학점, 오후 두 시 = 14:00).
2. Negation: an answer clause that says what its closest source clause says, with the polarity
   flipped (휴관합니다 / 휴관하지 않습니다), is flagged.
3. Overlap: the share of the answer's character pairs found in the source (a coarse floor).
4. Optionally, an LLM judge (the same OpenAI-compatible client, cached and budgeted; qa.judge)
   for what the deterministic layers cannot see (a changed word, an entity swapped).

The deterministic layers are measured on tests/data/grounding_labelled.jsonl (bench/bench_grounding.py).
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation

from . import _store, _text
from .contracts import short_hash

# Counters and units that follow a number in Korean text; longest first so 시간 wins over 시.
UNITS = sorted(["시간", "개월", "학점", "학기", "학년", "만원", "천원", "원", "권", "일", "주", "월", "년", "분", "초", "명", "층", "호",
                "번", "회", "개", "점", "등", "위", "%", "세", "곳", "km", "kg", "cm"], key=len, reverse=True)
_UNIT = "|".join(re.escape(u) for u in UNITS)
_TIME_KO = re.compile(r"(오전|오후|낮|밤|저녁|새벽|아침)?\s*(\d{1,2})\s*시(?!간)(?:\s*(\d{1,2})\s*분|\s*(반))?")
_TIME_HM = re.compile(r"(?<![\d:])(\d{1,2}):(\d{2})(?![\d:])")
_BIG = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(억|만|천)\s*(원)?")
_WITH_UNIT = re.compile(rf"(\d[\d,]*(?:\.\d+)?)\s*({_UNIT})")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_CODE = re.compile(r"(?<![A-Za-z0-9])[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*(?![A-Za-z0-9])")
_PM = {"오후", "밤", "저녁"}
# 안 되다 in every form (되, 돼, 됩니다, 된, 될, 됐): "3일 이내에 안 됩니다" passed as agreeing with its source
NEGATION = re.compile(r"않|못\s?하|못\s|없|아니|아닌|아닙|불가|금지|무휴|말아|마세요|마십시오|안\s?[되돼됩된될됐]")
_CLAUSE = re.compile(r"[.!?\n]+|,\s|(?<=며)\s|(?<=고)\s(?=[가-힣])")


# Korean numerals before a counter, as digits: "아홉 학점" passed against the source's 6학점. Native numerals (한, 두, 세,
# ..., 아홉, 열, 스물, ... 아흔, and their combinations) and Sino-Korean tens (이십, 삼십오); a lone Sino-Korean digit (이,
# 사, 일) is left alone, being also a word (this, company, day).
_ONES = {"하나": 1, "한": 1, "둘": 2, "두": 2, "셋": 3, "세": 3, "석": 3, "넷": 4, "네": 4, "넉": 4, "다섯": 5, "여섯": 6, "일곱": 7,
         "여덟": 8, "아홉": 9}
_TENS = {"열": 10, "스물": 20, "스무": 20, "서른": 30, "마흔": 40, "쉰": 50, "예순": 60, "일흔": 70, "여든": 80, "아흔": 90}
_SINO = {"일": 1, "이": 2, "삼": 3, "사": 4, "오": 5, "육": 6, "칠": 7, "팔": 8, "구": 9}
_ALT = lambda words: "|".join(sorted(words, key=len, reverse=True))   # noqa: E731
_COUNTER = rf"(?=\s?(?:{_UNIT}|시))"
_NATIVE_NUMERAL = re.compile(rf"(?<![가-힣])(?:({_ALT(_TENS)})({_ALT(_ONES)})?|({_ALT(_ONES)})){_COUNTER}\s?")
_SINO_TENS = re.compile(rf"(?<![가-힣])([이삼사오육칠팔구])?십([일이삼사오육칠팔구])?{_COUNTER}\s?")


def korean_numerals(text: str) -> str:
    """Numerals written as Korean words before a counter, in digits: 아홉 학점 -> 9학점, 스물두 명 -> 22명, 오후 두 시 -> 오후 2시."""
    def native(m: re.Match) -> str:
        return str(_TENS.get(m.group(1), 0) + _ONES.get(m.group(2) or m.group(3) or "", 0))

    def sino(m: re.Match) -> str:
        return str(10 * _SINO.get(m.group(1) or "", 1) + _SINO.get(m.group(2) or "", 0))

    return _SINO_TENS.sub(sino, _NATIVE_NUMERAL.sub(native, text))


def _number(raw: str) -> str:
    try:
        return format(Decimal(raw.replace(",", "")).normalize(), "f")
    except InvalidOperation:
        return raw


def facts(text: str) -> set[str]:
    """The checkable facts of a text, normalised: url:…, email:…, phone:…, time:HH:MM (or time:H?: without 오전/오후), code:…, n:value:unit, n:value."""
    text = korean_numerals(_text.nfc(text))
    out: set[str] = set()

    def take(regex: re.Pattern, render) -> None:
        nonlocal text
        for m in regex.finditer(text):
            out.add(render(m))
        text = regex.sub(" ", text)

    take(_text.URL_RE, lambda m: "url:" + m.group(0).lower().rstrip("/."))
    take(_text.EMAIL_RE, lambda m: "email:" + m.group(0).lower())
    take(_text.PHONE_RE, lambda m: "phone:" + re.sub(r"\D", "", m.group(0)))

    def korean_time(m: re.Match) -> str:
        h, minutes = int(m.group(2)), int(m.group(3) or (30 if m.group(4) else 0))
        if m.group(1) in _PM and h < 12:
            h += 12
        elif m.group(1) is None and h <= 12:
            return f"time:{h % 12}?:{minutes:02d}"   # no 오전/오후: either half of the day
        return f"time:{h:02d}:{minutes:02d}"

    take(_TIME_KO, korean_time)
    take(_TIME_HM, lambda m: f"time:{int(m.group(1)):02d}:{m.group(2)}")
    take(_CODE, lambda m: "code:" + m.group(0))
    take(_BIG, lambda m: f"n:{_number(str(Decimal(m.group(1).replace(',', '')) * {'억': 10**8, '만': 10**4, '천': 10**3}[m.group(2)]))}:{m.group(3) or ''}")
    take(_WITH_UNIT, lambda m: f"n:{_number(m.group(1))}:{m.group(2)}")
    take(_NUMBER, lambda m: f"n:{_number(m.group(0))}")
    return out


def _matches(fact: str, source: set[str], source_numbers: set[str]) -> bool:
    if fact in source:
        return True
    kind, _, rest = fact.partition(":")
    if kind == "time":
        hh, mm = rest.split(":")
        if hh.endswith("?"):   # 9시 matches 오전 9시, 09:00 and 21:00
            h = int(hh[:-1])
            return any(f"time:{x:02d}:{mm}" in source for x in (h, h + 12)) or f"time:{h if h else 12}?:{mm}" in source
        h = int(hh)
        return f"time:{h % 12}?:{mm}" in source
    if kind == "n":
        value, _, unit = rest.partition(":")
        return unit == "" and value in source_numbers   # a bare number may stand for any counted one
    return False


def missing_facts(answer: str, source: str) -> list[str]:
    """The answer's facts that the source does not hold, as people would read them."""
    src = facts(source)
    numbers = {f.split(":")[1] for f in src if f.startswith("n:")}
    return sorted(f.split(":", 1)[1] for f in facts(answer) if not _matches(f, src, numbers))


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE.split(_text.nfc(text)) if len(c.strip()) >= 4]


def _content(clause: str) -> set[str]:
    return _text.char_bigrams(NEGATION.sub(" ", clause))


_AUX = {"수", "것", "적", "줄", "하지", "지"}   # 할 수 없다, 한 적 없다: the predicate is the word before these
_ENDINGS = ("하지", "하진", "지는", "지", "할", "을", "를", "이", "가", "은", "는", "도", "으로", "로", "에서", "에")


def negated_word(clause: str) -> tuple[str, str] | None:
    """(word, stem) of what a negative clause negates: 휴관하지 않습니다 -> 휴관, 연장할 수 없습니다 -> 연장, 요건이 아닙니다 -> 요건."""
    m = NEGATION.search(clause)
    if m is None:
        return None
    words = re.findall(r"[가-힣A-Za-z0-9]+", clause[: m.start()])
    while words and words[-1] in _AUX:
        words.pop()
    if not words:
        return None
    word = stem = words[-1]
    for ending in _ENDINGS:
        if stem.endswith(ending) and len(stem) - len(ending) >= 2:
            stem = stem[: -len(ending)]
            break
    return word, stem


def negation_flip(answer: str, source: str, min_overlap: float = 0.2) -> str | None:
    """An answer clause that the source says with the opposite polarity, or None.

    A flip needs a source clause on the same topic (shared character pairs) whose polarity differs, where the word
    the negative one negates stands in the other (휴관하지 않습니다 against 휴관합니다), and which matches the answer
    clause better than every source clause of the answer's own polarity (the source may say both).
    """
    src = [(c, _content(c), bool(NEGATION.search(c))) for c in _clauses(source)]
    for clause in _clauses(answer):
        mine, negative = _content(clause), bool(NEGATION.search(clause))
        if not mine:
            continue
        same = max((len(mine & theirs) / len(mine) for _, theirs, neg in src if neg == negative), default=0.0)
        for other, theirs, other_negative in src:
            overlap = len(mine & theirs) / len(mine)
            if negative == other_negative or overlap < min_overlap or overlap <= same:
                continue
            neg_clause, pos_clause = (clause, other) if negative else (other, clause)
            found = negated_word(neg_clause)
            if found and (found[0] in pos_clause or (len(found[1]) >= 2 and found[1] in pos_clause)):
                return f"{clause!r} against the source's {other!r}"
    return None


def check(answer: str, source: str, min_overlap: float) -> tuple[float, str | None]:
    """(character-pair overlap, None) when every layer passes, else (overlap, the first failing layer's reason)."""
    score = _text.grounding_score(answer, source)
    missing = missing_facts(answer, source)
    if missing:
        return score, "fact_not_in_source: " + ", ".join(missing)
    flip = negation_flip(answer, source)
    if flip:
        return score, "negation_flip: " + flip
    if score < min_overlap:
        return score, f"ungrounded: {score:.2f} of the answer's character pairs are in the source, under {min_overlap}"
    return score, None


# ----- the optional LLM judge ------------------------------------------------------------------

JUDGE_SYSTEM = ("당신은 사실 확인 담당자입니다. 주어진 [원문]만 근거로, [답변]의 모든 내용이 원문에서 뒷받침되는지 판단하세요. "
                "숫자, 날짜, 장소, 조건, 부정 표현이 원문과 다르면 뒷받침되지 않는 것입니다.")
JUDGE_USER = ('[원문]\n{source}\n\n[질문]\n{question}\n\n[답변]\n{answer}\n\n'
              'JSON 하나로만 답하세요: {{"supported": true 또는 false, "reason": "한 문장"}}')


JUDGE_VERSION = "judge@" + short_hash(_store.sha256_text(JUDGE_SYSTEM + JUDGE_USER))   # in every judge cache key


def judge_messages(question: str, answer: str, source: str) -> list[dict[str, str]]:
    user = JUDGE_USER.replace("{source}", source).replace("{question}", question).replace("{answer}", answer)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(content: str) -> tuple[bool, str]:
    """(supported, reason) from the judge's answer; an answer that is not the asked-for JSON counts as unsupported."""
    m = re.search(r"\{.*\}", content or "", re.S)
    try:
        data = json.loads(m.group(0)) if m else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("supported"), bool):
        return False, "the judge's answer was not the JSON asked for"
    return data["supported"], str(data.get("reason", ""))
