"""Tool calls: the streaming parser for each format, the format a template implies, calls forced by
grammar (valid under the function's schema on a real model), and tools and earlier calls rendered
through a chat template that knows them and through the fallback for one that does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.grammar import Constraint
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.engine.tool_calls import TOOL_FORMATS, ToolCallParser, call_grammar, check_tools, tool_format
from mlxllm.errors import UserError
from mlxllm.server.prompts import chat_prompt
from mlxllm.server.tools import plan_tools
from mlxllm.tokenize import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

HERMES = (Path(__file__).parent / "fixtures" / "hermes_tools.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}}}


def _parse(fmt: str, text: str, piecewise: bool) -> tuple[str, list[tuple[str, dict]]]:
    parser, out, calls = ToolCallParser(fmt), "", []
    for piece in (list(text) if piecewise else [text]):
        t, c = parser.push(piece)
        out, calls = out + t, calls + c
    t, c = parser.finish()
    return out + t, [(x.name, json.loads(x.arguments)) for x in calls + c]


@pytest.mark.parametrize("fmt, text, want_text, want_calls", [
    ("hermes", 'Let me look.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "Let me look.",
     [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": '
               '"{\\"b\\": 2}"}</tool_call>', "", [("f", {}), ("g", {"b": 2})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),  # EOS before the tag
    ("hermes", "a < b and <tool_call>{not json}</tool_call> ok <tool", "a < b and <tool_call>{not json}</tool_call> ok <tool",
     []),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
    ("llama3", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": "y"}}', "", [("f", {}), ("g", {"x": "y"})]),
    ("llama3", "The answer is {42}.", "The answer is {42}.", []),
    ("llama3", '<|python_tag|>brave_search.call(query="Menlo Park weather")', "", [("brave_search", {"query": "Menlo Park weather"})]),
    ("llama3", "<|python_tag|>os.system('rm -rf /')", "<|python_tag|>os.system('rm -rf /')", []),  # read, never run
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', "", [("f", {"a": 1})]),
    ("mistral", 'Checking.[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', "Checking.", [("f", {"a": 1}), ("g", {})]),
    ("json", '```json\n{"name": "f", "arguments": {"a": [1, 2]}}\n```', "", [("f", {"a": [1, 2]})]),
    ("json", '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]', "", [("f", {}), ("g", {})]),
    ("json", '{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON that is not a call stays text
    ("json", "Paris is the capital.", "Paris is the capital.", []),
])
def test_parser_separates_text_and_calls_whole_or_streamed(fmt, text, want_text, want_calls):
    assert _parse(fmt, text, piecewise=False) == (want_text, want_calls)
    assert _parse(fmt, text, piecewise=True) == (want_text, want_calls)


def test_text_streams_before_the_reply_is_over():
    parser = ToolCallParser("hermes")
    assert parser.push("Hello <tool") == ("Hello ", [])  # "<tool" may open a call: held
    assert parser.push("kit") == ("<toolkit", [])
    parser = ToolCallParser("json")
    assert parser.push("Sure, ") == ("Sure, ", [])


def test_format_from_template_and_bad_tools():
    assert tool_format(HERMES) == "hermes"
    assert tool_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tool_format("{{ '<|python_tag|>' }}") == "llama3"
    assert tool_format("{{ messages }}") == "json" and tool_format(None) == "json"
    assert set(TOOL_FORMATS) == {"hermes", "llama3", "mistral", "json"}
    with pytest.raises(UserError, match="name"):
        check_tools([{"type": "function", "function": {}}])
    with pytest.raises(UserError, match="not among"):
        call_grammar(check_tools([WEATHER]), "json", "nope")
    assert check_tools([{"name": "f", "input_schema": {"type": "object"}}])[0]["parameters"] == {"type": "object"}


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


def test_forced_calls_are_valid_in_every_format(smollm2, smol_tok):
    """A required call (any tool) and a named one, in each format, greedy and sampled on SmolLM2:
    every output parses as exactly one call whose arguments validate against that tool's schema."""
    tools = check_tools([WEATHER, TIME])
    schemas = {t["name"]: t["parameters"] for t in tools}
    prompt = smol_tok.apply_chat_template([{"role": "user", "content": "What time is it in Paris?"}], tokenize=True)
    engine, events, runs = BatchEngine(smollm2, smol_tok), {}, []
    for fmt in TOOL_FORMATS:
        for name in (None, "get_time"):
            for params in (SamplingParams(max_tokens=80), SamplingParams(max_tokens=80, temp=1.0, seed=5)):
                r = Request(prompt, SamplingParams(**{**params.__dict__, "grammar": call_grammar(tools, fmt, name)}))
                runs.append((fmt, name, r))
                engine.submit(r, lambda e: events.setdefault(e.request_id, []).append(e))
    while not engine.idle:
        engine.step()
    for fmt, name, r in runs:
        text = "".join(e.text for e in events[r.id])
        assert events[r.id][-1].finish_reason == "stop", text
        rest, calls = _parse(fmt, text, piecewise=True)
        assert rest == "" and len(calls) == 1, (fmt, text)
        called, args = calls[0]
        assert called == name or (name is None and called in schemas)
        jsonschema.validate(args, {**schemas[called], "additionalProperties": False})


def test_tools_and_earlier_calls_go_through_a_template_that_knows_them(smollm2_path):
    smol_tok = Tokenizer.from_gguf(smollm2_path)
    smol_tok.set_chat_template(HERMES, "hermes_tools.jinja")
    plan = plan_tools(smol_tok, [WEATHER], "auto", None)
    assert plan.native and plan.fmt == "hermes"
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'}]
    ids, _ = chat_prompt(smol_tok, messages, False, plan)
    text = smol_tok.decode(ids)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tool, in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"celsius": 18}\n</tool_response>' in text
    none, _ = chat_prompt(smol_tok, messages[:1], False, plan_tools(smol_tok, [WEATHER], "none", None))
    assert "Tools you may call" not in smol_tok.decode(none)


def test_a_template_without_tools_gets_them_in_the_system_prompt(smol_tok):
    plan = plan_tools(smol_tok, [WEATHER], "required", None)
    assert not plan.native and plan.fmt == "json"
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    text = smol_tok.decode(chat_prompt(smol_tok, messages, False, plan)[0])
    assert "You can call these tools" in text and '"get_weather"' in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "Result of the tool call call_1: 18 C" in text


def test_a_control_token_marker_opens_the_forced_call(smol_tok):
    """Where the format's marker is one control token (Mistral's ``[TOOL_CALLS]``), the forced call
    starts with that id, not with its spelling in text (``<|im_start|>``, id 1, stands in for it)."""
    grammar = call_grammar(check_tools([WEATHER]), "mistral", marker_id=1)
    assert Constraint(grammar, smol_tok).allowed().nonzero()[0].tolist() == [1]
