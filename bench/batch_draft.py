"""Speculative decoding inside the batch, in-process: greedy decode speed with and without a draft at
1 and 4 concurrent requests.

The target is a speed-bound stand-in for a bigger model with SmolLM2's tokenizer: SmolLM2 with
``--extra-blocks`` zero-output blocks (``speculative_smollm2.padded_target``: SmolLM2's function at
several times its cost). Two drafts: SmolLM2 itself, which computes the target's function, so every
drafted token is kept (the ceiling at this cost ratio); and SmolLM2 without ``--drop`` of its middle
blocks, a draft that differs from the target, kept as often as it happens to agree. Prompts are
read before the timing. Configurations alternate; medians of ``--reps``.

    .venv/bin/python bench/batch_draft.py --out bench/results/batch_draft.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)

from batch_scaling import prompts
from mlxllm import backend
from mlxllm.engine.batch_draft import BatchDraft
from mlxllm.engine.batching import BatchEngine
from mlxllm.engine.requests import Request, SamplingParams
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load
from mlxllm.train.students import prune_layers
from speculative_smollm2 import padded_target


def decode_tok_s(engine: BatchEngine, tokenizer, rows: int, tokens: int) -> float:
    """Generated tokens per second once every row's prompt is in."""
    requests = [Request(p, SamplingParams(max_tokens=tokens, ignore_eos=True)) for p in prompts(tokenizer, rows)]
    counts = {r.id: 0 for r in requests}

    def count(event) -> None:
        counts[event.request_id] += len(event.tokens)

    for r in requests:
        engine.submit(r, count)
    while engine.running < rows:
        engine.step()
    start, before = time.perf_counter(), sum(counts.values())
    while not engine.idle:
        engine.step()
    return (sum(counts.values()) - before) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra-blocks", type=int, default=60)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--drop", type=int, default=4, help="middle blocks the second draft leaves out")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    target = padded_target(args.extra_blocks)
    same, tokenizer = load(None, compute="float32")
    pruned, _ = load(None, compute="float32")
    n = len(pruned.layers)
    middle = set(range((n - args.drop) // 2, (n + args.drop) // 2))
    prune_layers(pruned, [i for i in range(n) if i not in middle])
    draft_models = {"plain": None, "same": same, "pruned": pruned}
    samples: dict[str, list[float]] = {}
    kept: dict[str, list[int]] = {}
    for rep in range(args.reps):
        for rows in (1, 4):
            for kind, model in draft_models.items():
                draft = BatchDraft(target, model, args.draft_tokens) if model is not None else None
                engine = BatchEngine(target, tokenizer, max_batch=rows, draft=draft)
                samples.setdefault(f"{rows} {kind}", []).append(decode_tok_s(engine, tokenizer, rows, args.tokens))
                if draft is not None:
                    counts = kept.setdefault(f"{rows} {kind}", [0, 0])
                    counts[0], counts[1] = counts[0] + draft.accepted, counts[1] + draft.proposed
        print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in samples.items()), flush=True)
    tok_s = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    report = {"benchmark": "batch_draft", "machine": backend.describe(),
              "target": f"SmolLM2-135M + {args.extra_blocks} zero-output blocks (float32)",
              "drafts": {"same": "SmolLM2-135M (float32): the target's function, so every drafted token is kept",
                         "pruned": f"SmolLM2-135M without {args.drop} middle blocks ({n - args.drop} of {n})"},
              "draft_tokens": args.draft_tokens, "tokens": args.tokens, "reps": args.reps, "tok_s": tok_s,
              "speedup": {k: round(v / tok_s[f"{k.split()[0]} plain"], 2) for k, v in tok_s.items() if "plain" not in k},
              "acceptance": {k: round(a / p, 3) if p else None for k, (a, p) in kept.items()},
              "samples_tok_s": samples}
    print(json.dumps({k: report[k] for k in ("tok_s", "speedup", "acceptance")}))
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
