"""Write a loaded model as an MLX / Hugging Face directory (``config.json`` + ``model.safetensors``).

The directory uses Hugging Face parameter names and, for quantized modules, mlx-community's
``quantization`` block, so mlxllm, mlx-lm and transformers-style tools read it alike. ``bench
--compare`` uses it to give mlx-lm the very weights mlxllm loaded from a GGUF file.
Files are written under temporary names and renamed, so an interrupted write leaves nothing half-done.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UserError
from .model.config import ModelConfig
from .model.decoder import Model

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
_MOE = ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers")
_COMMON = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
           "max_position_embeddings", "tie_word_embeddings", "attention_bias")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` a Hugging Face checkpoint of this family would carry."""
    if (cfg.rope_scaling or {}).get("rope_type") == "freq_factors":
        raise UserError("RoPE frequency factors from a GGUF rope_freqs tensor have no config.json form")
    out: dict[str, Any] = {"architectures": [_ARCHITECTURES[cfg.model_type]]}
    out.update({k: getattr(cfg, k) for k in _COMMON})
    if cfg.model_type == "gemma3_text":
        first_global = next((i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)), cfg.num_hidden_layers)
        out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                   rope_local_base_freq=cfg.rope_local_base_freq, layer_types=cfg.layer_types,
                   sliding_window_pattern=first_global + 1, hidden_activation="gelu_pytorch_tanh")
    elif cfg.sliding_window is not None:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    if cfg.num_experts:
        out.update({k: getattr(cfg, k) for k in _MOE})
        out["num_local_experts" if cfg.model_type == "mixtral" else "num_experts"] = cfg.num_experts
    return {k: v for k, v in out.items() if v is not None}


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx-community's ``quantization`` entry: the most common (group_size, bits) as the default and
    an override for every quantized module that differs."""
    found = {name: (m.group_size, m.bits) for name, m in model.named_modules() if "scales" in m and hasattr(m, "bits")}
    if not found:
        return None
    group, bits = Counter(found.values()).most_common(1)[0][0]
    block: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for name, (g, b) in sorted(found.items()):
        if (g, b) != (group, bits):
            block[name] = {"group_size": g, "bits": b}
    return block


def save_model(model: Model, out: str | Path, tokenizer_files: Path | None = None) -> Path:
    """Write ``model`` to the directory ``out`` (replaced if it exists); copy the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``, ...) from ``tokenizer_files``."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(model.config)
    quant = quantization_block(model)
    if quant:
        config["quantization"] = quant
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_files is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            if (tokenizer_files / name).exists():
                shutil.copy(tokenizer_files / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
