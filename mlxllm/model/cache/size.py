"""How many bytes a cache holds: what the benchmark's cost model and the server's admission control count."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .recurrent import recurrent_bytes
from .settings import KVSettings


def activation_dtype(model: Any) -> mx.Dtype:
    """The dtype activations, and so the KV cache, take in this model."""
    return model.embed(mx.array([[0]])).dtype


def kv_bytes(model: Any, context: int, batch: int = 1, dtype: mx.Dtype | None = None,
             kv: KVSettings | None = None) -> int:
    """Bytes of K and V a cache of ``context`` positions holds, which a decode step reads (sliding
    layers hold their window in ``dtype``, default the model's activation dtype; with a quantized
    ``kv`` the global layers hold packed values plus a scale and bias per group, past the float
    prefix; everything is float until ``kv.start`` is crossed; a linear-attention layer's recurrent
    state has one size whatever the context; KV-sharing layers hold none)."""
    kv = kv or KVSettings()
    cfg = model.config
    dtype = dtype or activation_dtype(model)
    total = 0
    for i in cfg.kv_layers:  # KV-sharing layers hold nothing
        numbers = cfg.kv_cache_width(i)  # per token
        per_token = numbers * dtype.size
        quantized = numbers * kv.bits // 8 + 2 * (numbers // kv.group_size) * dtype.size if kv.quantized else per_token
        if cfg.is_linear(i):
            total += recurrent_bytes(cfg, dtype)
        elif cfg.is_sliding(i):
            total += min(context, cfg.sliding_window) * per_token
        else:
            held_float = (context if context <= kv.start else min(context, kv.float_prefix)) if kv.quantized else 0
            total += held_float * per_token + (context - held_float) * quantized
    return batch * total
