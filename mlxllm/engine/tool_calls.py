"""Tool calls: which format a model writes them in, the grammar that makes a required call valid,
and a streaming parser that turns generated text into text pieces and complete calls.

Formats, chosen from the chat template (``tool_format``) or named by ``--tool-parser``:

- ``hermes`` (Hermes, Qwen 2.5 / 3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number of them, text around them;
- ``llama3`` (Llama 3.1-3.3): the whole reply is ``{"name": ..., "parameters": {...}}``, optionally
  after ``<|python_tag|>``, several separated by ``;``; or a built-in tool's ``name.call(key=value)``;
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of calls, or (newer templates) ``name[ARGS]{...}``;
- ``json``: the generic fallback for templates that know no tools: the reply is one call object
  ``{"name": ..., "arguments": {...}}`` or a list of them, optionally in a fenced code block.

A call whose JSON does not parse, or that names no function, is never handed out as a call: its
text goes out as text. With ``tool_choice`` "required" or a named function the grammar from
``call_grammar`` makes the call valid by construction, arguments matching the function's schema
(an object schema that does not say whether extra arguments are allowed is closed to them).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .grammar import JSON_OPTIONS, Grammar
from .stream import held_tail

TOOL_FORMATS = ("hermes", "llama3", "mistral", "json")
MARKERS = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}


@dataclass
class ToolCall:
    """One call: the function's name and its arguments as JSON text (what the OpenAI API sends)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tool_format(template: str | None) -> str:
    """The format a chat template's model writes calls in (``json`` when the template shows none)."""
    source = template or ""
    for name in ("hermes", "mistral", "llama3"):
        if MARKERS[name] in source:
            return name
    if "parameters" in source and "<|eot_id|>" in source and "tools" in source:
        return "llama3"
    return "json"


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tools as ``{"name", "description", "parameters"}`` dicts (OpenAI's
    ``{"type": "function", "function": {...}}`` and Anthropic's ``{"name", "input_schema"}`` alike)."""
    out = []
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise UserError(f"tools[{i}] must name its function")
        params = spec.get("parameters", spec.get("input_schema", {"type": "object"}))
        if not isinstance(params, dict):
            raise UserError(f"tools[{i}]: the parameters must be a JSON schema object")
        out.append({"name": spec["name"], "description": spec.get("description", ""), "parameters": params})
    if len({t["name"] for t in out}) != len(out):
        raise UserError("tools must have distinct names")
    return out


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as chat templates expect them (OpenAI's shape, which Hugging Face templates read)."""
    return [{"type": "function", "function": t} for t in tools]


def fallback_instructions(tools: list[dict[str, Any]]) -> str:
    """A system-prompt paragraph for templates that render no tools: what the tools are and how to
    call one (the ``json`` format)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call these tools:\n" + listing + "\n\nTo call a tool, reply with only a JSON object "
            '{"name": <tool name>, "arguments": <arguments object>} and nothing else.')


def call_grammar(tools: list[dict[str, Any]], fmt: str, name: str | None = None, marker_id: int | None = None) -> Grammar:
    """A grammar for exactly one call in ``fmt`` to ``name`` (or to any of ``tools``), its arguments
    valid under that function's parameter schema; ``marker_id``: the id of a format's opening marker
    when the vocabulary holds it as one control token (Mistral's ``[TOOL_CALLS]``), which is then
    what opens the call."""
    chosen = [t for t in tools if name is None or t["name"] == name]
    if not chosen:
        raise UserError(f"tool_choice names {name!r}, which is not among the tools")
    key = "parameters" if fmt == "llama3" else "arguments"
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", key],
              "properties": {"name": {"const": t["name"]}, key: _declared_only(t["parameters"])}} for t in chosen]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": JSON_OPTIONS}
    body = "call: %json " + json.dumps(schema)
    if fmt == "hermes":
        return Grammar.cfg('start: "<tool_call>\\n" call "\\n</tool_call>"\n' + body)
    if fmt == "mistral":
        opening = f"<[{marker_id}]>" if marker_id is not None else '"[TOOL_CALLS]"'
        return Grammar.cfg(f'start: {opening} "[" call "]"\n' + body)
    return Grammar.cfg("start: call\n" + body)


def _declared_only(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter schema that leaves extra arguments open closed to them (a forced call passes only
    the parameters the function declares, as OpenAI's strict mode does)."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _calls(payload: str) -> list[ToolCall] | None:
    """The calls in a JSON payload (one object, a list, or ``;``-separated objects); None if it is not
    wholly calls."""
    text = payload.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        try:
            found = [json.loads(part) for part in text.split(";") if part.strip()]
        except json.JSONDecodeError:
            call = _python_call(text)
            return [call] if call is not None else None
    found = found if isinstance(found, list) else [found]
    calls = [_call(obj) for obj in found]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def _python_call(text: str) -> ToolCall | None:
    """Llama 3's built-in tool form after ``<|python_tag|>``: ``name.call(key=literal, ...)`` (or
    ``name(...)``); None for anything else (only literal keyword arguments are read, nothing runs)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(node, ast.Call) or node.args:
        return None
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "call":
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except (ValueError, SyntaxError):
        return None
    return _call({"name": func.id, "arguments": args})


def _mistral_calls(payload: str) -> list[ToolCall] | None:
    """``[TOOL_CALLS]``'s payload: a JSON list, or ``name[ARGS]{...}`` repeated (newer templates)."""
    if "[ARGS]" not in payload:
        return _calls(payload)
    calls = []
    for part in payload.split("[TOOL_CALLS]"):
        name, _, args = part.partition("[ARGS]")
        call = _call({"name": name.strip(), "arguments": args.strip()})
        if call is None:
            return None
        calls.append(call)
    return calls


class ToolCallParser:
    """Generated text in, ``(text, calls)`` out, piece by piece: text that may begin a call is held
    back until it is clear; a call goes out whole once its text is complete (at its closing tag, or at
    the end of generation for formats without one)."""

    def __init__(self, fmt: str) -> None:
        if fmt not in TOOL_FORMATS:
            raise UserError(f"unknown tool parser {fmt!r}; expected one of {', '.join(TOOL_FORMATS)}")
        self.fmt, self.calls = fmt, 0
        self._held = ""  # text not yet sent: a possible marker, or a call being written
        self._inside = False  # past a call's opening marker (or, for whole-reply formats, its first "{")
        self._started = False  # any non-blank text seen (whole-reply formats decide on the first)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        if self.fmt == "hermes":
            return self._hermes()
        return self._whole_reply()

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of generation: what is still held, as calls if it is wholly calls, else text."""
        held, self._held = self._held, ""
        if not self._inside:
            return held, []
        payload, marker = held.strip(), MARKERS.get(self.fmt, "")
        if self.fmt != "hermes" and marker and payload.startswith(marker):
            payload = payload[len(marker):]
        calls = _mistral_calls(payload.strip()) if self.fmt == "mistral" else _calls(payload)
        if calls is None:  # not a call after all: the text as written
            return (marker + held if self.fmt == "hermes" else held), []
        self.calls += len(calls)
        return "", calls

    def _hermes(self) -> tuple[str, list[ToolCall]]:
        out, calls, start, end = "", [], "<tool_call>", "</tool_call>"
        while True:
            if self._inside:
                close = self._held.find(end)
                if close < 0:
                    return out, calls
                body, self._held = self._held[:close], self._held[close + len(end):]
                self._inside = False
                found = _calls(body)
                if found is None:
                    out += start + body + end
                else:
                    calls += found
                    self.calls += len(found)
                continue
            at = self._held.find(start)
            if at >= 0:
                out += self._held[:at]
                self._held, self._inside = self._held[at + len(start):], True
                continue
            keep = held_tail(self._held, (start,))
            out += self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep:]
            return out, calls

    def _whole_reply(self) -> tuple[str, list[ToolCall]]:
        if self._inside:
            return "", []
        if not self._started:
            stripped = self._held.lstrip()
            if not stripped:
                return "", []
            marker = MARKERS.get(self.fmt)
            opens = ("{", "[", "```") + ((marker,) if marker else ())
            if any(stripped.startswith(o) or o.startswith(stripped) for o in opens):
                if not any(stripped.startswith(o) for o in opens):
                    return "", []  # still a possible opening: wait for more
                self._started = self._inside = True
                return "", []
            self._started = True
        if self.fmt == "mistral":  # a call may follow text
            at = self._held.find(MARKERS["mistral"])
            if at >= 0:
                out, self._held, self._inside = self._held[:at], self._held[at:], True
                return out, []
            keep = held_tail(self._held, (MARKERS["mistral"],))
            out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
            return out, []
        out, self._held = self._held, ""
        return out, []

