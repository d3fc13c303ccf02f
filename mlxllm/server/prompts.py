"""From API messages to prompt token ids: content parts joined, roles checked, the chat template
applied, and the message boundaries the prefix cache snapshots at."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..engine.stream import prompt_ids
from ..errors import UserError
from .tools import ToolPlan, conversation

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiModel(BaseModel):
    """The base of every request model: types are checked strictly (a string is not a number), and
    unknown fields are accepted and ignored, as both APIs' own clients send fields a server may not know."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(ApiModel):
    """A content part (OpenAI) or block (Anthropic); only ``text`` ones are supported."""

    type: str
    text: str | None = None


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts (other part types refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        text = part.get("text") if isinstance(part, dict) else getattr(part, "text", None)
        if kind != "text" or not isinstance(text, str):
            raise UserError(f"{where}: only text content parts are supported, got type {kind!r}")
        texts.append(text)
    return "".join(texts)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (``developer`` is the system role to them)."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
        item = {k: v for k, v in m.items() if v is not None}
        item["role"] = "system" if role == "developer" else role
        item["content"] = content_text(m.get("content"), f"messages[{i}].content")
        out.append(item)
    return out


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], boundaries: bool,
                tools: ToolPlan | None = None) -> tuple[list[int], tuple[int, ...]]:
    """Token ids of ``messages`` (and ``tools``) through the chat template with the assistant's turn
    opened, and (when ``boundaries``) the prompt lengths at which each leading run of whole messages ends."""
    if not messages:
        raise UserError("messages must not be empty")
    if not tokenizer.has_chat_template:
        raise UserError("this model has no chat template; use /v1/completions with a plain prompt")
    messages = conversation(template_messages(messages), tools)
    extra = tools.template_kwargs() if tools is not None else {}
    ids = prompt_ids(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))
    ends: list[int] = []
    if boundaries:
        for k in range(1, len(messages)):
            try:
                head = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=False, **extra)
            except Exception:  # noqa: BLE001  (templates may insist on a particular last role)
                continue
            part = prompt_ids(tokenizer, head)
            if 0 < len(part) < len(ids) and ids[: len(part)] == part:
                ends.append(len(part))
    return ids, tuple(ends)


def text_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """A completion prompt: text (special tokens added as ``generate`` adds them) or token ids."""
    return prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
