"""Tool calling through the live server with the official clients: an agent loop (a forced call, its
result sent back, the final answer) in both APIs, streamed calls as proper deltas, and a model whose
chat template knows tools (Hermes style) answering in its own call format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ServerProcess

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def oai(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key=smollm2_server.key, max_retries=0, timeout=120)


def _valid(arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, {**WEATHER["function"]["parameters"], "additionalProperties": False})
    return args


def test_openai_agent_loop(oai):
    """Forced call -> the tool's result back through the template -> a plain answer; the same call
    streamed arrives as tool_calls deltas (name, then arguments), never as text."""
    first = oai.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        max_tokens=60, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert _valid(call.function.arguments)["city"]
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18, "sky": "clear"})}]
    final = oai.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], tool_choice="none",
                                        max_tokens=30, **GREEDY)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")

    chunks = [c for c in oai.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=60,
                                                     tool_choice="required", stream=True, **GREEDY) if c.choices]
    assert not any(c.choices[0].delta.content for c in chunks)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == "" and all(d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert {d.index for d in deltas} == {0} and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_and_parse_helpers(oai):
    named = oai.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=60, **GREEDY,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    auto = oai.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=20, **GREEDY)
    message = auto.choices[0].message  # the model may answer or call; either way nothing malformed
    assert message.content or message.tool_calls
    if message.tool_calls:
        _valid(message.tool_calls[0].function.arguments)
    else:
        assert "<tool_call>" not in message.content


def test_anthropic_agent_loop(smollm2_server):
    claude = anthropic.Anthropic(base_url=smollm2_server.url, api_key=smollm2_server.key, max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": WEATHER["function"]["description"],
            "input_schema": WEATHER["function"]["parameters"]}
    first = claude.messages.create(model="smollm2", max_tokens=60, messages=ASK, tools=[tool],
                                   tool_choice={"type": "any"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and _valid(use.input)["city"]
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, clear"}]}]
    final = claude.messages.create(model="smollm2", max_tokens=30, messages=history, tools=[tool],
                                   tool_choice={"type": "none"}, extra_body=GREEDY)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"
    count = claude.messages.count_tokens(model="smollm2", messages=history, tools=[tool])
    assert count.input_tokens > 0

    with claude.messages.stream(model="smollm2", max_tokens=60, messages=ASK, tools=[tool],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        events = list(stream)
        message = stream.get_final_message()
    kinds = [e.type for e in events]
    assert "input_json" in kinds and "text" not in kinds
    (streamed,) = [b for b in message.content if b.type == "tool_use"]
    assert streamed.input == use.input and message.stop_reason == "tool_use"


@pytest.fixture(scope="module")
def hermes_server(tiny_chat_dir):
    template = Path(__file__).parent / "fixtures" / "hermes_tools.jinja"
    server = ServerProcess("-m", str(tiny_chat_dir), "--chat-template", str(template))
    yield server
    server.stop()


def test_a_template_with_tools_gets_its_own_call_format(hermes_server):
    """The tiny random model has a Hermes-style template: the forced call is written in <tool_call>
    tags (the grammar for that format), parsed out of the text, and returned as a call."""
    client = openai.OpenAI(base_url=hermes_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=80, logprobs=True, **GREEDY)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    args = _valid(r.choices[0].message.tool_calls[0].function.arguments)
    raw = "".join(t.token for t in r.choices[0].logprobs.content)  # what the model wrote, token by token
    assert raw == f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>'
