"""Constrained decoding: grammars compiled by llguidance against mlxllm's own tokenizers (byte-level
BPE and SentencePiece), masks that keep control tokens out of constrained text, the Python, CLI and
batched entry points, and 34 JSON schemas whose outputs must all validate, greedy and sampled."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxllm import Grammar, stream_generate
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.grammar import Constraint, GrammarError
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.tokenize import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = json.loads((Path(__file__).parent / "fixtures" / "json_schemas.json").read_text())


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def gemma_tok(gemma3_path):
    return Tokenizer.from_gguf(gemma3_path)


def _validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("grammar, says", [
    (lambda: Grammar.json_schema('{"type": "object",'), "not valid JSON"),
    (lambda: Grammar.json_schema({"type": "integer", "minimum": 5, "maximum": 3}), "minimum (5) is greater than maximum (3)"),
    (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (lambda: Grammar.json_schema([1, 2]), "must be a JSON object"),
    (lambda: Grammar.regex("(("), "unclosed group"),
    (lambda: Grammar.cfg('start: "a" missing_rule'), "missing_rule"),
    (lambda: Grammar("xml", "<a/>"), "unknown grammar kind"),
])
def test_bad_grammars_are_refused_in_one_line(grammar, says):
    with pytest.raises(GrammarError) as e:
        grammar().definition()
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("which, marker", [("smol_tok", "<|im_end|>"), ("gemma_tok", "<end_of_turn>")])
def test_control_tokens_never_appear_inside_constrained_text(request, which, marker):
    """A regex that spells a turn marker's text allows only ordinary tokens for it, never the marker's
    own id; free text allows no control id but the end-of-sequence ids, and those only where the
    grammar may end."""
    tok = request.getfixturevalue(which)
    control = tok.control_token_ids
    marker_id = tok.encode(marker, add_special_tokens=False)
    assert len(marker_id) == 1 and marker_id[0] in control
    spelled = Constraint(Grammar.regex(re.escape(marker)), tok)
    allowed = set(spelled.allowed().nonzero()[0].tolist())
    assert allowed and not allowed & control
    plain = tok.encode(marker, add_special_tokens=False, split_special_tokens=True)
    assert plain[0] in allowed
    for t in plain:
        spelled.consume(t)
    assert spelled.complete

    free = Constraint(Grammar.regex("[a-z ]{0,20}"), tok).allowed()
    assert set(free.nonzero()[0].tolist()) & control == tok.eos_token_ids & control
    word = Constraint(Grammar.regex("abc"), tok)
    assert not set(word.allowed().nonzero()[0].tolist()) & tok.eos_token_ids  # cannot end before "abc"


def test_stream_generate_follows_the_grammar_and_the_batch_agrees(smollm2, smol_tok):
    """Greedy constrained generation in Python (twice: a fresh grammar state each call) gives the same
    text as the same requests in one batch with a free request, which itself is undisturbed."""
    model, tok = smollm2, smol_tok
    schema = SCHEMAS[0]["schema"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}], tokenize=True)
    grammars = [Grammar.json_schema(schema), Grammar.regex("(yes|no)\\."), Grammar.cfg('root ::= "A" | "B" "!"')]
    alone = []
    for g in grammars:
        runs = ["".join(r.text for r in stream_generate(model, tok, prompt, 60, grammar=g)) for _ in range(2)]
        assert runs[0] == runs[1]
        alone.append(runs[0])
    _validate(alone[0], schema)
    assert re.fullmatch(r"(yes|no)\.", alone[1]) and alone[2] in ("A", "B!")
    free_alone = "".join(r.text for r in stream_generate(model, tok, prompt, 20))

    events: dict = {}
    engine = BatchEngine(model, tok)
    requests = [Request(prompt, SamplingParams(max_tokens=60, grammar=g)) for g in grammars]
    requests.append(Request(prompt, SamplingParams(max_tokens=20)))
    for r in requests:
        engine.submit(r, lambda e: events.setdefault(e.request_id, []).append(e))
    while not engine.idle:
        engine.step()
    texts = ["".join(e.text for e in events[r.id]) for r in requests]
    assert texts == alone + [free_alone]
    assert all(events[r.id][-1].finish_reason == "stop" for r in requests[:3])


def test_every_schema_validates_greedy_and_sampled(smollm2, smol_tok):
    """The acceptance corpus (nested objects, bounded arrays, enums, ranges, optional fields, string
    formats and patterns), 34 schemas x greedy and sampled, all in one batch: every output parses and
    validates."""
    model, tok = smollm2, smol_tok
    assert len(SCHEMAS) >= 30
    engine = BatchEngine(model, tok, max_batch=len(SCHEMAS) * 2)
    events: dict = {}
    requests = []
    for i, case in enumerate(SCHEMAS):
        ask = f"{case['task']} Answer with JSON matching this schema: {json.dumps(case['schema'])}"
        prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=True)
        grammar = Grammar.json_schema(case["schema"])
        for params in (SamplingParams(max_tokens=200, grammar=grammar),
                       SamplingParams(max_tokens=200, temp=1.0, seed=i, grammar=grammar)):
            requests.append((case["schema"], Request(prompt, params)))
            engine.submit(requests[-1][1], lambda e: events.setdefault(e.request_id, []).append(e))
    while not engine.idle:
        engine.step()
    for schema, r in requests:
        text = "".join(e.text for e in events[r.id])
        assert events[r.id][-1].finish_reason == "stop", (schema, text)
        _validate(text, schema)


def test_an_unsatisfiable_schema_is_refused_at_submit(smollm2, smol_tok):
    engine = BatchEngine(smollm2, smol_tok)
    bad = Grammar.json_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 2, "maximum": 1}},
                               "required": ["n"]})
    with pytest.raises(GrammarError, match="unsatisfiable"):
        engine.submit(Request([1, 2, 3], SamplingParams(grammar=bad)), lambda e: None)
    assert engine.idle


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxllm", "generate", *args], capture_output=True, text=True, timeout=300)


def test_generate_cli_grammar_flags(smollm2_path, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
                                  "required": ["city"]}))
    out = _cli("-m", str(smollm2_path), "-p", "What is the capital of France?", "--json-schema", str(schema))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["city"] in ("Paris", "Lyon")
    out = _cli("-m", str(smollm2_path), "-p", "Is the sky blue?", "--regex", "(Yes|No)\\.", "--json")
    assert out.returncode == 0 and re.fullmatch(r"(Yes|No)\.", json.loads(out.stdout)["text"])
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    out = _cli("-m", str(smollm2_path), "-p", "Is water wet?", "--grammar", str(gbnf))
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no")


@pytest.mark.parametrize("args, says", [
    (["--json-schema", "/nonexistent/schema.json"], "cannot read"),
    (["--regex", "(("], "unclosed group"),
    (["--regex", "a", "--grammar", "g.lark"], "at most one"),
])
def test_generate_cli_refuses_bad_grammars_before_loading(tmp_path, args, says):
    out = _cli("-m", str(tmp_path / "no-such-model"), *args)  # the grammar is checked first
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: ") and says in out.stderr and out.stderr.count("\n") == 1
