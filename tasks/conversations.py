"""Conversations as rows: the one check every multi-turn row goes through, and how a row's conversation is read.

A row of a dataset version is single-turn (instruction, input, output) or carries ``messages``: a
list of {role, content} with roles system (first only), then user and assistant alternating,
ending with an assistant turn; or one {role: completion, content} message (plain text, learned
whole). A conversation of one user and one assistant turn is stored as a single-turn row, so it
dedups against alpaca rows of the same question.
"""
from __future__ import annotations

from typing import Any

from . import _text

ROLES = ("system", "user", "assistant")
COMPLETION = "completion"


def check_messages(messages: Any, normalize: bool = True) -> tuple[list[dict] | None, str | None]:
    """(clean messages, None) or (None, reason)."""
    if not isinstance(messages, list) or not messages:
        return None, "conversation_missing"
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            return None, "message_not_text"
        if m["role"] not in ROLES + (COMPLETION,):
            return None, f"unknown_role: {m['role']}"
        content = _text.normalize_field(m["content"]) if normalize else m["content"]
        if not content.strip():
            return None, f"empty_{m['role']}_turn"
        out.append({"role": m["role"], "content": content})
    if out[0]["role"] == COMPLETION:
        return (out, None) if len(out) == 1 else (None, "completion_with_turns")
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        return None, "conversation_missing"
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return None, "roles_do_not_alternate"
    if turns[-1]["role"] != "assistant":
        return None, "ends_without_answer"
    return out, None


def as_row(messages: list[dict]) -> dict[str, Any]:
    """The row fields of checked messages: one question and its answer as a plain single-turn row; otherwise the first
    user turn and its answer as instruction/output (for stats and readers) and the whole conversation in ``messages``."""
    if messages[0]["role"] == COMPLETION:
        return {"instruction": "", "input": "", "output": messages[0]["content"], "messages": messages}
    turns = [m for m in messages if m["role"] != "system"]
    row = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
    return row if len(messages) == 2 else {**row, "messages": messages}


def dedup_text(row: dict) -> str:
    """What makes two rows the same question: instruction and input, or every user turn (and the system message)."""
    msgs = row.get("messages")
    if msgs:
        return "\n".join(m["content"] for m in msgs if m["role"] in ("system", "user", COMPLETION))
    return row["instruction"] + "\n" + row["input"]
