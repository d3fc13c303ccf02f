"""What constrained decoding costs: decode speed with and without a JSON schema, one sequence
(``generate_step``, the mask computed while the device runs the step) and 16 rows in one
``BatchEngine`` batch (every row constrained), plus the grammar engine's own time per mask.

The schema (a list of at least 60 small objects) cannot end within the timed steps, so every timed
token is a constrained one. Free and constrained runs are alternated over ``--reps`` rounds and the
medians reported.

    .venv/bin/python bench/grammar_cost.py --out bench/results/grammar_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)

from batch_scaling import alternated, batch_step_s, prompts, single_step_s
from mlxllm import backend
from mlxllm.engine.grammar import Constraint, Grammar
from mlxllm.engine.stream import stream_generate
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load

SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False, "properties": {"items": {
    "type": "array", "minItems": 60, "items": {
        "type": "object", "required": ["name", "qty"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99}}}}}}


def mask_ms(model, tokenizer, n: int) -> float:
    """Median milliseconds of one mask (``Constraint.allowed``) along a real constrained output."""
    grammar = Grammar.json_schema(SCHEMA)
    ids = [r.token for r in stream_generate(model, tokenizer, prompts(tokenizer, 1)[0], n, grammar=grammar)]
    walk, times = Constraint(grammar, tokenizer, model.config.vocab_size), []
    for t in ids:
        start = time.perf_counter()
        walk.allowed()
        times.append(time.perf_counter() - start)
        walk.consume(t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per configuration and round")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tokenizer = load(args.model, compute="float32")
    grammar = Grammar.json_schema(SCHEMA)
    runs = {
        "1 free": lambda: single_step_s(model, tokenizer, args.steps),
        "1 schema": lambda: single_step_s(model, tokenizer, args.steps,
                                          Constraint(grammar, tokenizer, model.config.vocab_size)),
        f"{args.rows} free": lambda: batch_step_s(model, tokenizer, args.rows, args.steps) / args.rows,
        f"{args.rows} schema": lambda: batch_step_s(model, tokenizer, args.rows, args.steps, grammar) / args.rows,
    }
    samples = alternated(runs, args.reps, lambda s: f"{1 / s:.1f} tok/s")
    tok_s = {k: round(1 / statistics.median(v), 1) for k, v in samples.items()}
    report = {"benchmark": "grammar_cost", "model": args.model or "SmolLM2-135M-Instruct.Q4_1.gguf (float32)",
              "machine": backend.describe(), "grammar_engine": "llguidance", "steps": args.steps, "reps": args.reps,
              "tok_s": tok_s, "schema_over_free": {
                  str(r): round(tok_s[f"{r} schema"] / tok_s[f"{r} free"], 3) for r in (1, args.rows)},
              "mask_ms_median": round(mask_ms(model, tokenizer, 80), 3), "samples_s_per_token": samples}
    print(json.dumps({k: report[k] for k in ("tok_s", "schema_over_free", "mask_ms_median")}))
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
