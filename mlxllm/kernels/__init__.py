"""Attention kernels over quantized KV caches, one entry point for every backend.

``quantized_sdpa`` runs the GPU kernels (``gpu.py``: flash-decoding for up to 8 queries, the prefill
kernel beyond) from their Metal sources when MLX's Metal backend is available and from their CUDA
twins on MLX's CUDA backend; everywhere else, and for shapes the kernels do not take, the reference
path (``reference.py``): the same blockwise online-softmax algorithm in plain MLX ops, so the bounded
working memory holds on the CPU too.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import mlx.core as mx

from .. import backend
from . import gpu, reference


@lru_cache(maxsize=None)
def cuda_kernels_work() -> bool:
    """Whether the CUDA twins compile and agree with the reference path here, checked once on small
    decode and prefill cases. They are verified in CI only through the CPU emulator, so on a GPU a
    compile error or a mismatch falls back to the reference path with one warning instead of failing."""
    try:
        q = mx.random.normal((1, 4, 40, 64), key=mx.random.key(0))
        keys, values = (mx.quantize(mx.random.normal((1, 2, 300, 64), key=mx.random.key(i)), 64, 4) for i in (1, 2))
        for L in (2, 40):
            got = gpu.attention(q[:, :, :L], keys, values, 0.125, True, None, 64, 4, dialect="cuda")
            want = reference.quantized_sdpa(q[:, :, :L], keys, values, 0.125, True, None, 64, 4)
            if not all(mx.allclose(g, w, atol=1e-3, rtol=1e-3).item() for g, w in zip(got, want)):
                raise RuntimeError("results differ from the reference path")
    except Exception as e:  # noqa: BLE001  (any failure means: do not use them)
        warnings.warn(f"mlxllm: CUDA attention kernels unavailable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      "using the reference path", stacklevel=2)
        return False
    return True


def quantized_sdpa(q: mx.array, keys: tuple, values: tuple, scale: float, mask: str | None, group_size: int,
                   bits: int, window: int | None = None) -> tuple[mx.array, mx.array]:
    """Attention of ``q [B, Hq, L, D]`` over MLX-quantized K/V ``[B, Hkv, S, ...]``; ``mask`` is None or
    "causal" (the queries are the last L positions), ``window`` limits how far back a query sees.
    Returns the output and each row's log-sum-exp ``[B, Hq, L]`` (see ``reference.quantized_sdpa``)."""
    if mask not in (None, "causal"):
        raise ValueError(f"quantized attention takes mask None or 'causal', not {type(mask).__name__}")
    dialect = backend.device_name()
    if dialect != "cpu" and gpu.supports(q, bits, group_size) and (dialect == "metal" or cuda_kernels_work()):
        return gpu.attention(q, keys, values, scale, mask == "causal", window, group_size, bits, dialect=dialect)
    return reference.quantized_sdpa(q, keys, values, scale, mask == "causal", window, group_size, bits)
