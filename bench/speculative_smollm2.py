"""Speculative decoding with the distilled SmolLM2 student (bench/distill_smollm2.py) as the draft:
acceptance rate and decode speed against plain decoding, greedy, alternated prompt by prompt.

Targets: SmolLM2-135M-Instruct itself, and a speed-bound stand-in for a bigger model with the same
tokenizer: SmolLM2 with ``--extra-blocks`` more blocks of random weights whose output projections are
zero, so it computes exactly SmolLM2's function at several times the cost per token (a random target
would accept nothing, which measures no draft). Drafts: the distilled student and, for contrast, the
same pruned student before distillation.

    python bench/speculative_smollm2.py --out bench/results/speculative_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlxllm.files import write_atomic
from mlxllm.formats.loader import load, load_model
from mlxllm.model.decoder import Block
from mlxllm.engine.steps import generate_step
from mlxllm.engine.speculative import speculative_generate_step
from mlxllm.train.students import prune_layers, pruned_layers

HERE = Path(__file__).resolve().parent
PROMPTS = ["Explain what a Python list comprehension is.", "Write a short poem about autumn.",
           "What is the capital of France, and what is it known for?", "Give three tips for writing clear code.",
           "How does a for loop work in Python?", "Describe the water cycle in simple terms."]


def padded_target(extra: int):
    """SmolLM2 plus ``extra`` random blocks that write nothing to the residual stream."""
    model = load_model(None, compute="float32")
    mx.random.seed(0)
    blocks = []
    for _ in range(extra):
        b = Block(model.config, 0)
        b.self_attn.o_proj.weight = mx.zeros_like(b.self_attn.o_proj.weight)
        b.mlp.down_proj.weight = mx.zeros_like(b.mlp.down_proj.weight)
        blocks.append(b)
    n = len(model.layers)
    layers = list(model.layers)
    for i, b in enumerate(blocks):  # spread through the stack
        layers.insert((i + 1) * (n + len(blocks)) // (len(blocks) + 1), b)
    model.model.layers = layers
    import dataclasses

    model.config = dataclasses.replace(model.config, num_hidden_layers=len(layers),
                                       layer_types=["full_attention"] * len(layers))
    mx.eval(model.parameters())
    return model


def timed(gen) -> tuple[list[int], float]:
    stamps, out = [], []
    for item in gen:
        out.append(item[0])
        stamps.append(time.perf_counter())
    return out, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=str(HERE / "ckpt" / "smollm2-distilled-15l"))
    p.add_argument("--extra-blocks", type=int, default=90)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--draft-tokens", default="2,4")
    p.add_argument("--prompts", choices=["chat", "pydoc"], default="chat",
                   help="chat: six chat questions; pydoc: the first 64 tokens of six held-out pydoc topics "
                   "(the distillation's own domain).")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    smol, tok = load(None, compute="float32")
    student, student_tok = load(args.student, compute="float32")
    assert student_tok.fingerprint == tok.fingerprint
    pruned = prune_layers(load_model(None, compute="float32"), pruned_layers("every-2nd-layer", 30))
    if args.prompts == "chat":
        prompts = [mx.array(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True), dtype=mx.int32)
                   for q in PROMPTS]
    else:  # topics distill_smollm2.py held out (every 10th in sorted order)
        from pydoc_data.topics import topics

        held = [topics[k] for i, k in enumerate(sorted(topics)) if i % 10 == 0]
        prompts = [mx.array(tok.encode(t)[:64], dtype=mx.int32) for t in held[1:: max(1, len(held) // 6)][:6]]
    ks = [int(k) for k in args.draft_tokens.split(",")]
    result = {"machine": platform.processor() or platform.machine(), "mlx": mx.__version__, "tokens": args.tokens,
              "prompt_set": args.prompts,
              "prompts": len(prompts), "targets": {}}
    for name, target in (("SmolLM2-135M", smol), (f"SmolLM2 + {args.extra_blocks} zero-output blocks",
                                                   padded_target(args.extra_blocks))):
        for prompt in prompts[:1]:  # warm-up
            timed(generate_step(prompt, target, max_tokens=4))
            timed(speculative_generate_step(prompt, target, student, max_tokens=4))
        rows = {"plain": []}
        for prompt in prompts:
            ref, tps = timed(generate_step(prompt, target, max_tokens=args.tokens))
            rows["plain"].append({"decode_tps": tps})
            for dname, draft in (("distilled", student), ("pruned, not distilled", pruned)):
                for k in ks:
                    stats = {}
                    out, tps = timed(speculative_generate_step(prompt, target, draft, num_draft_tokens=k,
                                                               max_tokens=args.tokens, stats=stats))
                    assert out == ref, "greedy speculative output differs from the target's"
                    rows.setdefault(f"{dname}, k={k}", []).append(
                        {"decode_tps": tps, "acceptance": stats["accepted"] / stats["proposed"]})
        base = statistics.median(r["decode_tps"] for r in rows["plain"])
        summary = {}
        for key, rs in rows.items():
            tps = statistics.median(r["decode_tps"] for r in rs)
            summary[key] = {"decode_tps": tps, "speedup": tps / base,
                            "acceptance": statistics.median(r["acceptance"] for r in rs) if key != "plain" else None}
            print(f"{name:40s} {key:28s} {tps:7.1f} tok/s  x{tps / base:.2f}"
                  + (f"  acceptance {summary[key]['acceptance']:.0%}" if key != "plain" else ""), flush=True)
        result["targets"][name] = {"layers": len(target.layers), "summary": summary, "runs": rows}
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
