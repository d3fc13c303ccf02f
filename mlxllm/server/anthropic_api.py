"""The Anthropic Messages API: ``/v1/messages`` (streaming as Anthropic's named SSE events) and
``/v1/messages/count_tokens``, the API agents such as Claude Code speak."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..engine.grammar import Grammar
from ..engine.requests import Event, Request, SamplingParams
from ..engine.tool_calls import ToolCall
from ..errors import UserError
from .prompts import ApiModel, TextPart, chat_prompt, content_text
from .replies import ReplySplitter, prompt_reasoning
from .state import ServerState
from .tools import ToolPlan, plan_tools, with_tool_grammar

router = APIRouter()


class Message(ApiModel):
    role: Literal["user", "assistant"]
    content: str | list[TextPart]


class _Prompt(ApiModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None

    def chat(self) -> list[dict[str, Any]]:
        """The conversation as OpenAI-style message dicts: ``tool_use`` blocks become an assistant
        message's ``tool_calls``, ``tool_result`` blocks become ``tool`` messages."""
        system = content_text([b.model_dump() for b in self.system] if isinstance(self.system, list) else self.system,
                              "system")
        messages = [{"role": "system", "content": system}] if system else []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            blocks = [b.model_dump() for b in m.content]
            calls = [_openai_call(b) for b in blocks if b.get("type") == "tool_use"]
            for b in blocks:
                if b.get("type") == "tool_result":
                    if not isinstance(b.get("tool_use_id"), str):
                        raise UserError(f"messages[{i}]: a tool_result block needs the tool_use_id it answers")
                    messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                     "content": content_text(b.get("content"), f"messages[{i}] tool_result")})
            # earlier thoughts are not shown to the model again (reasoning templates drop them too)
            texts = [b for b in blocks if b.get("type") not in ("tool_use", "tool_result", "thinking", "redacted_thinking")]
            if texts or calls or not blocks:
                messages.append({"role": m.role, "content": content_text(texts, f"messages[{i}].content"),
                                 **({"tool_calls": calls} if calls else {})})
        return messages

    def plan(self, tokenizer: Any, override: str | None) -> ToolPlan | None:
        choice = self.tool_choice or {"type": "auto"}
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
            raise UserError('tool_choice must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}')
        name = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or choice["name"]
        return plan_tools(tokenizer, self.tools, name, override)


def _openai_call(block: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
        raise UserError("a tool_use block needs a name and an input object")
    return {"id": block.get("id"), "type": "function",
            "function": {"name": block["name"], "arguments": block.get("input", {})}}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": json.loads(call.arguments)}


class MessagesRequest(_Prompt):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | int | None = Field(default=None, ge=0, le=1)
    top_p: float | int | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}
    output_config: dict[str, Any] | None = None  # structured outputs: {"format": {"type": "json_schema", ...}}
    output_format: dict[str, Any] | None = None  # the same, as the beta API spelled it

    def params(self) -> SamplingParams:
        stops = tuple(self.stop_sequences or ())
        params = SamplingParams(max_tokens=self.max_tokens,
                                temp=float(1.0 if self.temperature is None else self.temperature),
                                top_p=float(self.top_p or 1.0), top_k=self.top_k or 0, stop=stops,
                                grammar=self.constraint())
        params.check()
        return params

    def thinking_budget(self, default: int | None) -> int | None:
        """Thinking tokens this reply may take: ``budget_tokens`` when enabled, none when disabled."""
        kind = (self.thinking or {}).get("type")
        if kind is None or kind == "adaptive":
            return default
        if kind == "disabled":
            return 0
        budget = self.thinking.get("budget_tokens") if self.thinking else None
        if kind != "enabled" or not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise UserError('thinking must be {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}')
        return budget

    def constraint(self) -> Grammar | None:
        """The JSON schema structured outputs ask for (``output_config.format`` or ``output_format``)."""
        fmt = (self.output_config or {}).get("format")
        if fmt is not None and self.output_format is not None:
            raise UserError("give output_config.format or output_format, not both")
        fmt = fmt if fmt is not None else self.output_format
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise UserError('the output format must be {"type": "json_schema", "schema": {...}}')
        return Grammar.json_schema(fmt["schema"])


def _stop_reason(event: Event) -> tuple[str, str | None]:
    if event.finish_reason == "length":
        return "max_tokens", None
    if event.stop_sequence is not None:
        return "stop_sequence", event.stop_sequence
    return "end_turn", None


