"""Attention kernels over quantized KV caches, one entry point for every backend.

``quantized_sdpa`` runs the Metal kernels (``metal_kernels/``, launched by ``metal.py``: flash-decoding
for up to 8 queries, the prefill kernel beyond) when MLX's Metal backend is available, and everywhere
else the reference path (``reference.py``): the same blockwise online-softmax algorithm in plain MLX ops, so the
bounded working memory holds on the CPU and CUDA backends too.
"""

from __future__ import annotations

import mlx.core as mx

from .. import backend
from . import metal, reference


def quantized_sdpa(q: mx.array, keys: tuple, values: tuple, scale: float, mask: str | None, group_size: int,
                   bits: int, window: int | None = None) -> mx.array:
    """Attention of ``q [B, Hq, L, D]`` over MLX-quantized K/V ``[B, Hkv, S, ...]``; ``mask`` is None or
    "causal" (the queries are the last L positions), ``window`` limits how far back a query sees."""
    if mask not in (None, "causal"):
        raise ValueError(f"quantized attention takes mask None or 'causal', not {type(mask).__name__}")
    if backend.device_name() == "metal" and metal.supports(q, bits, group_size):
        return metal.attention(q, keys, values, scale, mask == "causal", window, group_size, bits)
    return reference.quantized_sdpa(q, keys, values, scale, mask == "causal", window, group_size, bits)
