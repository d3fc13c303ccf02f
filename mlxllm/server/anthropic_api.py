"""The Anthropic Messages API: ``/v1/messages`` (streaming as Anthropic's named SSE events) and
``/v1/messages/count_tokens``, the API agents such as Claude Code speak."""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..engine.grammar import Grammar
from ..engine.requests import Event, Request, SamplingParams
from ..errors import UserError
from .prompts import ApiModel, TextPart, chat_prompt, content_text
from .state import ServerState

router = APIRouter()


class Message(ApiModel):
    role: Literal["user", "assistant"]
    content: str | list[TextPart]


class _Prompt(ApiModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    tools: list[dict[str, Any]] | None = None

    def chat(self) -> list[dict[str, Any]]:
        if self.tools:
            raise UserError("tools are not supported by this server yet")
        system = content_text([b.model_dump() for b in self.system] if isinstance(self.system, list) else self.system,
                              "system")
        messages = [{"role": "system", "content": system}] if system else []
        for i, m in enumerate(self.messages):
            content = m.content if isinstance(m.content, str) else [b.model_dump() for b in m.content]
            messages.append({"role": m.role, "content": content_text(content, f"messages[{i}].content")})
        return messages


class MessagesRequest(_Prompt):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | int | None = Field(default=None, ge=0, le=1)
    top_p: float | int | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
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
    ids, _ = await run_in_threadpool(chat_prompt, state.tokenizer(), body.chat(), False)
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    tokenizer = state.tokenizer()
    params = body.params()
    ids, ends = await run_in_threadpool(chat_prompt, tokenizer, body.chat(), not state.trims)
    req = Request(ids, params, ends, id=f"msg_{uuid.uuid4().hex[:24]}")
    message = {"id": req.id, "type": "message", "role": "assistant", "model": state.model_name}
    if body.stream:
        return _stream(state, req, message)
    text, events = await state.complete(req, request)
    last = events[-1] if events else None
    reason, sequence = _stop_reason(last) if last else ("max_tokens", None)
    return {**message, "content": [{"type": "text", "text": text}], "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(len(ids), last.cached_tokens if last else 0, last.generation_tokens if last else 0)}


def _stream(state: ServerState, req: Request, message: dict[str, Any]) -> StreamingResponse:
    events = state.worker.open(req)

    async def body() -> AsyncIterator[str]:
        first = None
        async for event in events:
            if first is None:  # message_start waits for the first event: it reports the cached tokens
                first = event
                start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
                         "usage": _usage(event.prompt_tokens, event.cached_tokens, 0)}
                yield _sse("message_start", {"type": "message_start", "message": start})
                yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}})
                yield _sse("ping", {"type": "ping"})
            if event.finish_reason == "error":
                yield _sse("error", {"type": "error", "error": {"type": "api_error",
                                                                "message": event.error or "generation failed"}})
                return
            if event.text:
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": event.text}})
            if event.finish_reason is not None:
                reason, sequence = _stop_reason(event)
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield _sse("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                             "usage": {"output_tokens": event.generation_tokens}})
                yield _sse("message_stop", {"type": "message_stop"})

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
