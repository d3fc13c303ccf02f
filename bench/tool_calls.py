"""Tool-call success on a fixed set of prompts, through the server's own path without HTTP (chat
template or fallback, grammar for forced calls, the call parser) on the bundled models.

For each of 16 requests that each call for one of three tools, with ``tool_choice`` "auto" and
"required", all in one batch, greedy: how many replies are a valid call (parsed, and arguments valid
under the tool's schema), how many call the right tool, how many answer in text instead, and how
many were cut off by ``--max-tokens`` (a forced call is valid by construction unless it is cut off).

    .venv/bin/python bench/tool_calls.py --out bench/results/tool_calls.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)

import jsonschema

from mlxllm import backend
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load
from mlxllm.server.prompts import chat_prompt
from mlxllm.server.replies import ReplySplitter
from mlxllm.server.tools import plan_tools, with_tool_grammar

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money",
     "parameters": {"type": "object", "required": ["amount", "from", "to"], "properties": {
         "amount": {"type": "number", "minimum": 0}, "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
         "to": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}},
    {"type": "function", "function": {"name": "search_web", "description": "Search the web for a query",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 80}}, "required": ["query"]}}},
]
ASKS = [
    ("What is the weather in Paris right now?", "get_weather"), ("Is it raining in London?", "get_weather"),
    ("How hot is it in Cairo today?", "get_weather"), ("Weather forecast for Tokyo please.", "get_weather"),
    ("Will I need an umbrella in Seattle?", "get_weather"), ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many yen is 50 euros?", "convert_currency"), ("What is 20 GBP in USD?", "convert_currency"),
    ("Change 1000 Swiss francs into dollars.", "convert_currency"), ("How much is 5 euros in pounds?", "convert_currency"),
    ("Search the web for the tallest building in the world.", "search_web"),
    ("Find recent news about Mars rovers.", "search_web"), ("Look up who wrote War and Peace.", "search_web"),
    ("Search for a recipe for pancakes.", "search_web"), ("Find the population of Brazil online.", "search_web"),
    ("What is the temperature in Berlin?", "get_weather"),
]


def run(model_path: str | None, max_tokens: int) -> dict:
    model, tokenizer = load(model_path, compute="float32")
    schemas = {t["function"]["name"]: {**t["function"]["parameters"], "additionalProperties": False} for t in TOOLS}
    engine, events, runs = BatchEngine(model, tokenizer, max_batch=2 * len(ASKS)), {}, []
    for choice in ("auto", "required"):
        plan = plan_tools(tokenizer, TOOLS, choice, None)
        for ask, want in ASKS:
            ids, _ = chat_prompt(tokenizer, [{"role": "user", "content": ask}], False, plan)
            r = Request(ids, with_tool_grammar(SamplingParams(max_tokens=max_tokens), plan))
            runs.append((choice, want, plan, r))
            engine.submit(r, lambda e: events.setdefault(e.request_id, []).append(e))
    while not engine.idle:
        engine.step()
    out: dict = {}
    for choice, want, plan, r in runs:
        text = "".join(e.text for e in events[r.id])
        _, answer, calls = ReplySplitter(None, plan.parser()).push(text, last=True)
        valid = len(calls) == 1 and calls[0].name in schemas
        if valid:
            try:
                jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])
            except jsonschema.ValidationError:
                valid = False
        row = out.setdefault(choice, {"requests": 0, "valid_call": 0, "right_tool": 0, "text_answer": 0,
                                      "cut_by_max_tokens": 0})
        row["requests"] += 1
        row["cut_by_max_tokens"] += events[r.id][-1].finish_reason == "length"
        row["valid_call"] += valid
        row["right_tool"] += valid and calls[0].name == want
        row["text_answer"] += not calls and bool(answer.strip())
    return {"format": plan.fmt, "native_template": plan.native, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2",
                   help="comma-separated chat models: smollm2 (bundled) or paths (Gemma 3 270M's GGUF has no chat template)")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = {"benchmark": "tool_calls", "machine": backend.describe(), "prompts": len(ASKS), "results": {}}
    for name in args.models.split(","):
        report["results"][name] = run(None if name == "smollm2" else name, args.max_tokens)
        print(name, json.dumps(report["results"][name]), flush=True)
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
