"""Prompt templates: named, pure, and the same code for training and serving.

Templates live in pipeline_config/templates/<name>.json (alpaca-lora's keys: description,
prompt_input, prompt_no_input, response_split; or kind "chat" with a persona system
message, rendered by the tokenizer's chat template). The format stage renders training
prompts with :func:`render_prompt`; eval, merge and serving call the same function with
the template saved in the run card, so prompts never drift between them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from culbot.pipeline_config.loader import PACKAGE_DIR, ConfigError

from .contracts import ContextFormat, Template

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


def render_prompt(t: Template, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The exact prompt text for one example (everything before the response)."""
    if t.kind == "chat":
        if tokenizer is None:
            raise ConfigError(f"template {t.name!r} renders through a tokenizer's chat template; set format.chat_tokenizer")
        user = instruction if not input else f"{instruction}\n\n{input}"
        messages = ([{"role": "system", "content": t.system}] if t.system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # str.replace, not str.format: user text may contain braces.
    if input:
        return t.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
    return t.prompt_no_input.replace("{instruction}", instruction)


def render_context(passages: list[tuple[str, str]], fmt: ContextFormat) -> str:
    """Retrieved passages, (title, text) in order, as the `input` of a prompt: the same text in training and serving."""
    return fmt.joiner.join(fmt.passage.replace("{n}", str(n)).replace("{title}", title).replace("{text}", text)
                           for n, (title, text) in enumerate(passages, 1))


def extract_response(t: Template, generated: str) -> str:
    """The model's answer from a full generated text (serving side)."""
    if t.response_split and t.response_split in generated:
        return generated.split(t.response_split, 1)[1].strip()
    return generated.strip()
