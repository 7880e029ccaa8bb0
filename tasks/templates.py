"""Prompt templates: named, pure, and the same code for training and serving.

Templates live in pipeline_config/templates/<name>.json (alpaca-lora's keys: description,
prompt_input, prompt_no_input, response_split; or kind "chat" with a persona system
message, rendered by the tokenizer's chat template). The format stage renders training
prompts with :func:`render_prompt`; eval, merge and serving call the same function with
the template saved in the run card, so prompts never drift between them.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from culbot.pipeline_config.loader import PACKAGE_DIR, ConfigError

from .contracts import ContextFormat, Template, TemplateSet
from .conversations import COMPLETION

TEMPLATE_DIR = PACKAGE_DIR / "templates"


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_template(name: str, folder: Path = TEMPLATE_DIR) -> Template:
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown template {name!r}; available: {', '.join(available_templates())}")
    try:
        t = Template(name=name, **json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValidationError) as e:
        raise ConfigError(f"{path}: not a valid template ({e})") from None
    if t.kind == "alpaca":
        for field, text in (("prompt_input", t.prompt_input), ("prompt_no_input", t.prompt_no_input)):
            if "{instruction}" not in text:
                raise ConfigError(f"{path}: field '{field}' lacks {{instruction}}")
        if "{input}" not in t.prompt_input:
            raise ConfigError(f"{path}: field 'prompt_input' lacks {{input}}")
    return t


def conversation(instruction: str, input: str = "", output: str | None = None) -> list[dict]:
    """A single-turn row as messages: the input rides on the user message (the chat templates' ``input`` key)."""
    user = {"role": "user", "content": instruction, **({"input": input} if input else {})}
    return [user] + ([{"role": "assistant", "content": output}] if output is not None else [])


def _chat_messages(t: Template, messages: list[dict]) -> list[dict]:
    """Plain {role, content} messages for a tokenizer's chat template: the persona first unless the conversation
    brings its own system message, and each user message's input after a blank line."""
    out = [{"role": "system", "content": t.system}] if t.system and (not messages or messages[0]["role"] != "system") else []
    for m in messages:
        content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
        out.append({"role": m["role"], "content": content})
    return out


def render_messages(t: Template, tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    """A conversation through the tokenizer's own chat template (chat-kind templates)."""
    if tokenizer is None:
        raise ConfigError(f"template {t.name!r} renders through a tokenizer's chat template, and none was given")
    # The base template, not a culbot one installed on this tokenizer (that one adds the persona itself).
    base = tokenizer.chat_template.get("base") if isinstance(tokenizer.chat_template, dict) else tokenizer.chat_template
    if not base:
        raise ConfigError(f"template {t.name!r} needs a tokenizer with a chat template; this one has none "
                          "(use an alpaca-style template such as kullm for a base model without one)")
    return tokenizer.apply_chat_template(_chat_messages(t, messages), chat_template=base, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_prompt(t: Template, instruction: str, input: str = "", tokenizer: Any = None,
                  history: list[tuple[str, str]] = ()) -> str:
    """The exact prompt text for one example (everything before the response).

    ``history``: earlier (question, answer) turns, rendered only by templates with a conversation form (chat);
    training rows have none."""
    if t.kind == "chat":
        turns = [m for q, a in history for m in conversation(q, "", a)]
        return render_messages(t, tokenizer, turns + conversation(instruction, input), add_generation_prompt=True)
    if input:
        return fill(t.prompt_input, instruction=instruction, input=input)
    return fill(t.prompt_no_input, instruction=instruction)


def render_segments(t: Template, messages: list[dict], tokenizer: Any = None) -> list[tuple[str, bool]]:
    """A training conversation as (text, learned) pieces, in order; only assistant turns are learned.

    Alpaca-style: each user turn through the template, each answer after it (tokenize appends the EOS to every
    answer). Chat: the tokenizer's chat template, cut where each assistant turn starts and ends, so an answer's
    piece carries the template's end-of-turn token (Llama-3's <|eot_id|>); the cuts hold only for a template whose
    renderings of a conversation's prefixes are prefixes of its whole rendering, which is checked.
    """
    if messages and messages[0]["role"] == COMPLETION:   # plain text: learned whole, whatever the template
        return [(messages[0]["content"], True)]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    if t.kind != "chat":
        out = []
        for m in messages:
            if m["role"] == "user":
                out.append((render_prompt(t, m["content"], m.get("input", "")), False))
            elif m["role"] == "assistant":
                out.append((m["content"], True))
        return out
    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_messages(t, tokenizer, messages[:i], add_generation_prompt=True)
        through = render_messages(t, tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError(f"template {t.name!r}: the tokenizer's chat template does not render a conversation's prefixes "
                             "as prefixes of it, so assistant turns cannot be masked")
        out += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, learned) for text, learned in out if text]


def render_context(passages: list[tuple[str, str]], fmt: ContextFormat) -> str:
    """Retrieved passages, (title, text) in order, as the `input` of a prompt: the same text in training and serving."""
    return fmt.joiner.join(fill(fmt.passage, n=str(n), title=title, text=text) for n, (title, text) in enumerate(passages, 1))


@functools.lru_cache(maxsize=256)   # a dataset renders the same few templates a million times
def _pieces(template: str, fields: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """A template as ("text", literal) and ("field", name) pieces, in order."""
    out, at = [], 0
    for m in re.finditer("|".join(re.escape("{" + f + "}") for f in fields), template):
        out += [("text", template[at:m.start()]), ("field", m.group(0)[1:-1])]
        at = m.end()
    return tuple(p for p in out + [("text", template[at:])] if p != ("text", ""))


def fill(template: str, **values: str) -> str:
    """The template with each {field} replaced once, in one pass: a value is never searched for fields itself, so a
    student's literal "{input}" or braces stay as typed (str.format would fail, chained str.replace would re-substitute)."""
    return "".join(v if kind == "text" else values[v] for kind, v in _pieces(template, tuple(values)))


def extract_response(t: Template, generated: str) -> str:
    """The model's answer from a full generated text (serving side)."""
    if t.response_split and t.response_split in generated:
        return generated.split(t.response_split, 1)[1].strip()
    return generated.strip()


EXAMPLE_QUESTION = "기숙사 신청은 언제 해요?"   # the question rendered as the example prompt in run and model cards

RENDERER_VERSION = 3   # 2: fields filled in one pass (fill); 3: rows carry their conversation (messages). In the format key


# ----- the same prompt as a Jinja chat template (saved in every adapter's and merged model's tokenizer) -----

def _lit(text: str) -> str:
    """A Jinja string literal for any text (JSON's escapes are Jinja's, and \\uXXXX keeps it ASCII)."""
    return json.dumps(text)


_TITLE = "(d['title'] if d['title'] is defined else '')"
_TEXT = "d['text']"


def _jinja_concat(template: str, fields: dict[str, str]) -> str:
    """A Jinja expression that renders ``template`` as :func:`fill` does: literals and variables joined with ~."""
    parts = [_lit(v) if kind == "text" else fields[v] for kind, v in _pieces(template, tuple(fields))]
    return " ~ ".join(parts) or "''"


def _context_jinja(fmt: ContextFormat | None) -> str:
    """Sets ns.context from `documents` ({title, text} each), exactly as render_context joins them."""
    fmt = fmt or ContextFormat()
    return ("{%- set ns.context = '' -%}"
            "{%- if documents is defined and documents -%}{%- for d in documents -%}"
            f"{{%- set p = {_jinja_concat(fmt.passage, {'n': '(loop.index|string)', 'title': _TITLE, 'text': _TEXT})} -%}}"
            f"{{%- set ns.context = p if loop.first else ns.context ~ {_lit(fmt.joiner)} ~ p -%}}"
            "{%- endfor -%}{%- endif -%}")


def chat_template_jinja(t: Template, context: ContextFormat | None = None, base_chat_template: str | None = None) -> str:
    """``t`` as a Jinja chat template that renders exactly :func:`render_prompt`'s text.

    The last user message is the instruction; its optional ``input`` key is the input; retrieved passages come as
    ``documents`` ([{title, text}], the HF/vLLM convention), rendered with ``context`` and put before the input as
    in training. An alpaca-style template has no conversation form: earlier turns are not rendered. A chat
    template wraps the base tokenizer's own chat template and adds the persona when no system message is given.
    """
    head = ("{%- set ns = namespace(instruction='', input='', context='', msgs=[]) -%}"
            "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.instruction = m['content'] -%}"
            "{%- set ns.input = m['input'] if m['input'] is defined and m['input'] else '' -%}{%- endif -%}{%- endfor -%}"
            + _context_jinja(context) +
            "{%- if ns.context and ns.input -%}{%- set ns.input = ns.context ~ '\\n\\n' ~ ns.input -%}"
            "{%- elif ns.context -%}{%- set ns.input = ns.context -%}{%- endif -%}")
    if t.kind == "alpaca":
        return (head + "{%- if ns.input -%}"
                f"{{{{- {_jinja_concat(t.prompt_input, {'instruction': 'ns.instruction', 'input': 'ns.input'})} -}}}}"
                "{%- else -%}"
                f"{{{{- {_jinja_concat(t.prompt_no_input, {'instruction': 'ns.instruction'})} -}}}}"
                "{%- endif -%}")
    if not base_chat_template:
        raise ConfigError(f"template {t.name!r} wraps the base tokenizer's chat template, and that tokenizer has none")
    # Rebuild the message list: the persona first (unless the caller sent a system message), and the input folded
    # into the last user message the way render_prompt does (instruction, a blank line, input).
    persona = (f"{{%- if t_system is not defined -%}}{{%- set t_system = {_lit(t.system)} -%}}{{%- endif -%}}"
               "{%- if messages[0]['role'] != 'system' and t_system -%}{%- set ns.msgs = [{'role': 'system', 'content': t_system}] -%}{%- endif -%}"
               "{%- for m in messages -%}{%- if loop.last and m['role'] == 'user' and ns.input -%}"
               "{%- set ns.msgs = ns.msgs + [{'role': 'user', 'content': m['content'] ~ '\\n\\n' ~ ns.input}] -%}"
               "{%- else -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- endif -%}{%- endfor -%}"
               "{%- set messages = ns.msgs -%}")
    return head + persona + base_chat_template


def chat_templates(templates: TemplateSet, serve_source: str, base_chat_template: str | None = None) -> dict[str, str]:
    """Every template of a set as Jinja, by name, with 'default' the one that serves (``serve_source``'s template).

    Saved as the tokenizer's chat templates, so ``apply_chat_template``, vLLM and TGI render the training prompt."""
    out = {}
    for name, t in sorted(templates.templates.items()):
        if t.kind == "chat" and not base_chat_template:
            continue
        out[name] = chat_template_jinja(t, templates.context, base_chat_template)
    serving = templates.for_source(serve_source)
    out["default"] = out.get(serving.name) or chat_template_jinja(serving, templates.context, base_chat_template)
    if base_chat_template:
        out["base"] = base_chat_template   # the model's own, for render_prompt and anyone who wants it bare
    return out


def install_chat_templates(tokenizer: Any, templates: TemplateSet, serve_source: str) -> None:
    """Set ``tokenizer.chat_template`` to the training templates (chat_templates) before it is saved with a model."""
    base = tokenizer.chat_template
    if isinstance(base, dict):
        base = base.get("base")
    tokenizer.chat_template = chat_templates(templates, serve_source, base)
