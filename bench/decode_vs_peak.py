"""A decode-shaped step (SmolLM2-135M's float32 weight shapes, every weight read once as ``x @ W.T``,
timed as ``mlxllm bench`` times decode) against the read peak ``mlxllm bench`` measures, alternated,
medians: the share must stay at or below 100 %, or the probe under-measures the machine.

    .venv/bin/python bench/decode_vs_peak.py [--rounds 5] [--out bench/results/decode_vs_peak.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from mlxllm import backend
from mlxllm.files import write_atomic
from mlxllm.tools import benchmark as bm


def _decode_shaped_weights(layers: int = 30, hidden: int = 576, kv: int = 192, inter: int = 1536,
                           vocab: int = 49152) -> tuple[list[tuple[mx.array, ...]], mx.array]:
    """SmolLM2-135M's float32 weight shapes ([out, in], as nn.Linear holds them): 538 MB, past any
    last-level cache, from one random tile repeated (fast to fill, reads like random data)."""
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    per_layer = sum(r * c for r, c in shapes)
    total = layers * per_layer + vocab * hidden
    tile = mx.random.uniform(-1, 1, shape=(2**20,)) * hidden**-0.5
    flat = mx.tile(tile, (-(-total // 2**20),))[:total]
    mx.eval(flat)
    out, at = [], 0
    for _ in range(layers):
        ws = []
        for r, c in shapes:
            ws.append(flat[at : at + r * c].reshape(r, c))
            at += r * c
        out.append(tuple(ws))
    return out, flat[at:].reshape(vocab, hidden)


def _decode_step(layers: list[tuple[mx.array, ...]], head: mx.array, token: mx.array) -> mx.array:
    """A decoder's step with the attention mixing left out: every weight read once, as ``x @ W.T``."""
    x = head[token]
    ones = mx.ones((x.shape[-1],))
    for q, k, v, o, gate, up, down in layers:
        h = mx.fast.rms_norm(x, ones, 1e-5)
        a = h @ q.T + mx.mean(h @ k.T) + mx.mean(h @ v.T)
        x = x + a @ o.T
        h = mx.fast.rms_norm(x, ones, 1e-5)
        x = x + (nn.silu(h @ gate.T) * (h @ up.T)) @ down.T
    return mx.argmax(mx.fast.rms_norm(x, ones, 1e-5) @ head.T, axis=-1)


def _decode_gbps(layers, head, steps: int = 8) -> float:
    """Bytes per step x steps/s, timed as ``run_trial`` times decode: one host sync per step, from the
    first token to the last."""
    weight_bytes = sum(w.nbytes for ws in layers for w in ws) + head.nbytes
    token, stamps = mx.array([1]), []
    for _ in range(steps):
        token = _decode_step(layers, head, token)
        token.tolist()
        stamps.append(time.perf_counter())
    return weight_bytes * (steps - 1) / (stamps[-1] - stamps[0]) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/results/decode_vs_peak.json")
    args = p.parse_args()
    layers, head = _decode_shaped_weights()
    _decode_gbps(layers, head, steps=2)  # warm-up
    peaks, decodes = [], []
    for _ in range(args.rounds):
        peaks.append(bm.measure_peaks()["read_gbps"])
        decodes.append(_decode_gbps(layers, head))
    result = {"machine": backend.describe(), "peak_gbps": peaks, "decode_gbps": decodes,
              "median_share": statistics.median(d / p for d, p in zip(decodes, peaks))}
    print(f"decode-shaped {statistics.median(decodes):.2f} GB/s, peak {statistics.median(peaks):.2f} GB/s, "
          f"share {result['median_share']:.0%}")
    write_atomic(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
