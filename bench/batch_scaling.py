"""Continuous batching in-process: how long one ``BatchEngine`` decode step takes with 1 to 32 rows,
against single-sequence decode (``generate_step``) on the same model in the same process.

Every row decodes greedily with ``ignore_eos`` (no row leaves during the timing); prompts are short and
distinct and are read before the timed steps. Configurations are alternated over ``--reps`` rounds and
the medians reported, so a slow spell of the machine hits all of them alike.

    .venv/bin/python bench/batch_scaling.py --out bench/results/batch_scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlxllm import backend
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.engine.steps import generate_step
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load


def prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` distinct ~24-token prompts."""
    return [tokenizer.encode(f"Request {i}: write a few sentences about the number {i * 7 + 3} and why it is interesting.")
            for i in range(n)]


def batch_step_s(model, tokenizer, rows: int, steps: int, grammar=None) -> float:
    """Median seconds of one decode step with ``rows`` rows running (each constrained by ``grammar``,
    which must not end within the timed steps)."""
    engine = BatchEngine(model, tokenizer, max_batch=rows, max_step_tokens=4096)
    params = SamplingParams(max_tokens=steps + 64, ignore_eos=True, grammar=grammar)
    requests = [Request(p, params) for p in prompts(tokenizer, rows)]
    for r in requests:
        engine.submit(r, lambda event: None)
    while engine.running < rows:  # read every prompt, then two untimed steps
        engine.step()
    engine.step()
    engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    for r in requests:
        engine.cancel(r.id)
    engine.step()
    return statistics.median(times)


def single_step_s(model, tokenizer, steps: int, constraint=None) -> float:
    """Median seconds per token of ``generate_step`` (the pipelined single-sequence loop)."""
    prompt = mx.array(prompts(tokenizer, 1)[0], dtype=mx.int32)
    times, last = [], None
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=steps + 3, constraint=constraint)):
        now = time.perf_counter()
        if i >= 3:
            times.append(now - last)
        last = now
    return statistics.median(times)


def alternated(runs: dict[str, Callable[[], float]], reps: int, show: Callable[[float], str]) -> dict[str, list[float]]:
    """Each of ``runs`` once per round for ``reps`` rounds (so a slow spell hits all alike); the samples
    by name, each round printed with ``show``."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            samples[name].append(run())
        print(f"round {rep + 1}/{reps}: " + ", ".join(f"{k} {show(v[-1])}" for k, v in samples.items()), flush=True)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--rows", default="1,2,4,8,16,32")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration and round")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tokenizer = load(args.model, compute="float32")
    rows = [int(r) for r in args.rows.split(",")]
    runs = {"single": lambda: single_step_s(model, tokenizer, args.steps),
            **{str(r): lambda r=r: batch_step_s(model, tokenizer, r, args.steps) for r in rows}}
    samples = alternated(runs, args.reps, lambda s: f"{s * 1e3:.0f} ms")
    single = statistics.median(samples["single"])
    table = []
    for r in rows:
        step = statistics.median(samples[str(r)])
        table.append({"rows": r, "ms_per_step": round(step * 1e3, 1), "tok_s": round(r / step, 1),
                      "x_single": round(r / step * single, 2)})
    report = {"benchmark": "batch_scaling", "model": args.model or "SmolLM2-135M-Instruct.Q4_1.gguf (float32)",
              "machine": backend.describe(),
              "steps": args.steps, "reps": args.reps, "single_ms_per_token": round(single * 1e3, 1),
              "single_tok_s": round(1 / single, 1), "table": table, "samples_s": samples}
    print(f"single sequence: {single * 1e3:.1f} ms/token ({1 / single:.1f} tok/s)")
    for row in table:
        print(f"{row['rows']:>3} rows: {row['ms_per_step']:7.1f} ms/step {row['tok_s']:7.1f} tok/s "
              f"({row['x_single']:.2f}x single)")
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
