"""Prompt templates: exact strings, braces in user text, the response split, chat templates through a tokenizer."""
import pytest

from culbot.pipeline_config.loader import ConfigError
from culbot.tasks.templates import available_templates, extract_response, load_template, render_prompt

KULLM_INPUT = ("아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절히 완료하는 응답을 작성하세요."
               "\n\n### 명령어:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n")
KULLM_NO_INPUT = "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n### 명령어:\n{instruction}\n\n### 응답:\n"


def test_registry_has_the_named_templates():
    assert available_templates() == ["alpaca", "cbnu", "cbnu2", "chat", "koalpaca", "kullm", "persona"]


def test_kullm_matches_the_published_text_exactly():
    t = load_template("kullm")
    assert t.prompt_input == KULLM_INPUT and t.prompt_no_input == KULLM_NO_INPUT and t.response_split == "### 응답:"
    assert render_prompt(t, "다음 문장을 요약하세요.", "충북대학교는 청주에 있다.") == (
        "아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절히 완료하는 응답을 작성하세요."
        "\n\n### 명령어:\n다음 문장을 요약하세요.\n\n### 입력:\n충북대학교는 청주에 있다.\n\n### 응답:\n")
    assert render_prompt(t, "충북대학교는 어디에 있나요?") == (
        "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n### 명령어:\n충북대학교는 어디에 있나요?\n\n### 응답:\n")


def test_koalpaca_alpaca_and_cbnu_exact():
    assert render_prompt(load_template("koalpaca"), "질문입니다") == "### 질문: 질문입니다\n\n### 답변: "   # "### 답변: {output}", as KoAlpaca
    assert render_prompt(load_template("koalpaca"), "질문", "맥락") == "### 질문: 질문\n\n### 맥락: 맥락\n\n### 답변: "
    assert render_prompt(load_template("alpaca"), "Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi\n\n### Response:\n")
    assert render_prompt(load_template("cbnu"), "휴학은?") == (
        "아래는 충북대학교와 관련한 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n### 명령어:\n휴학은?\n\n### 응답:\n")
    assert render_prompt(load_template("cbnu2"), "휴학은?").startswith("아래는 충북대학교와 관련한 작업을 설명하는 명령어입니다. 충북대학교의 공식 정보에 근거하여")


def test_user_braces_are_not_template_fields():
    out = render_prompt(load_template("kullm"), "코드 {x} 설명", "f'{y}'")
    assert "코드 {x} 설명" in out and "f'{y}'" in out


def test_fields_are_filled_once_so_a_literal_field_in_user_text_stays():
    """Chained str.replace put the input into an instruction that said "{input}"; one pass never re-substitutes."""
    t = load_template("kullm")
    out = render_prompt(t, "템플릿의 {input} 자리에는 무엇이 들어가나요?", "입력 {instruction} 끝")
    assert "### 명령어:\n템플릿의 {input} 자리에는 무엇이 들어가나요?\n\n### 입력:\n입력 {instruction} 끝\n\n### 응답:\n" in out
    from culbot.tasks.contracts import ContextFormat
    from culbot.tasks.templates import render_context

    assert render_context([("{text} 제목", "본문 {n} {title}")], ContextFormat()) == "[참고 1] {text} 제목\n본문 {n} {title}"


def test_extract_response_uses_the_same_split():
    t = load_template("kullm")
    assert extract_response(t, render_prompt(t, "질문") + " 답변입니다. ") == "답변입니다."


def test_unknown_template_lists_available():
    with pytest.raises(ConfigError, match="available: alpaca, cbnu"):
        load_template("nope")


def tiny_chat_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["충북대학교 도서관 질문 답변 안녕하세요"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(folder)
    return str(folder)


def test_chat_template_renders_through_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_tokenizer(tmp_path / "tok"))
    t = load_template("persona")
    assert render_prompt(t, "도서관은 몇 시에 여나요?", "", tok) == (
        f"<|system|>\n{t.system}\n<|user|>\n도서관은 몇 시에 여나요?\n<|assistant|>\n")
    with pytest.raises(ConfigError, match="none was given"):
        render_prompt(t, "x")


