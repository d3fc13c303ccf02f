"""Tools in a chat request, for both APIs: how they reach the prompt (the model's chat template when
it renders tools, else a system-prompt paragraph and the generic JSON call format), how earlier calls
and their results are written back into the conversation, and the grammar ``tool_choice`` asks for.

Each API maps its own fields onto ``ToolPlan`` (OpenAI ``tools`` / ``tool_choice``, Anthropic
``tools`` / ``tool_choice`` with ``any`` and ``tool``) and its own messages onto OpenAI-style message
dicts (an assistant message with ``tool_calls``, a ``tool`` message with ``tool_call_id``), which are
what Hugging Face chat templates read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from ..engine.grammar import Grammar
from ..engine.reasoning import HARMONY, markers_of
from ..engine.requests import SamplingParams
from ..engine.tool_calls import (MARKERS, ToolCallParser, call_grammar, check_tools, fallback_instructions,
                                 template_tools, tool_format)
from ..errors import UserError


def renders_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template shows the model its tools."""
    return bool(re.search(r"\btools\b", tokenizer.chat_template or ""))


@dataclass
class ToolPlan:
    """A request's tools: the checked list, the call format, and ``choice`` ("auto", "required",
    "none", or a function's name)."""

    tools: list[dict[str, Any]]
    fmt: str
    native: bool  # the chat template renders the tools (else the system prompt describes them)
    choice: str = "auto"
    marker_id: int | None = None  # the format's opening marker, where it is one control token

    def grammar(self) -> Grammar | None:
        """The call ``choice`` forces, if it forces one."""
        if self.choice in ("auto", "none"):
            return None
        return call_grammar(self.tools, self.fmt, None if self.choice == "required" else self.choice, self.marker_id)

    def parser(self) -> ToolCallParser | None:
        return None if self.choice == "none" else ToolCallParser(self.fmt)

    def template_kwargs(self) -> dict[str, Any]:
        """``tools`` for the template (none for "none": a model shown no tools writes a plain answer)."""
        return {"tools": template_tools(self.tools)} if self.native and self.choice != "none" else {}


def plan_tools(tokenizer: Any, tools: list[dict[str, Any]] | None, choice: str, override: str | None) -> ToolPlan | None:
    """The plan for a request's tools (None without tools); ``override`` is ``--tool-parser``."""
    if not tools:
        if choice not in ("auto", "none"):
            raise UserError("tool_choice asks for a tool call, but the request has no tools")
        return None
    native = renders_tools(tokenizer)
    if markers_of(tokenizer.chat_template or "") == HARMONY and choice not in ("auto", "none"):
        raise UserError("tool_choice cannot force a call from a harmony-format model (gpt-oss) yet: use auto")
    fmt = override or (tool_format(tokenizer.chat_template) if native else "json")
    marker = tokenizer.encode(MARKERS[fmt], add_special_tokens=False) if fmt in MARKERS else []
    marker_id = marker[0] if len(marker) == 1 and marker[0] in tokenizer.control_token_ids else None
    plan = ToolPlan(check_tools(tools), fmt, native, choice, marker_id)
    if choice not in ("auto", "none", "required") and choice not in {t["name"] for t in plan.tools}:
        raise UserError(f"tool_choice names {choice!r}, which is not among the tools")
    return plan


def with_tool_grammar(params: SamplingParams, plan: ToolPlan | None) -> SamplingParams:
    """``params`` with the grammar of the call ``tool_choice`` forces (if it forces one)."""
    forced = plan.grammar() if plan is not None else None
    if forced is None:
        return params
    if params.grammar is not None:
        raise UserError("a forced tool call (tool_choice) cannot be combined with a response format or grammar")
    return dataclasses.replace(params, grammar=forced)


def conversation(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """``messages`` as the chat template should see them: call arguments as objects (what templates
    serialize), and, when the template renders no tools, calls written as the JSON the model was told
    to reply with, results as user messages, and the tools described in the system prompt."""
    native = plan is None or plan.native
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls") or []
        if calls:
            m["tool_calls"] = [_template_call(c) for c in calls]
            if not native:
                bodies = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m.pop("tool_calls")]
                m["content"] = json.dumps(bodies[0] if len(bodies) == 1 else bodies, ensure_ascii=False)
        if m.get("role") == "tool" and not native:
            m = {"role": "user", "content": f"Result of the tool call {m.get('tool_call_id', '')}: {m.get('content', '')}"}
        out.append(m)
    if plan is not None and not plan.native and plan.choice != "none":
        note = fallback_instructions(plan.tools)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}".strip()}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError("an assistant message's tool_calls need a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise UserError(f"the arguments of the earlier call to {fn['name']!r} are not valid JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
