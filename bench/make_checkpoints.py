"""Build the benchmark checkpoints from the bundled SmolLM2 GGUF: the same weights as a Hugging Face
bf16 directory and as an mlx-community 4-bit directory (made by mlx-lm's own converter, so the peer
reads its native layout). Both runtimes then load the very same files.

    python bench/make_checkpoints.py --out bench/ckpt
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlxllm.load import load
from mlxllm.load.hub import default_model_path

HF_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
           "max_position_embeddings", "tie_word_embeddings")


def write_hf_dir(gguf: Path, out: Path, dtype: mx.Dtype = mx.bfloat16) -> None:
    model, tokenizer = load(str(gguf), compute="float32")
    cfg = model.config
    config = {k: getattr(cfg, k) for k in HF_KEYS}
    config.update(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=sorted(tokenizer.eos_token_ids)[0],
                  torch_dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_json(gguf, out, tokenizer)


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
    args = p.parse_args()
    out = Path(args.out)
    bf16, q4 = out / "smollm2-135m-bf16", out / "smollm2-135m-4bit"
    write_hf_dir(default_model_path(), bf16)
    from mlx_lm import convert

    shutil.rmtree(q4, ignore_errors=True)
    convert(str(bf16), mlx_path=str(q4), quantize=True, q_bits=4, q_group_size=64)
    print(f"wrote {bf16} and {q4}")


if __name__ == "__main__":
    main()