def _usage(prompt_tokens: int, cached: int, generated: int) -> dict[str, Any]:
    # Anthropic counts input tokens read from the cache apart from the others.
    return {"input_tokens": prompt_tokens - cached, "output_tokens": generated,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: _Prompt, request: HTTPRequest) -> dict[str, Any]:
    state: ServerState = request.app.state.server
    tokenizer = state.tokenizer()
    plan = body.plan(tokenizer, state.tool_parser)
    ids, _ = await run_in_threadpool(chat_prompt, tokenizer, body.chat(), False, plan)
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    tokenizer = state.tokenizer()
    plan = body.plan(tokenizer, state.tool_parser)
    params = with_tool_grammar(body.params(), plan)
    ids, ends = await run_in_threadpool(chat_prompt, tokenizer, body.chat(), not state.trims, plan)
    reasoning = prompt_reasoning(tokenizer, ids, body.thinking_budget(state.reasoning_budget))
    req = Request(ids, dataclasses.replace(params, reasoning=reasoning), ends, id=f"msg_{uuid.uuid4().hex[:24]}",
                  adapter=state.adapter_for(body.model))
    message = {"id": req.id, "type": "message", "role": "assistant", "model": state.model_name}
    split = ReplySplitter(reasoning, plan.parser() if plan is not None else None)
    if body.stream:
        return _stream(state, req, message, split)
    text, events = await state.complete(req, request)
    last = events[-1] if events else None
    reason, sequence = _stop_reason(last) if last else ("max_tokens", None)
    thought, text, calls = split.push(text, last=True)
    content = [{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []
    content += ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_use(c) for c in calls]
    return {**message, "content": content, "stop_reason": "tool_use" if calls else reason, "stop_sequence": sequence,
            "usage": _usage(len(ids), last.cached_tokens if last else 0, last.generation_tokens if last else 0)}


class _Blocks:
    """The content-block events of one streamed message: a thinking block and a text block, each
    opened when its text comes, and a ``tool_use`` block (its input as one ``input_json_delta``) for
    each call."""

    def __init__(self) -> None:
        self.index, self.open, self.calls = 0, None, 0  # open: the kind of the block being written

    def text(self, text: str, kind: str = "text") -> list[str]:
        out = []
        if self.open != kind:
            out = self.close() + [_sse("content_block_start", {
                "type": "content_block_start", "index": self.index,
                "content_block": {"type": "text", "text": ""} if kind == "text" else
                {"type": "thinking", "thinking": "", "signature": ""}})]
            self.open = kind
        if text:
            delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta",
                                                                                  "thinking": text}
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}))
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        self.index += 1
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self.index - 1})]

    def call(self, call: ToolCall) -> list[str]:
        block = {**_tool_use(call), "input": {}}
        out = self.close() + [
            _sse("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}),
            _sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                         "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
            _sse("content_block_stop", {"type": "content_block_stop", "index": self.index})]
        self.index, self.calls = self.index + 1, self.calls + 1
        return out


def _stream(state: ServerState, req: Request, message: dict[str, Any], split: ReplySplitter) -> StreamingResponse:
    events = state.worker.open(req)

    async def body() -> AsyncIterator[str]:
        first, blocks = None, _Blocks()
        async for event in events:
            if first is None:  # message_start waits for the first event: it reports the cached tokens
                first = event
                start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                         "usage": _usage(event.prompt_tokens, event.cached_tokens, 0)}
                yield _sse("message_start", {"type": "message_start", "message": start})
                if split.thoughts is None and split.tools is None:
                    for line in blocks.text(""):
                        yield line
                yield _sse("ping", {"type": "ping"})
            if event.finish_reason == "error":
                yield _sse("error", {"type": "error", "error": {"type": "api_error",
                                                                "message": event.error or "generation failed"}})
                return
            thought, text, calls = split.push(event.text, last=event.finish_reason is not None)
            lines = (blocks.text(thought, "thinking") if thought else []) + (blocks.text(text) if text else [])
            for line in lines + [x for c in calls for x in blocks.call(c)]:
                yield line
            if event.finish_reason is not None:
                reason, sequence = _stop_reason(event)
                if blocks.index == 0 and blocks.open is None:  # an empty answer still has its text block
                    for line in blocks.text(""):
                        yield line
                for line in blocks.close():
                    yield line
                yield _sse("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": "tool_use" if blocks.calls else reason,
                                                       "stop_sequence": sequence},
                                             "usage": {"output_tokens": event.generation_tokens}})
                yield _sse("message_stop", {"type": "message_stop"})

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
