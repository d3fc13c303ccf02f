"""mlxllm's GPU attention kernels and how they are launched: the Metal sources in ``metal_kernels/``
and their CUDA twins in ``metal_kernels/cuda/`` (same algorithm, same launch, line for line).

``decode_attention`` runs flash-decoding over a quantized KV cache in two passes: per (batch, K/V
head, block of keys) partial softmax results, then one combine per query row; ``prefill_attention``
tiles the queries and stages key blocks. Both take the dialect and optionally a kernel factory: by
default ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` (each kernel built once), the CPU emulators
in the tests, so all run exactly the same sources with the same launch parameters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

SOURCES = Path(__file__).with_name("metal_kernels")  # a symlink to the repository's metal_kernels/
DECODE_BLOCK = 256  # keys per split: enough splits to fill the GPU at long contexts
MAX_QUERIES = 8  # query positions per call (speculative decoding verifies up to 8)
HEAD_DIMS = (64, 96, 128, 256)  # a lane holds head_dim / 32 features


# Where each dialect's sources live and what they are called.
DIALECTS = {"metal": ("", ".metal", "quantized_kv.h"), "cuda": ("cuda/", ".cu", "cuda/quantized_kv.cuh")}


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return (SOURCES / name).read_text()


def specs(dialect: str = "metal") -> dict[str, dict[str, Any]]:
    """The ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` arguments of every kernel, by name."""
    folder, ext, header_file = DIALECTS[dialect]
    header = source(header_file)
    return {
        "sdpa_decode_quantized": dict(
            name="sdpa_decode_quantized", input_names=["q", "kw", "ks", "kb", "vw", "vs", "vb", "scale"],
            output_names=["part_o", "part_m", "part_l"], source=source(f"{folder}sdpa_decode_quantized{ext}"),
            header=header),
        "sdpa_prefill_quantized": dict(
            name="sdpa_prefill_quantized", input_names=["q", "kw", "ks", "kb", "vw", "vs", "vb", "scale"],
            output_names=["out", "lse"], source=source(f"{folder}sdpa_prefill_quantized{ext}"), header=header),
        "sdpa_combine": dict(
            name="sdpa_combine", input_names=["part_o", "part_m", "part_l"], output_names=["out", "lse"],
            source=source(f"{folder}sdpa_combine{ext}"), header=header),
    }


@lru_cache(maxsize=None)
def _mlx_kernel(dialect: str, name: str) -> Any:
    factory = mx.fast.metal_kernel if dialect == "metal" else mx.fast.cuda_kernel
    return factory(**specs(dialect)[name])


def kernel_for(dialect: str, name: str, make: Callable[..., Any] | None) -> Any:
    """The kernel ``name``: MLX's, built once per process (not per decode step), or ``make``'s (the
    tests' emulators) from the same arguments."""
    return _mlx_kernel(dialect, name) if make is None else make(**specs(dialect)[name])


def supports(q: mx.array, bits: int, group_size: int) -> bool:
    """Whether the kernels take this call (otherwise the reference path does)."""
    return q.shape[-1] in HEAD_DIMS and bits in (2, 4, 8) and q.shape[-1] % group_size == 0


def attention(q: Any, keys: tuple, values: tuple, scale: float, causal: bool, window: int | None, group_size: int,
              bits: int, dialect: str = "metal", kernel: Callable[..., Any] | None = None) -> Any:
    """``(out, lse)`` as ``reference.quantized_sdpa``: decode steps (up to 8 queries) by flash-decoding,
    longer chunks by the prefill kernel."""
    run = decode_attention if q.shape[2] <= MAX_QUERIES else prefill_attention
    return run(q, keys, values, scale, causal, window, group_size, bits, dialect=dialect, kernel=kernel)


def _shared(q: Any, keys: tuple, values: tuple, scale: float, causal: bool, window: int | None, group_size: int,
            bits: int) -> tuple[list, list]:
    """The inputs and template values both attention kernels take."""
    template = [("T", q.dtype), ("D", q.shape[-1]), ("BITS", bits), ("GROUP", group_size),
                ("REP", q.shape[1] // keys[0].shape[1]), ("CAUSAL", bool(causal)), ("WINDOW", window or 0)]
    return [q, *keys, *values, mx.array([scale], dtype=mx.float32)], template


def prefill_attention(q: Any, keys: tuple, values: tuple, scale: float, causal: bool, window: int | None,
                      group_size: int, bits: int, dialect: str = "metal", kernel: Callable[..., Any] | None = None,
                      tile: int = 32) -> Any:
    """Attention of ``q [B, Hq, L, D]`` over packed K/V: tiles of ``tile`` queries, key blocks staged
    in threadgroup memory (32 KB for K and V at every head dim)."""
    B, Hq, L, D = q.shape
    inputs, template = _shared(q, keys, values, scale, causal, window, group_size, bits)
    out, lse = kernel_for(dialect, "sdpa_prefill_quantized", kernel)(
        inputs=inputs, template=[*template, ("TQ", tile), ("BK", 4096 // D)], grid=(tile * -(-L // tile), B * Hq, 1),
        threadgroup=(tile, 1, 1), output_shapes=[q.shape, (B, Hq, L)], output_dtypes=[q.dtype, mx.float32])
    return out, lse


def decode_attention(q: Any, keys: tuple, values: tuple, scale: float, causal: bool, window: int | None,
                     group_size: int, bits: int, dialect: str = "metal", kernel: Callable[..., Any] | None = None,
                     block: int = DECODE_BLOCK) -> Any:
    """Attention of ``q [B, Hq, L <= 8, D]`` over packed K/V ``[B, Hkv, S, ...]`` (see ``reference``)."""
    B, Hq, L, D = q.shape
    Hkv, S = keys[0].shape[1], keys[0].shape[2]
    nsplit = -(-S // block)
    inputs, template = _shared(q, keys, values, scale, causal, window, group_size, bits)
    part_o, part_m, part_l = kernel_for(dialect, "sdpa_decode_quantized", kernel)(
        inputs=inputs, template=[*template, ("NQ", L), ("BLOCK", block)], grid=(32, B * Hkv, nsplit),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, Hq, L, nsplit, D), (B, Hq, L, nsplit), (B, Hq, L, nsplit)],
        output_dtypes=[mx.float32] * 3)
    out, lse = kernel_for(dialect, "sdpa_combine", kernel)(
        inputs=[part_o, part_m, part_l], template=[("T", q.dtype), ("D", D)], grid=(D, B * Hq * L, 1),
        threadgroup=(D, 1, 1), output_shapes=[(B, Hq, L, D), (B, Hq, L)], output_dtypes=[q.dtype, mx.float32])
    return out, lse
