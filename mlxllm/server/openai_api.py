"""The OpenAI API: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, in OpenAI's own
request fields, response objects, SSE chunks and usage."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..engine.grammar import Grammar
from ..engine.requests import Event, Request, SamplingParams, TokenLogprob
from ..engine.tool_calls import ToolCall
from ..errors import UserError
from .errors import ApiError
from .prompts import ApiModel, TextPart, chat_prompt, text_prompt
from .replies import ReplySplitter, prompt_reasoning
from .state import ServerState
from .tools import plan_tools, with_tool_grammar

router = APIRouter()


class ChatMessage(ApiModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(ApiModel):
    include_usage: bool = False


class _Generation(ApiModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | int | None = Field(default=None, ge=0, le=2)
    top_p: float | int | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | int | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | int | None = Field(default=None, gt=0)
    presence_penalty: float | int | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | int | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM, llama.cpp): generate exactly max_tokens
    response_format: dict[str, Any] | None = None
    # llama-server's extensions: constrain the output to a JSON schema or a GBNF / Lark grammar
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    def params(self, logprobs: int | None) -> SamplingParams:
        if self.n not in (None, 1):
            raise UserError("n must be 1: this server returns one choice per request")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise UserError("stop takes at most 16 strings")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = SamplingParams(
            max_tokens=limit, temp=float(1.0 if self.temperature is None else self.temperature),
            top_p=float(self.top_p or 1.0), top_k=self.top_k or 0, min_p=float(self.min_p or 0.0),
            repetition_penalty=None if self.repetition_penalty is None else float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty or 0.0), frequency_penalty=float(self.frequency_penalty or 0.0),
            seed=self.seed, stop=tuple(stop), logprobs=logprobs, ignore_eos=self.ignore_eos, grammar=self.constraint())
        params.check()
        return params

    def constraint(self) -> Grammar | None:
        """The grammar ``response_format`` (or llama-server's ``json_schema`` / ``grammar``) asks for."""
        given = [g for g in (self.json_schema, self.grammar) if g is not None]
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if len(given) + (kind != "text") > 1:
            raise UserError("give at most one of response_format, json_schema and grammar")
        if self.json_schema is not None:
            return Grammar.json_schema(self.json_schema)
        if self.grammar is not None:
            return Grammar.cfg(self.grammar)
        if kind == "text":
            return None
        if kind == "json_object":
            return Grammar.json_object()
        if kind != "json_schema":
            raise UserError(f"response_format type must be text, json_object or json_schema, not {kind!r}")
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise UserError("response_format json_schema needs a json_schema object with a schema")
        return Grammar.json_schema(spec.get("schema", {}))


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def choice(self) -> str:
        """``tool_choice`` as "auto", "none", "required" or the name of the function it forces."""
        c = self.tool_choice
        if c is None or c in ("auto", "none", "required"):
            return c or "auto"
        fn = c.get("function") if isinstance(c, dict) and c.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                            '{"name": ...}}')
        return fn["name"]


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None


def _unsupported(body: ChatRequest | CompletionRequest) -> None:
    if getattr(body, "suffix", None):
        raise UserError("suffix (fill-in-the-middle) is not supported")


def _usage(last: Event | None, prompt_tokens: int) -> dict[str, Any]:
    generated = last.generation_tokens if last else 0
    cached = last.cached_tokens if last else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(event: Event) -> str:
    return {"stop": "stop", "length": "length"}.get(event.finish_reason, "stop")


def _tool_call(call: ToolCall) -> dict[str, Any]:
    """A call as a message's ``tool_calls`` entry."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A streamed call's two ``tool_calls`` deltas: its id and name, then its arguments."""
    return [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
            {"index": index, "function": {"arguments": call.arguments}}]




def _token_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(tokenizer: Any, records: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{**_token_entry(tokenizer, r.token, r.logprob),
                         "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in r.top]} for r in records],
            "refusal": None}


def _completion_logprobs(tokenizer: Any, records: list[TokenLogprob], start: int) -> dict[str, Any]:
    tokens, offsets, at = [], [], start
    for r in records:
        text = tokenizer.decode([r.token])
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in r.top} for r in records], "text_offset": offsets}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@router.get("/v1/models")
async def list_models(request: HTTPRequest) -> dict[str, Any]:
    state: ServerState = request.app.state.server
    return {"object": "list", "data": [state.model_card(name) for name in state.model_ids()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: HTTPRequest) -> dict[str, Any]:
    state: ServerState = request.app.state.server
    if name not in state.model_ids():
        raise ApiError(f"the model {name!r} does not exist; this server serves {', '.join(state.model_ids())}", 404)
    return state.model_card(name)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    _unsupported(body)
    tokenizer = state.tokenizer()
    n_top = (body.top_logprobs or 0) if body.logprobs else None
    plan = plan_tools(tokenizer, body.tools, body.choice(), state.tool_parser)
    params = with_tool_grammar(body.params(n_top), plan)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    ids, ends = await run_in_threadpool(chat_prompt, tokenizer, messages, not state.trims, plan)
    params = dataclasses.replace(params, reasoning=prompt_reasoning(tokenizer, ids, state.reasoning_budget))
    req = Request(ids, params, ends, id=f"chatcmpl-{uuid.uuid4().hex}", adapter=state.adapter_for(body.model))
    created = int(time.time())
    head = {"id": req.id, "created": created, "model": state.model_name, "system_fingerprint": state.fingerprint}
    split = ReplySplitter(params.reasoning, plan.parser() if plan is not None else None)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(state, req, _chat_chunks(head, tokenizer, split), usage, len(ids), head,
                       "chat.completion.chunk")
    text, events = await state.complete(req, request)
    records = [r for e in events for r in (e.logprobs or [])]
    last = events[-1] if events else None
    thought, answer, calls = split.push(text, last=True)
    message: dict[str, Any] = {"role": "assistant", "content": answer or (None if calls else ""), "refusal": None}
    if split.thoughts is not None:
        message["reasoning_content"] = thought
    if calls:
        message["tool_calls"] = [_tool_call(c) for c in calls]
    choice = {"index": 0, "message": message,
              "logprobs": _chat_logprobs(tokenizer, records) if n_top is not None else None,
              "finish_reason": "tool_calls" if calls else _finish(last) if last else "length"}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(last, len(ids))}


