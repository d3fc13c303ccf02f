"""Build the benchmark checkpoints.

From the bundled SmolLM2 GGUF: the same weights as a Hugging Face bf16 directory and as an
mlx-community 4-bit directory (made by mlx-lm's own converter, so the peer reads its native layout).
With --random: random-weight 4-bit checkpoints in the shapes of bigger models (speed only depends on
shapes), written by mlxllm's converter with SmolLM2's tokenizer files.

    python bench/make_checkpoints.py --out bench/ckpt [--random llama-3.2-1b,llama-3.1-8b]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

import mlx.nn as nn

from mlxllm.formats.save import hf_config, save_model
from mlxllm.formats.loader import load
from mlxllm.formats.hub import default_model_path
from mlxllm.model.config import ModelConfig
from mlxllm.model.decoder import Model

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # the public config.json values that set the cost of a step
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
                         max_position_embeddings=131072, tie_word_embeddings=False),
    # Qwen3-30B-A3B's per-layer shapes (128 experts, 8 active, 768 wide) with 4 of its 48 layers, so a
    # float32 copy (12 GB) fits this 24 GB machine; per-layer costs are the real model's.
    "qwen3-30b-a3b-4l": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=4, intermediate_size=6144,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                             num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6,
                             max_position_embeddings=40960, tie_word_embeddings=False),
}
# Llama-3.2-1B's per-layer shapes with 4 of its 16 layers, float32 (2 GB), so both runtimes compute the
# same way on the CPU backend at 8K-32K contexts (the KV-cache memory benchmark, bench/kv_memory.py).
SHAPES["llama-3.2-1b-4l"] = {**SHAPES["llama-3.2-1b"], "num_hidden_layers": 4}



def write_hf_dir(gguf: Path, out: Path, dtype: mx.Dtype = mx.bfloat16) -> None:
    model, tokenizer = load(str(gguf), compute="float32")
    config = hf_config(model.config)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=sorted(tokenizer.eos_token_ids)[0],
                  torch_dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_json(gguf, out, tokenizer)


def write_random_4bit(name: str, out: Path, tokenizer_dir: Path) -> None:
    """Random weights in ``name``'s shapes, quantized to MLX 4-bit group 64 one layer at a time (an 8B
    model never exists in float32 all at once)."""
    mx.random.seed(0)
    model = Model(ModelConfig.from_hf(SHAPES[name]))
    for module in [*model.layers, model]:  # each layer, then what is left (embedding, head)
        nn.quantize(module, group_size=64, bits=4)
        mx.eval(module.parameters())
    save_model(model, out, tokenizer_files=tokenizer_dir)


def write_random_float32(name: str, out: Path, tokenizer_dir: Path) -> None:
    mx.random.seed(0)
    save_model(Model(ModelConfig.from_hf(SHAPES[name])), out, tokenizer_files=tokenizer_dir)


def write_tokenizer_json(gguf: Path, out: Path, tokenizer) -> None:
    """A tokenizer.json for the peer (mlx-lm loads tokenizers through transformers), built with the
    `tokenizers` library from the GGUF vocabulary; the benchmark feeds token ids, so only loading matters."""
    import tokenizers as tk

    from mlxllm.tokenize import read_gguf_tokenizer_metadata

    meta = read_gguf_tokenizer_metadata(str(gguf))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    bpe = tk.models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]])
    hf = tk.Tokenizer(bpe)
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = tk.decoders.ByteLevel()
    hf.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    hf.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
              "bos_token": tokens[tokenizer.bos_token_id], "eos_token": tokens[tokenizer.eos_token_id]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/ckpt")
    p.add_argument("--random", default="", help=f"comma list of {', '.join(SHAPES)} (4-bit)")
    p.add_argument("--random-f32", default="", help="the same, float32")
    args = p.parse_args()
    out = Path(args.out)
    bf16, q4 = out / "smollm2-135m-bf16", out / "smollm2-135m-4bit"
    if not bf16.exists():
        write_hf_dir(default_model_path(), bf16)
    if not q4.exists():
        from mlx_lm import convert

        convert(str(bf16), mlx_path=str(q4), quantize=True, q_bits=4, q_group_size=64)
    for name in filter(None, args.random.split(",")):
        if not (out / f"{name}-4bit-random").exists():
            write_random_4bit(name, out / f"{name}-4bit-random", bf16)
    for name in filter(None, args.random_f32.split(",")):
        if not (out / f"{name}-f32-random").exists():
            write_random_float32(name, out / f"{name}-f32-random", bf16)
    print(f"checkpoints in {out}")


if __name__ == "__main__":
    main()
