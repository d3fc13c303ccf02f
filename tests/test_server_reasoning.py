"""Reasoning models through the server: a tiny random model whose template opens a thought
(``<think>``, as DeepSeek-R1's does) has its thought split from its answer in both APIs, whole and
streamed, and ``--reasoning-budget`` / Anthropic's ``budget_tokens`` close the thought after exactly
that many tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ServerProcess
from mlxllm.engine.reasoning import ReasoningParser, ThinkingBudget, Reasoning

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
BUDGET = 5


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    template = Path(__file__).parent / "fixtures" / "think.jinja"
    s = ServerProcess("-m", str(tiny_chat_dir), "--chat-template", str(template), "--reasoning-budget", str(BUDGET))
    yield s
    s.stop()


def test_parser_and_budget_units():
    parser, parts = ReasoningParser(inside=False), []
    for ch in "<think>\nhmm</think>\n\nFour.":
        parts.append(parser.push(ch))
    parts.append(parser.finish())
    assert "".join(t for t, _ in parts) == "\nhmm" and "".join(a for _, a in parts) == "Four."
    budget = ThinkingBudget(Reasoning((7,), (8, 9), open=True, budget=2))
    assert budget.forced() is None
    budget.push(100)
    budget.push(101)
    assert budget.forced() == 8
    budget.push(8)
    assert budget.forced() == 9
    budget.push(9)
    assert budget.forced() is None and not budget.inside
    budget.push(7)  # a new thought gets its own budget
    assert budget.inside and budget.forced() is None
    assert ThinkingBudget(Reasoning((7,), (8,), open=True, budget=0)).forced() == 8


def test_openai_reasoning_content_and_budget(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0, logprobs=True)
    message = r.choices[0].message
    tokens = [t.token for t in r.choices[0].logprobs.content]
    closing = "".join(tokens[BUDGET:]).index("</think>")
    assert closing == 0  # the thought was closed right after BUDGET tokens
    assert message.reasoning_content == "".join(tokens[:BUDGET])
    assert "</think>" not in message.content and "<think>" not in message.content
    chunks = [c for c in client.chat.completions.create(model="tiny", messages=ASK, max_tokens=20, temperature=0,
                                                        stream=True) if c.choices]
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (thought, answer) == (message.reasoning_content, message.content)


def test_anthropic_thinking_blocks(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    short = claude.messages.create(model="tiny", max_tokens=20, messages=ASK, extra_body={"temperature": 0},
                                   thinking={"type": "enabled", "budget_tokens": 2})
    assert [b.type for b in short.content] == ["thinking", "text"]
    default = claude.messages.create(model="tiny", max_tokens=20, messages=ASK, extra_body={"temperature": 0})
    assert default.content[0].thinking.startswith(short.content[0].thinking)
    assert len(default.content[0].thinking) > len(short.content[0].thinking)  # BUDGET = 5 tokens, not 2
    again = claude.messages.create(model="tiny", max_tokens=5, extra_body={"temperature": 0}, messages=ASK + [
        {"role": "assistant", "content": [b.model_dump() for b in short.content]}, {"role": "user", "content": "And 3 + 3?"}])
    assert again.content[-1].type == "text"  # a turn with its thinking block goes back in as history
    off = claude.messages.create(model="tiny", max_tokens=20, messages=ASK, extra_body={"temperature": 0},
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]
    with claude.messages.stream(model="tiny", max_tokens=20, messages=ASK, extra_body={"temperature": 0},
                                thinking={"type": "enabled", "budget_tokens": 2}) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == \
        [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in short.content]


def test_harmony_channels_split_and_the_budget_closes_the_analysis(smollm2_path):
    """gpt-oss's harmony format: the analysis channel is the thought and the final channel the answer;
    a budget forces the end of the analysis message and the final channel's header, token by token."""
    from mlxllm.engine.reasoning import HARMONY, reasoning_for
    from mlxllm.server.replies import ReplySplitter
    from mlxllm.tokenize import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_path)
    tok.set_chat_template((Path(__file__).parent / "fixtures" / "harmony.jinja").read_text(), "harmony.jinja")
    prompt = tok.apply_chat_template(ASK, add_generation_prompt=True)
    spec = reasoning_for(tok, prompt, budget=3)
    assert (spec.start, spec.end, spec.open) == (*HARMONY, True)
    budget, forced = ThinkingBudget(spec), []
    for token in tok.encode(" two plus two", add_special_tokens=False)[:3]:
        budget.push(token)
    while budget.forced() is not None:
        forced.append(budget.forced())
        budget.push(forced[-1])
    assert tok.decode(forced) == HARMONY[1] and not budget.inside
    reply = " two plus two<|end|><|start|>assistant<|channel|>final<|message|>Four."
    splitter, parts = ReplySplitter(spec, None), []
    for i in range(0, len(reply), 3):
        parts.append(splitter.push(reply[i:i + 3], last=i + 3 >= len(reply)))
    assert "".join(p[0] for p in parts) == " two plus two" and "".join(p[1] for p in parts) == "Four."
    from mlxllm.errors import UserError
    from mlxllm.server.tools import plan_tools

    tools = [{"name": "f", "parameters": {"type": "object"}}]
    assert plan_tools(tok, tools, "auto", None) is not None
    with pytest.raises(UserError, match="harmony-format"):
        plan_tools(tok, tools, "required", None)
    think = Tokenizer.from_gguf(smollm2_path)
    think.set_chat_template((Path(__file__).parent / "fixtures" / "think.jinja").read_text(), "think.jinja")
    assert reasoning_for(think, "x", None).end == "</think>"


def test_harmony_channels_carry_thought_answer_and_calls():
    """A harmony reply streamed in small pieces: the analysis channel is the thought, a commentary
    message to a function is a call (whose arguments must be a JSON object, else it is text), the final
    channel the answer; a reply with no header is text as written."""
    from mlxllm.engine.harmony import HarmonyParser
    from mlxllm.engine.reasoning import HARMONY
    from mlxllm.engine.tool_calls import ToolCallParser
    from mlxllm.server.replies import ReplySplitter

    def run(reply: str, inside: bool, tools: bool = True) -> tuple[str, str, list]:
        split = ReplySplitter(Reasoning((1,), (2,), inside, None, *HARMONY), ToolCallParser("json") if tools else None)
        parts = [split.push(reply[i:i + 3], last=i + 3 >= len(reply)) for i in range(0, len(reply), 3)]
        return "".join(p[0] for p in parts), "".join(p[1] for p in parts), [c for p in parts for c in p[2]]

    call = ("need the weather<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
            '<|constrain|>json<|message|>{"city": "Paris"}')  # generation stops at <|call|>
    thought, answer, calls = run(call, inside=True)
    assert (thought, answer) == ("need the weather", "")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert run(call, inside=True, tools=False)[1:] == ('{"city": "Paris"}', [])  # no tools asked: text
    thought, answer, calls = run("<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>final"
                                 "<|message|>It is sunny.<|return|>", inside=False)
    assert (thought, answer, calls) == ("hmm", "It is sunny.", [])
    _, answer, calls = run('x<|end|><|start|>assistant<|channel|>commentary to=functions.f<|message|>not json',
                           inside=True)
    assert (answer, calls) == ("not json", [])
    assert run("plain text", inside=False) == ("", "plain text", [])
    parser = HarmonyParser(inside=True)
    parser.push("a<|en")
    assert parser.push("d|>")[0] == "" and parser.finish() == ("", "", [])