def _chat_chunks(head: dict[str, Any], tokenizer: Any, split: ReplySplitter):
    """The chunks for each event: the opening one (``event`` None: the role), then its text and
    logprobs; a thought as ``reasoning_content``, calls as ``tool_calls`` deltas."""

    def chunk(delta: dict[str, Any], logprobs: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def chunks(event: Event | None) -> list[dict[str, Any]]:
        if event is None:
            return [chunk({"role": "assistant", "content": ""})]
        logprobs = _chat_logprobs(tokenizer, event.logprobs) if event.logprobs else None
        finish = _finish(event) if event.finish_reason else None
        if split.thoughts is None and split.tools is None:
            return [chunk({"content": event.text} if event.text else {}, logprobs, finish)]
        thought, text, calls = split.push(event.text, last=finish is not None)
        out = [chunk({"reasoning_content": thought})] if thought else []
        out += [chunk({"content": text}, logprobs)] if text or logprobs else []
        first = split.calls - len(calls)
        out += [chunk({"tool_calls": [d]}) for i, c in enumerate(calls) for d in _call_deltas(first + i, c)]
        if finish is not None:
            out.append(chunk({}, None, "tool_calls" if split.calls else finish))
        return out

    return chunks


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: HTTPRequest):
    state: ServerState = request.app.state.server
    _unsupported(body)
    tokenizer = state.tokenizer()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise UserError("prompt as a list of strings takes exactly one: this server returns one choice")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt or prompt == "":
        raise UserError("the prompt is empty")
    params = body.params(body.logprobs)
    ids = await run_in_threadpool(text_prompt, tokenizer, prompt)
    req = Request(ids, params, id=f"cmpl-{uuid.uuid4().hex}", adapter=state.adapter_for(body.model))
    head = {"id": req.id, "created": int(time.time()), "model": state.model_name, "system_fingerprint": state.fingerprint}
    echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if body.echo else ""
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        offset = [len(echo)]

        def chunk(event: Event | None) -> list[dict[str, Any]]:
            if event is None:
                if not echo:
                    return []
                text, logprobs, finish = echo, None, None
            else:
                text, finish = event.text, _finish(event) if event.finish_reason else None
                logprobs = _completion_logprobs(tokenizer, event.logprobs, offset[0]) if event.logprobs else None
                offset[0] += len(text)
            return [{**head, "object": "text_completion",
                     "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}]

        return _stream(state, req, chunk, usage, len(ids), head, "text_completion")
    text, events = await state.complete(req, request)
    records = [r for e in events for r in (e.logprobs or [])]
    last = events[-1] if events else None
    choice = {"index": 0, "text": echo + text,
              "logprobs": _completion_logprobs(tokenizer, records, len(echo)) if body.logprobs is not None else None,
              "finish_reason": _finish(last) if last else "length"}
    return {**head, "object": "text_completion", "choices": [choice], "usage": _usage(last, len(ids))}


def _stream(state: ServerState, req: Request, chunk, include_usage: bool, n_prompt: int,
            head: dict[str, Any], kind: str) -> StreamingResponse:
    """SSE: the opening chunks, the chunks of each event (``chunk`` gives a list for each), the usage chunk if asked, then ``[DONE]``. The
    request is admitted before the response starts, so a full queue or a bad prompt is still a
    plain HTTP error."""
    events = state.worker.open(req)  # the response watches for the client leaving

    async def body() -> AsyncIterator[str]:
        last = None
        for opening in chunk(None):
            yield _sse(opening)
        async for event in events:
            last = event
            if event.finish_reason == "error":
                yield _sse({"error": {"message": event.error or "generation failed", "type": "server_error",
                                      "param": None, "code": None}})
                return
            if event.text or event.logprobs or event.finish_reason:
                for piece in chunk(event):
                    yield _sse(piece)
        if include_usage:
            yield _sse({**head, "object": kind, "choices": [], "usage": _usage(last, n_prompt)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

