"""Text cleaning shared by the stages: NFC, HTML stripping, PII removal, Korean checks."""
from __future__ import annotations

import html
import re
import unicodedata

EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Korean phone numbers: 010-1234-5678, 043-261-2114, 02)123-4567, 01012345678, +82 10 ...
PHONE_RE = re.compile(r"(?<!\d)(?:\+82[-\s]?)?0?\d{2,3}[-.)\s]\s?\d{3,4}[-.\s]\d{4}(?!\d)|(?<!\d)01[016789]\d{7,8}(?!\d)")
URL_RE = re.compile(r"(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
TAG_RE = re.compile(r"</?[A-Za-z!][^>]*>")  # a tag or comment; "a < b" is text
LONE_JAMO_RE = re.compile(r"[ㄱ-ㅎㅏ-ㅣ]+")
HANGUL_RE = re.compile(r"[가-힣]")
LETTER_RE = re.compile(r"[^\W\d_]", re.UNICODE)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def decode_text(data: bytes, declared: str | None = None) -> tuple[str | None, str | None]:
    """(text, None), or (None, why it is not text). Tries the declared charset, UTF-8, then CP949 (a superset of
    EUC-KR, which Korean university sites still serve)."""
    if b"\x00" in data[:65536]:
        return None, "undecodable: NUL bytes (a binary file)"
    for enc in dict.fromkeys(e for e in (declared, "utf-8-sig", "cp949") if e):
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        odd = non_text_share(text)
        if odd > 0.02:
            return None, f"mostly_non_text: {odd:.0%} control or unassigned characters as {enc}"
        return text, None
    return None, "undecodable: neither " + ", ".join(dict.fromkeys(e for e in (declared, "UTF-8", "CP949/EUC-KR") if e))


def non_text_share(text: str) -> float:
    """Share of characters no text holds: controls (but tab and line breaks), unassigned, private use, U+FFFD."""
    if not text:
        return 0.0
    odd = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c) in ("Cc", "Cn", "Co", "Cs") and c not in "\n\r\t\f"))
    return odd / len(text)


def strip_html(text: str) -> str:
    """Entities first (an answer may hold escaped markup such as &lt;b&gt;), then tags: block-level tags become
    line breaks, inline tags (<b>, <span>) vanish without a space."""
    text = html.unescape(text)
    text = re.sub(r"(?i)<br\s*/?>|</?(?:p|div|li|tr|td|th|h[1-6]|ul|ol|table)\b[^>]*>", "\n", text)
    return TAG_RE.sub("", text)


def normalize_ws(text: str) -> str:
    """Collapse runs of spaces, keep single line breaks, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = [re.sub(r"[ \t\f\v\u200b]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalize_field(text: str) -> str:
    """A training field: NFC, LF line endings, no trailing spaces; indentation and inner blank lines kept (code rows)."""
    text = nfc(text).replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").replace("\u200b", "")
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[0].lstrip() if len(lines) == 1 else "\n".join(lines)


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def shorten(text: str | None, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    one = one_line(text or "")
    return one if len(one) <= width else one[: width - 1] + "…"


def table_cell(text: str | None, width: int = 120) -> str:
    """``text`` as a markdown table cell: one line, ``|`` escaped, at most ``width`` characters."""
    return shorten((text or "").replace("|", "\\|"), width)


_URL_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f<>\"'`{}|\\^]")


def http_url(url: str | None) -> str | None:
    """``url`` when it is a plain http(s) URL with a host and nothing that could leave a link or an attribute (spaces,
    quotes, angle brackets, backslashes, control characters); else None. Pages are untrusted: their canonical URL is
    shown to students as a link."""
    from urllib.parse import urlsplit

    if not url or len(url) > 2048 or _URL_UNSAFE.search(url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme in ("http", "https") and parts.hostname else None


def domain_allowed(url: str, allowed: list[str]) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url if "://" in url else "http://" + url).hostname or ""
    return any(host == d or host.endswith("." + d) for d in allowed)


def remove_pii(text: str, keep_url_domains: list[str] = ()) -> tuple[str, dict[str, int]]:
    """Remove e-mail addresses, phone numbers and URLs (except official domains)."""
    counts = {"email": 0, "phone": 0, "url": 0}

    def _url(m: re.Match) -> str:
        if keep_url_domains and domain_allowed(m.group(0), list(keep_url_domains)):
            return m.group(0)
        counts["url"] += 1
        return " "

    text = URL_RE.sub(_url, text)
    text, counts["email"] = EMAIL_RE.subn(" ", text)
    text, counts["phone"] = PHONE_RE.subn(" ", text)
    return text, counts


def clean_community_text(text: str, *, drop_lone_jamo: bool = True, keep_url_domains: list[str] = ()) -> tuple[str, dict[str, int]]:
    """Clean student-written text: NFC, HTML out, PII out, lone jamo (ㅋㅋ, ㅠㅠ) out, whitespace collapsed."""
    text = nfc(strip_html(text or ""))
    text, counts = remove_pii(text, keep_url_domains)
    if drop_lone_jamo:
        text = LONE_JAMO_RE.sub(" ", text)
    return normalize_ws(text), counts


def hangul_ratio(text: str) -> float:
    """Share of letters that are Hangul syllables (digits, punctuation, spaces ignored)."""
    letters = LETTER_RE.findall(text)
    if not letters:
        return 0.0
    return sum(1 for c in letters if HANGUL_RE.match(c)) / len(letters)


def char_bigrams(text: str) -> set[str]:
    """Character bigrams within words; robust to Korean particles, unlike word overlap."""
    grams: set[str] = set()
    for word in re.findall(r"[\w]+", nfc(text).lower()):
        if len(word) == 1:
            grams.add(word)
        grams.update(word[i : i + 2] for i in range(len(word) - 1))
    return grams


def grounding_score(answer: str, source: str) -> float:
    """Share of the answer's character bigrams that also occur in the source text."""
    a = char_bigrams(answer)
    if not a:
        return 0.0
    return len(a & char_bigrams(source)) / len(a)


def contacts(text: str) -> set[str]:
    """Phone numbers and e-mail addresses in a text, digits-only for phones."""
    found = {m.group(0).lower() for m in EMAIL_RE.finditer(text)}
    found |= {re.sub(r"\D", "", m.group(0)) for m in PHONE_RE.finditer(text)}
    return found


def instruction_fields(item: dict, *, normalize: bool = True) -> tuple[dict[str, str] | None, str | None]:
    """instruction, input and output as text (a missing or null input is ""), or the reason they are not.

    The one check every source's rows go through: KULLM rows, LLM items and merge input.
    """
    out = {}
    for key in ("instruction", "input", "output"):
        v = item.get(key)
        if v is None and key == "input":
            v = ""
        if not isinstance(v, str):
            return None, f"{key}_missing_or_not_text"
        out[key] = normalize_field(v) if normalize else v
    if not out["instruction"].strip():
        return None, "empty_instruction"
    if not out["output"].strip():
        return None, "empty_output"
    return out, None
