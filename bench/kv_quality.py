"""What a quantized KV cache costs in quality, on the bundled SmolLM2-135M-Instruct:

* greedy generations (64 tokens, chat prompts) with the 8-bit and 4-bit caches against the float
  cache: how many prompts give identical tokens, and where the first difference is;
* perplexity on Python's pydoc topics with long windows, scored through each cache in chunks of 512,
  and for 4-bit also without the float prefix (the first 64 positions kept unquantized), to show
  what it buys.

    python bench/kv_quality.py --out bench/results/kv_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx

from mlxllm.tools import perplexity as pp
from mlxllm import stream_generate
from mlxllm.files import write_atomic
from mlxllm.formats.loader import load
from mlxllm.formats.hub import default_model_path
from mlxllm.model.cache import FLOAT_PREFIX, KVSettings

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Explain what a hash table is to a child.",
    "Give me a recipe for pancakes.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]
CACHES = {"float": None, "8-bit g64": (8, 64), "4-bit g32": (4, 32), "4-bit g64": (4, 64)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/results/kv_quality.json")
    args = p.parse_args()
    model, tok = load(str(default_model_path()), compute="float32")
    greedy = {}
    for name, kv in CACHES.items():
        outs = []
        for prompt in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            kw = {"kv_bits": kv[0], "kv_group_size": kv[1]} if kv else {}
            outs.append([r.token for r in stream_generate(model, tok, text, args.gen_tokens, **kw)])
        greedy[name] = outs
    agreement = {}
    for name in CACHES:
        firsts = []
        for a, b in zip(greedy["float"], greedy[name]):
            diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            firsts.append(diff if diff is not None or len(a) == len(b) else min(len(a), len(b)))
        agreement[name] = {"identical_prompts": sum(f is None for f in firsts), "prompts": len(PROMPTS),
                           "first_difference": firsts}
        print(f"greedy {name}: {agreement[name]['identical_prompts']}/{len(PROMPTS)} identical", flush=True)
    tokens = tok.encode(pp.default_text())[: args.max_tokens]
    ppl = {}
    variants = {**CACHES, "4-bit g32, no float prefix": (4, 32, 0)}
    for name, kv in variants.items():
        kw = {"kv": KVSettings(kv[0], kv[1], float_prefix=kv[2] if len(kv) > 2 else FLOAT_PREFIX)} if kv else {}
        ppl[name] = pp.summarize(pp.token_nll(model, tokens, args.seq_len, batch=1, **kw))
        rel = ppl[name]["perplexity"] / ppl["float"]["perplexity"] - 1
        print(f"perplexity {name}: {ppl[name]['perplexity']:.4f} ({rel:+.2%})", flush=True)
    write_atomic(args.out, json.dumps({"machine": platform.processor() or platform.machine(), "mlx": mx.__version__,
                                       "seq_len": args.seq_len, "tokens": len(tokens), "greedy": agreement,
                                       "perplexity": ppl}, indent=2))


if __name__ == "__main__":
    main()
