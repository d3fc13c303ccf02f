"""Microbenchmarks behind the CPU representation policy: how fast MLX's kernels are on this machine.

Prints matmul GFLOP/s per dtype, matrix-vector GB/s for float32, float16 and quantized weights, and a
30-layer SmolLM2-shaped decode pass with separate vs fused projections (with and without mx.compile).
Run twice to see the BLAS effect:  python bench/cpu_kernels.py ; MLXLLM_BLAS=0 python bench/cpu_kernels.py
"""

from __future__ import annotations

import json
import time

import mlxllm  # preloads OpenBLAS unless MLXLLM_BLAS=0
import mlx.core as mx
import mlx.nn as nn


def median_ms(f, n: int = 20) -> float:
    for _ in range(3):
        mx.eval(f())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def matmul_gflops() -> dict[str, float]:
    out = {}
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        a, b = mx.random.normal((512, 1024)).astype(dtype), mx.random.normal((1024, 1024)).astype(dtype)
        mx.eval(a, b)
        out[str(dtype)] = 2 * 512 * 1024 * 1024 / median_ms(lambda: a @ b, 5) / 1e6
    return out


def gemv_gbs(rows: int = 8192, cols: int = 2048) -> dict[str, float]:
    w, x = mx.random.normal((rows, cols)), mx.random.normal((1, cols))
    mx.eval(w, x)
    out = {"float32": w.nbytes / median_ms(lambda: x @ w.T) / 1e6}
    w16, x16 = w.astype(mx.float16), x.astype(mx.float16)
    mx.eval(w16, x16)
    out["float16"] = w16.nbytes / median_ms(lambda: x16 @ w16.T) / 1e6
    for bits in (4, 8):
        for scale_dtype, xin in ((mx.float32, x), (mx.float16, x16)):
            q, s, b = mx.quantize(w, group_size=64, bits=bits)
            s, b = s.astype(scale_dtype), b.astype(scale_dtype)
            mx.eval(q, s, b)
            ms = median_ms(lambda: mx.quantized_matmul(xin, q, s, b, transpose=True, group_size=64, bits=bits))
            out[f"q{bits} {scale_dtype}"] = (q.nbytes + s.nbytes + b.nbytes) / ms / 1e6
    return out


def decode_pass_ms(layers: int = 30, d: int = 576, kv: int = 192, ff: int = 1536) -> dict[str, float]:
    """One token through SmolLM2-shaped float32 layers: separate vs fused projections, compiled or not."""
    ws = []
    for _ in range(layers):
        w = {k: mx.random.normal(s) * 0.02 for k, s in
             dict(q=(d, d), k=(kv, d), v=(kv, d), o=(d, d), g=(ff, d), u=(ff, d), dn=(d, ff)).items()}
        w["qkv"], w["gu"] = mx.concatenate([w["q"], w["k"], w["v"]]), mx.concatenate([w["g"], w["u"]])
        ws.append(w)
    mx.eval(ws)
    x = mx.random.normal((1, d))
    swiglu = mx.compile(lambda g, u: nn.silu(g) * u)

    def separate(h, act=lambda g, u: nn.silu(g) * u):
        for w in ws:
            q, k, v = h @ w["q"].T, h @ w["k"].T, h @ w["v"].T
            h = h + (q + k.sum() * 0 + v.sum() * 0) @ w["o"].T
            h = h + act(h @ w["g"].T, h @ w["u"].T) @ w["dn"].T
        return h

    def fused(h, act=lambda g, u: nn.silu(g) * u):
        for w in ws:
            q, k, v = mx.split(h @ w["qkv"].T, [d, d + kv], axis=-1)
            h = h + (q + k.sum() * 0 + v.sum() * 0) @ w["o"].T
            g, u = mx.split(h @ w["gu"].T, 2, axis=-1)
            h = h + act(g, u) @ w["dn"].T
        return h

    weight_mb = sum(w[k].nbytes for w in ws for k in ("q", "k", "v", "o", "g", "u", "dn")) / 1e6
    out = {"weights_mb": weight_mb}
    for name, f in (("separate", separate), ("fused", fused)):
        out[name] = median_ms(lambda: f(x))
        out[name + "+compiled act"] = median_ms(lambda: f(x, swiglu))
    return out


def main() -> None:
    report = {"machine": mlxllm.backend.describe(), "matmul_gflops": matmul_gflops(),
              "gemv_gb_per_s": gemv_gbs(), "decode_pass_ms": decode_pass_ms()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
