"""Rotary position embeddings, including the scaled variants models ship with."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError


class RoPE(nn.Module):
    """Half-split (non-interleaved) RoPE over the first ``dims`` features, with optional custom freqs."""

    def __init__(self, dims: int, base: float, scale: float = 1.0, freqs: mx.array | None = None):
        super().__init__()
        self.dims = dims
        self.base = None if freqs is not None else base
        self.scale = scale
        self._freqs = freqs

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset, freqs=self._freqs
        )


def llama3_freqs(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    """Llama 3.1 long-context frequencies: low frequencies divided by ``factor``, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dims, 2):
        period = base ** (i / dims)  # mx.fast.rope's freqs are periods: angle = position / period
        wavelen = 2 * math.pi * period
        if wavelen < original / high:
            out.append(period)
        elif wavelen > original / low:
            out.append(period * factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(period / ((1 - smooth) / factor + smooth))
    return mx.array(out, dtype=mx.float32)


def make_rope(dims: int, base: float, scaling: dict[str, Any] | None) -> RoPE:
    """Build the RoPE a config asks for; unknown scaling types are a clear error, not a silent default."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return RoPE(dims, base)
    if kind == "linear":
        return RoPE(dims, base, scale=1.0 / scaling["factor"])
    if kind == "llama3":
        return RoPE(dims, base, freqs=llama3_freqs(dims, base, scaling))
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: per-frequency divisors, already computed
        factors = scaling["factors"]
        if len(factors) != dims // 2:
            raise UserError(f"rope_freqs has {len(factors)} values, expected {dims // 2}")
        periods = [base ** (i / dims) * f for i, f in zip(range(0, dims, 2), factors)]
        return RoPE(dims, base, freqs=mx.array(periods, dtype=mx.float32))
    raise UserError(f"unsupported rope_scaling type '{kind}' (supported: default, linear, llama3, freq_factors)")
