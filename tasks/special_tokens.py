"""Special tokens per tokenizer and template: the BOS a prompt starts with, the token that ends an answer, a safe pad.

One set of rules for tokenize, train, eval, merge and serving, so the tokens a model learned are
the tokens it is prompted with and stops on:
  BOS     alpaca-style templates: whatever the tokenizer itself puts before a text (Llama-3: <|begin_of_text|>;
          polyglot-ko and Qwen2: nothing). Chat templates write their own BOS into the text.
  end     alpaca-style templates: the tokenizer's EOS (appended as in alpaca-lora). Chat templates: the token the
          template closes an assistant turn with (Llama-3: <|eot_id|>, Qwen2: <|im_end|>), read off a rendering.
  stop    generation stops on the EOS and on the template's end token.
  pad     the tokenizer's; else the first of the family's pad candidates in the vocabulary; else the EOS.
          Padded labels are -100 and the collators mask pads by length, so a pad is never learned.
"""
from __future__ import annotations

import logging
from typing import Any

from culbot.pipeline_config.model_schema import family

from .contracts import SpecialTokens, Template
from .templates import render_messages

log = logging.getLogger("culbot.special_tokens")

_PROBE = "충북대학교"


def prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text when asked for special tokens (its BOS, if it adds one)."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def end_of_answer(tokenizer: Any, template: Template) -> tuple[int, str]:
    """(id, token) that ends an answer under ``template`` (see the module docstring)."""
    if template.kind != "chat":
        return tokenizer.eos_token_id, tokenizer.eos_token
    marker = "\x00답\x00"
    convo = [{"role": "user", "content": "질문"}, {"role": "assistant", "content": marker}]
    text = render_messages(template, tokenizer, convo, add_generation_prompt=False)
    after = text.split(marker, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"template {template.name!r}: the chat template ends an assistant turn with nothing; "
                         "a model trained on it would never learn to stop")
    return ids[0], tokenizer.convert_ids_to_tokens(ids[0])


def ensure_pad(tokenizer: Any, model_type: str) -> str:
    """Give the tokenizer a pad token when it has none; returns where the pad came from."""
    if tokenizer.pad_token_id is not None:
        return "tokenizer"
    vocab = tokenizer.get_vocab()
    for cand in family(model_type).pad_candidates:
        if cand in vocab:
            tokenizer.pad_token = cand
            return "family"
    log.warning("no pad token and none of the family's pad candidates in the vocabulary: padding with the EOS (masked, never learned)")
    tokenizer.pad_token = tokenizer.eos_token
    return "eos"


def special_tokens(tokenizer: Any, template: Template, model_type: str) -> SpecialTokens:
    """The special tokens a run trains and answers with (pads the tokenizer if it has no pad)."""
    pad_from = ensure_pad(tokenizer, model_type)
    end_id, end_token = end_of_answer(tokenizer, template)
    stop = [end_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, end_id) else [])
    return SpecialTokens(bos=prefix_ids(tokenizer) if template.kind != "chat" else [], end_id=end_id, end_token=end_token,
                         stop_ids=stop, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, pad_from=pad_from)


def check_end(tokens: SpecialTokens, generation_eos: int | list[int] | None) -> None:
    """The end token learned in the labels must be one generation stops on (generalises the EOS check)."""
    stops = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    if tokens.end_id not in stops:
        raise ValueError(f"answers are trained to end with {tokens.end_token!r} (id {tokens.end_id}) but generation stops on "
                         f"{stops}; add it to generation_config.eos_token_id")


def encode_prompt(tokenizer: Any, prompt: str, template: Template) -> list[int]:
    """A rendered prompt's ids exactly as training saw them: the BOS rule above, then the text (special tokens in a
    chat template's text are parsed as such)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return (prefix_ids(tokenizer) if template.kind != "chat" else []) + list(ids)
