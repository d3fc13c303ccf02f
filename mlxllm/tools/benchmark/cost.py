"""The cost model of ``mlxllm bench``: how many bytes a decode step reads and how many FLOPs a prefill
computes, counted from the loaded model's own arrays.

Decode streams every weight it touches once per step plus the KV cache held so far, so its ceiling is
memory bandwidth; prefill is matmul-bound. Counting from the arrays loading produced (float, native or
quantized, whatever representation it chose) keeps the figures honest for every format; the hand
counts in tests/test_benchmark.py pin them down.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ...model.cache.size import activation_dtype, kv_bytes


def _own_arrays(module: nn.Module) -> list[mx.array]:
    return [v for v in module.values() if isinstance(v, mx.array)]


def _expert_fraction(module: nn.Module, batch: int) -> float:
    """Share of an expert stack one decode step reads: the expected number of distinct experts that
    ``batch`` tokens each routing to ``top_k`` of ``num_experts`` touch, over the stack size."""
    n, k = module.num_experts, module.top_k
    return 1.0 - (1.0 - k / n) ** batch


def decode_weight_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every array once, except that an embedding lookup
    reads only ``batch`` rows (the tied head still reads the whole table) and an expert stack
    (a module with ``num_experts``/``top_k``) only its active experts."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    total = 0.0
    for _, module in model.named_modules():
        arrays = _own_arrays(module)
        size = sum(a.nbytes for a in arrays)
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            rows = arrays[0].shape[0]
            total += size if tied else size * min(batch, rows) / rows
        elif hasattr(module, "num_experts") and hasattr(module, "top_k"):
            total += size * _expert_fraction(module, batch)
        else:
            total += size
    return round(total)


def _macs_per_token(module: nn.Module) -> int:
    """Multiply-accumulates per token of a (quantized) linear map or expert stack, from its weight's
    shape ``[..., out, in]`` (packed columns for quantized weights; ``top_k`` experts for a stack)."""
    out, cols = module["weight"].shape[-2:]
    macs = out * (cols * 32 // module.bits if "scales" in module else cols)
    return macs * module.top_k if hasattr(module, "num_experts") else macs


def _is_matmul(module: nn.Module) -> bool:
    return ("weight" in module and module["weight"].ndim >= 2
            and not isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)))


def prefill_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs a prefill of ``tokens`` computes: the layers' matmuls for every token, attention scores
    and mixing over the keys each token sees, and the head for the last token only (as generation does)."""
    cfg = model.config
    layer_macs = sum(_macs_per_token(m) for layer in model.layers for _, m in layer.named_modules() if _is_matmul(m))
    head = model.model.embed_tokens if cfg.tie_word_embeddings else model.lm_head
    head_macs = _macs_per_token(head)
    # QK^T and PV per head and visible key (latent attention expands to its own key and value widths)
    attn_macs = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_linear(i):  # a recurrent state, not keys: its few state FLOPs per token are not counted
            continue
        latent = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        per_key = latent if cfg.kv_lora_rank else 2 * cfg.layer_head_dim(i)
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        attn_macs += cfg.num_attention_heads * per_key * _keys_seen(tokens, window)
    return 2.0 * (layer_macs * tokens + head_macs + attn_macs)


def _keys_seen(tokens: int, window: int | None) -> int:
    """Sum over query positions 1..tokens of the keys each one attends to."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window
