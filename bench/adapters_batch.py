"""Several LoRA adapters in one batch against the same requests served one adapter after another,
in-process on SmolLM2-135M (float32): 8 requests, 4 per adapter (two random rank-8 adapters on q, v,
o and down of every layer), 48 greedy tokens each; and the same 8 requests on the base model alone,
for the cost of the adapters themselves. Rounds alternate; medians of ``--reps``.

    .venv/bin/python bench/adapters_batch.py --out bench/results/adapters_batch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from batch_scaling import alternated, prompts
from mlxllm import backend
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load
from mlxllm.model.adapters import (LoRALinear, adapter_config, apply_adapters, load_adapter_set, save_adapters,
                                   target_keys)


def make_adapter(folder: Path, seed: int) -> Path:
    model, _ = load(None, compute="float32")
    layers = len(model.layers)
    keys = target_keys(model, ["q", "v", "o", "down"], layers)
    apply_adapters(model, layers, keys, 8, 2.0)
    for i, (_, m) in enumerate(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(seed * 1000 + i)) * 0.01
    save_adapters(model, folder, adapter_config(layers, keys, 8, 2.0, 0.0, False))
    return folder


def timed(engine: BatchEngine, groups: list[list[Request]]) -> float:
    """Seconds to run each group of requests to the end, one group after another."""
    start = time.perf_counter()
    for group in groups:
        for r in group:
            engine.submit(r, lambda e: None)
        while not engine.idle:
            engine.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = [make_adapter(Path(tmp) / f"a{k}", k) for k in (1, 2)]
        model, tokenizer = load(None, compute="float32")
        served = load_adapter_set(model, [("a1", folders[0]), ("a2", folders[1])])
    engine = BatchEngine(model, tokenizer, max_batch=8, adapters=served)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    texts = prompts(tokenizer, 8)

    def requests(adapters: list[int]) -> list[Request]:
        return [Request(t, params, adapter=a) for t, a in zip(texts, adapters)]

    runs = {
        "one batch, two adapters": lambda: timed(engine, [requests([1, 2] * 4)]),
        "one adapter after the other": lambda: timed(engine, [requests([1] * 4), requests([2] * 4)]),
        "base model, one batch": lambda: timed(engine, [requests([0] * 8)]),
    }
    timed(engine, [requests([1, 2] * 4)])  # warm-up
    samples = alternated(runs, args.reps, lambda s: f"{8 * args.tokens / s:.1f} tok/s")
    tok_s = {k: round(8 * args.tokens / statistics.median(v), 1) for k, v in samples.items()}
    report = {"benchmark": "adapters_batch", "model": "SmolLM2-135M-Instruct.Q4_1.gguf (float32)",
              "machine": backend.describe(), "requests": 8, "tokens": args.tokens, "reps": args.reps,
              "adapters": "2 x rank 8 on q, v, o, down (all layers)", "tok_s": tok_s, "samples_s": samples}
    print(json.dumps(tok_s))
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
