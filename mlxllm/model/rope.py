"""Rotary position embeddings, including the scaled variants models ship with."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError


class RoPE(nn.Module):
    """RoPE over the first ``dims`` features: half-split pairs, or adjacent pairs when ``traditional``
    (DeepSeek); optional custom freqs, and ``mscale`` multiplying the rotated features (YaRN)."""

    def __init__(self, dims: int, base: float, scale: float = 1.0, freqs: mx.array | None = None,
                 traditional: bool = False, mscale: float = 1.0):
        super().__init__()
        self.dims = dims
        self.base = None if freqs is not None else base
        self.scale = scale
        self._freqs = freqs
        self.traditional = traditional
        self.mscale = mscale

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.mscale != 1.0:
            x = x * self.mscale if x.shape[-1] == self.dims else x.at[..., : self.dims].multiply(self.mscale)
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset,
            freqs=self._freqs,
        )


class NoRoPE(nn.Module):
    """A layer that takes no positions (SmolLM3's NoPE layers): queries and keys pass unchanged."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return x


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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched ``factor`` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_freqs(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    """YaRN periods: high frequencies (many turns within the original context) kept, low ones
    interpolated by ``factor``, a linear ramp between the ``beta_fast`` and ``beta_slow`` turn counts."""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or 4096
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(turns: float) -> float:  # the feature index whose wavelength fits ``turns`` times in ``original``
        return dims * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):  # gpt-oss turns the rounding of the ramp's ends off
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    high = high if high != low else high + 0.001
    out = []
    for j, i in enumerate(range(0, dims, 2)):
        period = base ** (i / dims)
        keep = 1.0 - min(max((j - low) / (high - low), 0.0), 1.0)  # 1: extrapolate (original period)
        out.append(period * factor / (factor * keep + (1 - keep)))
    return mx.array(out, dtype=mx.float32)


def _scaled_periods(dims: int, base: float, factors: list[float], name: str) -> mx.array:
    """Default RoPE periods, each multiplied by its factor (one per turned pair of features)."""
    if len(factors) != dims // 2:
        raise UserError(f"{name} has {len(factors)} values, expected {dims // 2}")
    return mx.array([base ** (i / dims) * f for i, f in zip(range(0, dims, 2), factors)], dtype=mx.float32)


def make_rope(dims: int, base: float, scaling: dict[str, Any] | None, traditional: bool = False) -> RoPE:
    """Build the RoPE a config asks for; unknown scaling types are a clear error, not a silent default."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        kw = {}
    elif kind == "linear":
        kw = {"scale": 1.0 / scaling["factor"]}
    elif kind == "llama3":
        kw = {"freqs": llama3_freqs(dims, base, scaling)}
    elif kind == "yarn":
        factor = scaling["factor"]
        mscale = scaling.get("attention_factor") or (
            yarn_mscale(factor, scaling.get("mscale") or 1.0) / yarn_mscale(factor, scaling.get("mscale_all_dim") or 0.0)
        )
        kw = {"freqs": yarn_freqs(dims, base, scaling), "mscale": mscale}
    elif kind == "freq_factors":  # GGUF's rope_freqs tensor: per-frequency divisors, already computed
        kw = {"freqs": _scaled_periods(dims, base, scaling["factors"], "rope_freqs")}
    elif kind == "proportional":  # Gemma 4's full layers: the first pairs turn at whole-head rates, the rest not
        turned = int(dims * scaling.get("partial_rotary_factor", 1.0)) // 2
        periods = [scaling.get("factor", 1.0) * base ** (i / dims) for i in range(0, 2 * turned, 2)]
        kw = {"freqs": mx.array(periods + [math.inf] * (dims // 2 - turned), dtype=mx.float32)}
    elif kind in ("longrope", "su"):  # Phi-3: long factors at every length, as mlx-lm does
        original = scaling.get("original_max_position_embeddings") or 4096
        factor = (scaling.get("max_position_embeddings") or original) / original
        mscale = scaling.get("long_mscale") or scaling.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        kw = {"freqs": _scaled_periods(dims, base, scaling["long_factor"], "rope_scaling.long_factor"), "mscale": mscale}
    else:
        raise UserError(f"unsupported rope_scaling type '{kind}' (supported: default, linear, llama3, yarn, longrope, proportional, freq_factors)")
    return RoPE(dims, base, traditional=traditional, **kw)


def query_scale(n: int, offset: int | mx.array, beta: float, length: int) -> mx.array:
    """Llama 4's per-position query scale ``1 + beta * log(1 + floor(p / length))`` for positions
    ``offset + [0, n)``, shaped to multiply queries ``[B, heads, n, dims]`` (``offset``: one per row)."""
    positions = mx.arange(n) + (offset[:, None] if isinstance(offset, mx.array) and offset.ndim else offset)
    scale = 1 + beta * mx.log(1 + mx.floor(positions / length))
    return scale[:, None, :, None] if scale.ndim == 2 else scale[:, None]
